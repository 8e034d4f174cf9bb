"""The in-process query API: ``Attributor.from_store(path).attribute(prompt, completion)``.

One forward pass, K loss-drop measurements in one batched computation, one batched Lasso solve.
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
from stride.recovery import SparseDesign, solve
from stride.store import Store, StoreError, load_store


class Attributor:
    def __init__(self, store: Store, lm: LM, solver: SolverConfig | None = None):
        self.store, self.lm = store, lm
        self.solver = solver or SolverConfig()
        self.layer = int(store.config.layer)  # resolved at build time
        self.ops = store.operators.to(lm.device)
        self.design = SparseDesign(store.membership, lm.device)

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
        """All queries share one forward pass, one measurement computation and one solve."""
        if not queries:
            return []
        sync = torch.cuda.synchronize if self.lm.device.type == "cuda" else (lambda: None)
        t0 = time.perf_counter()
        records = [Record("query", q.prompt if q.completion else "", q.completion or q.prompt) for q in queries]
        batch = self.lm.encode(records)
        if bool((batch.scored.sum(1) == 0).any()):
            raise ValueError("each query needs at least one scored token: a longer prompt or a completion")
        h, z = self.lm.features(batch, self.layer)
        sync()
        t1 = time.perf_counter()
        loss, Y = loss_drops(self.lm, self.ops, h, z, batch.targets.to(h.device), self.solver.first_order)
        sync()
        t2 = time.perf_counter()
        sol = solve(self.design, Y, self.solver.lam_ratio, self.solver.max_iter, self.solver.tol)
        sync()
        t3 = time.perf_counter()
        k = min(top_k, self.num_examples)
        top_pos = torch.topk(sol.w, k, dim=0)
        top_neg = torch.topk(-sol.w, k, dim=0)
        nnz = (sol.w != 0).sum(0)
        out = []
        for q in range(len(queries)):
            pro = _nonzero(top_pos.values[:, q], top_pos.indices[:, q], 1.0)
            opp = _nonzero(top_neg.values[:, q], top_neg.indices[:, q], -1.0)
            out.append(
                Attribution(
                    loss=float(loss[q]),
                    proponents=self._scored(pro, include_text),
                    opponents=self._scored(opp, include_text),
                    diagnostics={
                        "nonzeros": int(nnz[q]), "iterations": sol.iterations,
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
        if isinstance(key, str):
            if key not in corpus._row:
                raise KeyError(key)
            i = corpus.index_of(key)
        else:
            i = key
        if not 0 <= i < len(corpus):
            raise KeyError(key)
        return Example(i, corpus.ids[i], corpus.record(i).text)


def _nonzero(values: torch.Tensor, indices: torch.Tensor, sign: float) -> list[tuple[int, float]]:
    """(index, signed score) of the strictly positive entries of a top-k."""
    return [(i, sign * v) for v, i in zip(values.tolist(), indices.tolist(), strict=True) if v > 0]
