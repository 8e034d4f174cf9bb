"""The in-process query API: ``Attributor.from_store(path).attribute(prompt, completion)``.

One forward pass, K loss-drop measurements in one batched computation, one batched Lasso solve
(certified by its duality gap; sparse, so ranking runs over the support, not the n examples).
The HTTP service and the CLI both wrap this; neither re-implements any of it.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from stride.config import Attribution, Example, Query, Scored, SolverConfig
from stride.corpus import Record
from stride.measure import loss_drops
from stride.model import LM, pick_device, weights_sha256
from stride.recovery import Solution, SparseDesign, solve
from stride.store import Store, StoreError, load_store


class Attributor:
    def __init__(self, store: Store, lm: LM, solver: SolverConfig | None = None):
        self.store, self.lm = store, lm
        self.solver = solver or SolverConfig()
        self.layer = int(store.config.layer)  # resolved at build time
        self.ops = store.operators.to(lm.device)
        self.design = SparseDesign(store.membership, lm.device)  # O(n d): no sort, no power iteration
        # +1: y_k = L(q) - L_k(q); -1 for stores whose operators remove subset k ("revert", "forget")
        self.sign = float(store.config.measurement_sign)
        # timings must wait for the device's queued work
        self._sync = torch.cuda.synchronize if lm.device.type == "cuda" else (lambda: None)

    @classmethod
    def from_store(
        cls, path: str | Path, *, device: str | None = None, model: str | Path | None = None,
        solver: SolverConfig | None = None, verify: bool = True,
    ) -> Attributor:
        """Load the store and the model it was built from (or ``model``, if it has the same weights)."""
        store = load_store(path, verify=verify)
        model_dir = Path(model or store.manifest["model"]["path"])
        if not model_dir.is_dir():
            raise StoreError(f"{model_dir}: the store's model directory is missing (pass model=...)")
        want = store.manifest["model"]["sha256"]
        if verify and weights_sha256(model_dir) != want:
            raise StoreError(f"{model_dir}: weights differ from those the store {path} was built from")
        lm = LM.load(model_dir, pick_device(device), store.config.max_length)
        if lm.hidden_size != store.operators.A.shape[2]:
            width = store.operators.A.shape[2]
            raise StoreError(f"{path}: operators are for hidden size {width}, the model has {lm.hidden_size}")
        return cls(store, lm, solver)

    @property
    def num_examples(self) -> int:
        return self.store.membership.num_examples

    def attribute(self, prompt: str, completion: str | None = None, top_k: int = 10,
                  include_text: bool = True) -> Attribution:
        return self.attribute_batch([Query(prompt, completion)], top_k, include_text)[0]

    @torch.no_grad()
    def attribute_batch(self, queries: list[Query], top_k: int = 10,
                        include_text: bool = True) -> list[Attribution]:
        """All queries share one forward pass, one measurement computation and one solve; each
        query's answer is the same as it would be alone."""
        if not queries:
            return []
        t0 = time.perf_counter()
        loss, Y, t1 = self._measure(queries)
        t2 = time.perf_counter()
        sol = self._solve(Y)
        t3 = time.perf_counter()
        k = min(top_k, self.num_examples)
        nnz = sol.nonzeros()
        out = []
        for q in range(len(queries)):
            out.append(
                Attribution(
                    loss=float(loss[q]),
                    proponents=self._scored(sol.top(q, k, 1.0), include_text),
                    opponents=self._scored(sol.top(q, k, -1.0), include_text),
                    diagnostics={
                        "nonzeros": int(nnz[q]), "iterations": int(sol.epochs[q]),
                        "gap": float(sol.gap[q]), "converged": bool(sol.converged[q]),
                        "lambda": float(sol.lam[q]), "intercept": float(sol.intercept[q]),
                    },
                )
            )
        t4 = time.perf_counter()
        timing = {"forward": (t1 - t0) * 1e3, "measure": (t2 - t1) * 1e3, "solve": (t3 - t2) * 1e3,
                  "total": (t4 - t0) * 1e3}
        for a in out:
            a.timing_ms = dict(timing)
        return out

    def _measure(self, queries: list[Query]) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Query losses (Q,) and signed measurements Y (K, Q), and when the forward pass ended."""
        records = [Record("query", q.prompt if q.completion else "", q.completion or q.prompt) for q in queries]
        batch = self.lm.encode(records)
        if bool((batch.scored.sum(1) == 0).any()):
            raise ValueError("each query needs at least one scored token: a longer prompt or a completion")
        h, z = self.lm.features(batch, self.layer)
        self._sync()
        t_forward = time.perf_counter()
        loss, Y = loss_drops(self.lm, self.ops, h, z, batch.targets.to(h.device), self.solver.first_order,
                             top_v=self.solver.top_v)
        self._sync()
        return loss, Y * self.sign, t_forward

    def _solve(self, Y: torch.Tensor) -> Solution:
        return solve(self.design, Y, self.solver.lam_ratio, self.solver.max_iter, self.solver.tol)

    @torch.no_grad()
    def score_matrix(self, queries: list[Query], chunk: int = 32) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """Every example's score for every query, for benchmarks that need whole vectors.

        Returns w (Q, n) float32 on the CPU, the no-solve ablation scores M_c^T y_c (Q, n) (the same
        signed measurements, no sparse recovery), and diagnostics: converged_share, mean_nonzeros,
        max_iterations. O(Q n) memory; the service never calls it.
        """
        ws, raw, conv, nnz, iters = [], [], [], [], []
        for s in range(0, len(queries), chunk):
            _, Y, _ = self._measure(queries[s : s + chunk])
            sol = self._solve(Y)
            ws.append(sol.dense(torch.float32).T)
            Yd = Y.detach().cpu().double()
            raw.append(self.design.rmatvec(Yd - Yd.mean(0)).T.float())
            conv.append(sol.converged.float())
            nnz.append(sol.nonzeros().float())
            iters.append(int(sol.epochs.max()) if len(sol.epochs) else 0)
        if not ws:
            empty = torch.zeros(0, self.num_examples)
            return empty, empty.clone(), {"converged_share": float("nan"), "mean_nonzeros": float("nan"),
                                          "max_iterations": 0}
        diag = {"converged_share": float(torch.cat(conv).mean()), "mean_nonzeros": float(torch.cat(nnz).mean()),
                "max_iterations": int(max(iters))}
        return torch.cat(ws), torch.cat(raw), diag

    def _scored(self, items: list[tuple[int, float]], include_text: bool) -> list[Scored]:
        corpus = self.store.corpus
        texts = [r.text for r in corpus.records([i for i, _ in items])] if include_text else None
        return [
            Scored(rank=r + 1, index=i, id=corpus.ids[i], score=s, text=texts[r] if texts else None)
            for r, (i, s) in enumerate(items)
        ]

    def example(self, key: int | str) -> Example:
        """A training example by index or id; KeyError when there is none."""
        corpus = self.store.corpus
        i = corpus.index_of(key) if isinstance(key, str) else key
        if not 0 <= i < len(corpus):
            raise KeyError(key)
        return Example(i, corpus.ids[i], corpus.record(i).text)

