"""The in-process query API: ``Attributor.from_store(path).attribute(prompt, completion)``.

One forward pass, K loss-drop measurements in one batched computation, one batched Lasso solve
(certified by its duality gap; sparse, so ranking runs over the support, not the n examples).
The HTTP service and the CLI both wrap this; neither re-implements any of it.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from stride.config import SolverConfig
from stride.measure import loss_drops, token_nll
from stride.model import LM, ChatRenderError, Tokens, pick_device, weights_sha256
from stride.recovery import Solution, SparseDesign, solve
from stride.result import (
    Attribution,
    Diagnostics,
    Example,
    InvalidQuery,
    Query,
    QueryTooLong,
    QueryWarning,
    Scored,
    Timing,
    TokenLoss,
    UnscorableQuery,
)
from stride.store import Store, StoreError, load_store

UNKNOWN_SHARE = 0.5  # above this share of [UNK] tokens (or any scored one) a query is text the model never saw


def serving_model(store: Store, model: str | Path | None = None, verify: bool = True) -> Path:
    """The model directory to answer with: ``model``, or the one the store was built from, checked to
    exist and (``verify``) to hold the weights the store was built from. Raises StoreError."""
    model_dir = Path(model or store.manifest["model"]["path"])
    if not model_dir.is_dir():
        raise StoreError(f"{model_dir}: the store's model directory is missing (pass model=...)")
    if verify and weights_sha256(model_dir) != store.manifest["model"]["sha256"]:
        raise StoreError(f"{model_dir}: weights differ from those the store {store.path} was built from")
    return model_dir


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
        model_dir = serving_model(store, model, verify)
        lm = LM.load(model_dir, pick_device(device), store.config.max_length)
        if lm.hidden_size != store.operators.A.shape[2]:
            width = store.operators.A.shape[2]
            raise StoreError(f"{path}: operators are for hidden size {width}, the model has {lm.hidden_size}")
        return cls(store, lm, solver)

    @property
    def num_examples(self) -> int:
        return self.store.membership.num_examples

    @property
    def window(self) -> int:
        """Tokens a query may have: the store's max_length, capped by the model's positions."""
        return self.lm.max_length

    def attribute(self, prompt: str | Query, completion: str | None = None, top_k: int = 10,
                  include_text: bool = True, span: tuple[int, int] | None = None) -> Attribution:
        """``attribute(prompt, completion)``, or ``attribute(Query(messages=...))`` for the other forms."""
        q = prompt if isinstance(prompt, Query) else Query(prompt, completion, span=span)
        return self.attribute_batch([q], top_k, include_text)[0]

    @torch.no_grad()
    def attribute_batch(self, queries: list[Query], top_k: int = 10,
                        include_text: bool = True) -> list[Attribution]:
        """All queries share one forward pass, one measurement computation and one solve; each
        query's answer is the same as it would be alone."""
        if not queries:
            return []
        t0 = time.perf_counter()
        prepared = [self.prepare(q) for q in queries]
        loss, Y, nll, t1 = self._measure([t for t, _ in prepared])
        t2 = time.perf_counter()
        sol = self._solve(Y)
        t3 = time.perf_counter()
        k = min(top_k, self.num_examples)
        nnz = sol.nonzeros()
        nll = nll.cpu()
        out = []
        for q, (tokens, warnings) in enumerate(prepared):
            shown = self._tokens(tokens, nll[q])
            out.append(Attribution.model_construct(
                loss=float(loss[q]),
                proponents=self._scored(sol.top(q, k, 1.0), include_text),
                opponents=self._scored(sol.top(q, k, -1.0), include_text),
                diagnostics=Diagnostics(
                    nonzeros=int(nnz[q]), iterations=int(sol.epochs[q]), gap=float(sol.gap[q]),
                    converged=bool(sol.converged[q]), lambda_=float(sol.lam[q]), intercept=float(sol.intercept[q])),
                tokens=shown,
                scored_text=self.lm.tokenizer.decode([t.id for t in shown if t.scored]),
                warnings=warnings,
            ))
        t4 = time.perf_counter()
        timing = Timing(forward=(t1 - t0) * 1e3, measure=(t2 - t1) * 1e3, solve=(t3 - t2) * 1e3,
                        total=(t4 - t0) * 1e3)
        for a in out:
            a.timing_ms = timing
        return out

    def prepare(self, q: Query) -> tuple[Tokens, list[QueryWarning]]:
        """Tokenise and check one query: its tokens, which are scored, and soft problems.

        Raises InvalidQuery (ids past the vocabulary, no chat template, span outside the completion),
        QueryTooLong (the scored tokens do not fit the window) or UnscorableQuery (nothing to score).
        Cheap (tokenisation only), so the service calls it before queueing a query."""
        tok, window = self.lm.tokenizer, self.window
        if q.messages is not None:
            try:
                t = self.lm.chat_tokens(q.messages, last_only=True)
            except ChatRenderError as e:
                raise InvalidQuery(str(e)) from None
            content = q.messages[-1].content
            base = t.text.find(content, t.start) if t.text is not None else -1
            first = max(t.first, 1)
            region = [(s - base, e - base) for s, e in (t.offsets or [])[first:]]
            ids, length = t.ids, len(content)
        elif q.prompt_ids is not None:
            vocab = int(self.lm.unembed.shape[0])
            for name in ("prompt_ids", "completion_ids"):
                for j, i in enumerate(getattr(q, name) or []):
                    if i >= vocab:
                        raise InvalidQuery(f"{name}[{j}] = {i} is outside the model's vocabulary (0..{vocab - 1})")
            p, c = q.prompt_ids, q.completion_ids
            if len(p) + len(c or []) > window:
                raise QueryTooLong(f"{len(p) + len(c or [])} tokens do not fit the model's window of {window}")
            if c is None:  # the prompt is scored, from its second token on
                ids, first, length = p, 1, len(p)
                region = [(j, j + 1) for j in range(1, len(p))]
            else:
                ids, first, length = p + c, max(len(p), 1), len(c)
                region = [(j, j + 1) for j in range(first - len(p), len(c))]
            base = 0
        elif q.completion is not None and q.prompt:
            p = tok(q.prompt, add_special_tokens=True)["input_ids"]
            c, offsets = self._encode(q.completion, False, q.span is not None)
            skip = max(len(p), 1)
            ids, first, length, base = p + c, skip, len(q.completion), 0
            region = offsets[skip - len(p) :]
        else:
            text = q.completion if q.completion is not None else q.prompt or ""
            ids, offsets = self._encode(text, True, q.span is not None)
            first, length, base, region = 1, len(text), 0, offsets[1:]
        scored = [True] * len(region)
        if q.span is not None:
            start, end = q.span
            if base < 0:
                raise InvalidQuery("the chat template changes the last message's text, so a span cannot be placed")
            if end > length:
                raise InvalidQuery(f"span [{start}, {end}) ends past the completion ({length} "
                                   f"{'tokens' if q.completion_ids is not None else 'characters'})")
            scored = [s < end and e > start for s, e in region]
        if not any(scored):
            raise UnscorableQuery("no token to score: " + ("the span covers none" if region else
                                  "a text without a completion needs two tokens at least; add a completion"))
        warnings: list[QueryWarning] = []
        cut = len(ids) - window
        if cut > 0:
            if cut > first - 1:
                raise QueryTooLong(f"{len(ids) - first} tokens to score do not fit the model's window of {window} "
                                   "tokens (with one token of context before them)")
            warnings.append(QueryWarning(code="truncated", detail=f"the prompt was cut to its last "
                                         f"{first - cut} of {first} tokens to fit the model's window of {window}"))
            ids, first = ids[cut:], first - cut
        unk = tok.unk_token_id
        unknown = sum(i == unk for i in ids) if unk is not None else 0
        unknown_scored = sum(i == unk for i, on in zip(ids[first:], scored, strict=True) if on) if unknown else 0
        if unknown > UNKNOWN_SHARE * len(ids) or unknown_scored:
            warnings.append(QueryWarning(code="unknown-tokens", detail=f"{unknown} of the query's {len(ids)} tokens "
                                         f"({unknown_scored} of those scored) are unknown to the model's tokenizer: "
                                         "it never saw this text, and the answer says little about it"))
        return Tokens(ids, [False] * first + scored, first), warnings

    def _encode(self, text: str, special: bool, offsets: bool) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids and each token's character range (only when a span needs them: slow tokenizers have none)."""
        tok = self.lm.tokenizer
        if not offsets:
            ids = tok(text, add_special_tokens=special)["input_ids"]
            return ids, [(0, 0)] * len(ids)
        if not getattr(tok, "is_fast", False):
            raise InvalidQuery("a character span needs a fast tokenizer (tokenizer.json) to map characters to tokens")
        enc = tok(text, add_special_tokens=special, return_offsets_mapping=True)
        return enc["input_ids"], [tuple(o) for o in enc["offset_mapping"]]

    def _tokens(self, t: Tokens, nll: torch.Tensor) -> list[TokenLoss]:
        """The completion's tokens with their losses (position j - 1 predicts token j)."""
        decode = self.lm.tokenizer.decode
        return [TokenLoss(id=t.ids[j], text=decode([t.ids[j]]), loss=float(nll[j - 1]), scored=t.scored[j])
                for j in range(t.first, len(t.ids))]

    def _measure(self, rows: list[Tokens]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
        """Query losses (Q,), signed measurements Y (K, Q), each completion token's NLL (Q, T) and
        when the forward pass ended."""
        batch = self.lm.encode(rows)
        if bool((batch.scored.sum(1) == 0).any()):
            raise UnscorableQuery("each query needs at least one scored token: a longer prompt or a completion")
        h, z = self.lm.features(batch, self.layer)
        self._sync()
        t_forward = time.perf_counter()
        targets = batch.targets.to(h.device)
        loss, Y = loss_drops(self.lm, self.ops, h, z, targets, self.solver.first_order, top_v=self.solver.top_v)
        shown = torch.full_like(batch.input_ids, -100)
        for b, r in enumerate(rows):
            shown[b, r.first - 1 : len(r.ids) - 1] = batch.input_ids[b, r.first : len(r.ids)]
        nll = token_nll(self.lm, z, shown.to(h.device))
        self._sync()
        return loss, Y * self.sign, nll, t_forward

    def _solve(self, Y: torch.Tensor) -> Solution:
        return solve(self.design, Y, self.solver.lam_ratio, self.solver.max_iter, self.solver.tol)

    @torch.no_grad()
    def score_matrix(self, queries: list[Query], chunk: int = 32,
                     ablation: bool = True) -> tuple[torch.Tensor, torch.Tensor | None, dict]:
        """Every example's score for every query, for benchmarks and scans that need whole vectors.

        Returns w (Q, n) float32 on the CPU, the no-solve ablation scores M_c^T y_c (Q, n) (the same
        signed measurements, no sparse recovery; None with ``ablation=False``, which skips its pass
        over the design), and diagnostics: converged_share, mean_nonzeros, max_iterations. O(Q n)
        memory; the service never calls it.
        """
        ws, raw, conv, nnz, iters = [], [], [], [], []
        for s in range(0, len(queries), chunk):
            _, Y, _, _ = self._measure([self.prepare(q)[0] for q in queries[s : s + chunk]])
            sol = self._solve(Y)
            ws.append(sol.dense(torch.float32).T)
            if ablation:
                Yd = Y.detach().cpu().double()
                raw.append(self.design.rmatvec(Yd - Yd.mean(0)).T.float())
            conv.append(sol.converged.float())
            nnz.append(sol.nonzeros().float())
            iters.append(int(sol.epochs.max()) if len(sol.epochs) else 0)
        if not ws:
            empty = torch.zeros(0, self.num_examples)
            return empty, empty.clone() if ablation else None, {
                "converged_share": float("nan"), "mean_nonzeros": float("nan"), "max_iterations": 0}
        diag = {"converged_share": float(torch.cat(conv).mean()), "mean_nonzeros": float(torch.cat(nnz).mean()),
                "max_iterations": int(max(iters))}
        return torch.cat(ws), torch.cat(raw) if ablation else None, diag

    def _scored(self, items: list[tuple[int, float]], include_text: bool) -> list[Scored]:
        corpus = self.store.corpus
        texts = [r.text for r in corpus.records([i for i, _ in items])] if include_text else None
        return [
            Scored.model_construct(rank=r + 1, index=i, id=corpus.ids[i], score=s, text=texts[r] if texts else None)
            for r, (i, s) in enumerate(items)
        ]

    def example(self, key: int | str) -> Example:
        """A training example by index or id; KeyError when there is none."""
        corpus = self.store.corpus
        i = corpus.index_of(key) if isinstance(key, str) else key
        if not 0 <= i < len(corpus):
            raise KeyError(key)
        return Example(index=i, id=corpus.ids[i], text=corpus.record(i).text)

