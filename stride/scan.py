"""Corpus-wide aggregation of many queries' attributions: which examples drive a whole behaviour.

One query asks "why did the model say this?"; a scan asks it for a set of queries (every trigger
prompt of a suspected backdoor, every item of a benchmark) and sums, per training example, what the
queries say about it. Memory is O(n * keep) however many queries are added, so a scan of any length
runs in bounded memory, and its state round-trips through ``state_dict`` for resuming.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from stride.config import _arg


@dataclass
class ScanConfig:
    """Options of ``stride scan`` and ``stride select`` (the CLI is generated from these fields)."""

    top_k: int = _arg(10, "Top proponents per query counted and listed.")
    queries_per_example: int = _arg(5, "Queries listed per example (those it supports most).")
    chunk: int = _arg(32, "Queries attributed together (memory: chunk x n scores).")


@dataclass
class ContaminationConfig:
    """Options of ``stride scan --contamination`` only (``stride.ngrams`` has the index and the rule)."""

    contamination: bool = _arg(False, "Check every query as a benchmark item (prompt = question, completion = "
                                      "answer): flagged when a top-k proponent holds it; writes contamination.jsonl.")
    ngram: int = _arg(8, "Words per n-gram of the overlap index (STORE.ngrams-N.npz beside the store, built once).")
    overlap: float = _arg(0.5, "Share of an item's n-grams a document must have, with the answer's words "
                               "verbatim, to hold the item.")


@dataclass
class ExampleAggregate:
    """One example's row of a scan."""

    index: int
    positive: float  # sum over queries of its positive scores (how much it lowered their losses)
    negative: float  # sum of its negative scores (<= 0: how much it raised them)
    top_count: int  # number of queries where it is among the top-k proponents
    queries: list[tuple[int, float]]  # the query indices it supports most, with its score there


class ScanAccumulator:
    """Per-example sums over queries, added chunk by chunk as (Q, n) score rows."""

    def __init__(self, n: int, top_k: int = 10, keep: int = 5):
        self.n, self.top_k, self.keep = n, top_k, keep
        self.positive = np.zeros(n)
        self.negative = np.zeros(n)
        self.top_count = np.zeros(n, dtype=np.int64)
        self.best_score = np.zeros((n, keep), dtype=np.float32)  # 0 = empty: only positive scores are kept
        self.best_query = np.full((n, keep), -1, dtype=np.int64)
        self.queries = 0

    def add(self, scores: torch.Tensor | np.ndarray) -> None:
        """Rows are the next queries' scores over all n examples (query indices continue from the last add)."""
        w = scores.detach().cpu().numpy() if isinstance(scores, torch.Tensor) else np.asarray(scores)
        w = w.astype(np.float32, copy=False)
        if w.ndim != 2 or w.shape[1] != self.n:
            raise ValueError(f"scores must be (queries, {self.n}), got {tuple(w.shape)}")
        q = w.shape[0]
        if q == 0:
            return
        self.positive += np.clip(w, 0, None).sum(0, dtype=np.float64)
        self.negative += np.clip(w, None, 0).sum(0, dtype=np.float64)
        k = min(self.top_k, self.n)
        top = np.argpartition(-w, k - 1, axis=1)[:, :k]  # each query's top-k, positive scores only
        hit = np.take_along_axis(w, top, 1) > 0
        np.add.at(self.top_count, top[hit], 1)
        # merge each example's kept best with this chunk's scores, keep the largest `keep`
        scores_all = np.concatenate([self.best_score, np.clip(w.T, 0, None)], axis=1)
        ids_all = np.concatenate([self.best_query, np.broadcast_to(np.arange(self.queries, self.queries + q),
                                                                    (self.n, q))], axis=1)
        pick = np.argsort(-scores_all, axis=1, kind="stable")[:, : self.keep]
        self.best_score = np.take_along_axis(scores_all, pick, 1)
        self.best_query = np.where(self.best_score > 0, np.take_along_axis(ids_all, pick, 1), -1)
        self.queries += q

    def ranking(self) -> np.ndarray:
        """Example indices, most positive aggregate first (ties: more top-k appearances, then index)."""
        return np.lexsort((np.arange(self.n), -self.top_count, -self.positive))

    def row(self, i: int) -> ExampleAggregate:
        qs = [(int(q), float(s)) for q, s in zip(self.best_query[i], self.best_score[i], strict=True) if q >= 0]
        return ExampleAggregate(int(i), float(self.positive[i]), float(self.negative[i]), int(self.top_count[i]), qs)

    def state_dict(self) -> dict[str, np.ndarray]:
        return {"positive": self.positive, "negative": self.negative, "top_count": self.top_count,
                "best_score": self.best_score, "best_query": self.best_query,
                "meta": np.array([self.n, self.top_k, self.keep, self.queries], dtype=np.int64)}

    @classmethod
    def from_state(cls, state: dict[str, np.ndarray]) -> ScanAccumulator:
        n, top_k, keep, queries = (int(x) for x in state["meta"])
        acc = cls(n, top_k, keep)
        acc.positive, acc.negative = state["positive"].copy(), state["negative"].copy()
        acc.top_count = state["top_count"].copy()
        acc.best_score, acc.best_query = state["best_score"].copy(), state["best_query"].copy()
        acc.queries = queries
        return acc


def select_indices(acc: ScanAccumulator, keep: float) -> np.ndarray:
    """The ``keep`` share of examples with the most net influence (positive + negative sums) on the
    scanned queries, in corpus order: opponents (net < 0) are dropped first, then the examples the
    queries did not touch (net 0; ties in corpus order)."""
    net = acc.positive + acc.negative
    return np.sort(np.lexsort((np.arange(acc.n), -net))[: max(1, round(keep * acc.n))])


def aggregate(scores: torch.Tensor | np.ndarray, top_k: int = 10, keep: int = 5) -> ScanAccumulator:
    """A whole (Q, n) score matrix at once (benchmarks; the CLI adds chunk by chunk)."""
    acc = ScanAccumulator(scores.shape[1], top_k, keep)
    acc.add(scores)
    return acc
