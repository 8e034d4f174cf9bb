"""Measurement helpers: peak memory, latency percentiles, quality metrics (LDS, planted recall)."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


class PeakRSS:
    """Peak resident set size above the level at entry, sampled every 10 ms by a thread.

    Python's tracemalloc does not see torch's allocations, so the process RSS is what is measured.
    """

    def __init__(self, interval: float = 0.01):
        self.interval, self.peak, self.start = interval, 0, 0
        self._stop = threading.Event()

    def __enter__(self) -> PeakRSS:
        self.start = self.peak = rss_bytes()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.interval)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, rss_bytes())

    @property
    def delta_mb(self) -> float:
        return (self.peak - self.start) / 2**20


def time_calls(fn, items: list, warmup: int = 2) -> list[float]:
    """Wall time (ms) of ``fn(item)`` per item, after ``warmup`` untimed calls."""
    for it in items[:warmup]:
        fn(it)
    out = []
    for it in items:
        t = time.perf_counter()
        fn(it)
        out.append((time.perf_counter() - t) * 1e3)
    return out


def percentiles(ms: list[float]) -> dict[str, float]:
    if not ms:
        return {"p50_ms": None, "p95_ms": None, "timed_queries": 0}
    a = np.asarray(ms)
    return {"p50_ms": float(np.percentile(a, 50)), "p95_ms": float(np.percentile(a, 95)), "timed_queries": len(ms)}


def dir_bytes(path: Path, exclude: tuple[str, ...] = ()) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file() and p.name not in exclude)


def lds(scores: torch.Tensor, masks: torch.Tensor, losses: torch.Tensor) -> np.ndarray:
    """Per query: Spearman over retrains between sum_{i in D_s} w_i and -L_s(q).

    scores (Q, n), masks (S, n), losses (S, Q). A query whose predictions are constant over the
    retrains (e.g. an all-zero score vector) gets 0, not NaN.
    """
    pred = (masks.double() @ scores.double().T).numpy()  # (S, Q)
    target = (-losses.double()).numpy()
    out = np.zeros(pred.shape[1])
    for q in range(pred.shape[1]):
        if np.ptp(pred[:, q]) > 0 and np.ptp(target[:, q]) > 0:
            out[q] = spearmanr(pred[:, q], target[:, q]).statistic
    return out


def split_rows(setting, split: str = "report") -> slice:
    """Retrain rows of a split: the last ``tune_retrains`` choose hyper-parameters, the rest are reported.

    Kept apart so that no reported LDS comes from retrains that a knob was tuned on.
    """
    cut = setting.retrains - setting.tune_retrains
    if split == "report":
        return slice(0, cut)
    if split == "tune":
        return slice(cut, setting.retrains)
    raise ValueError(f"split must be 'report' or 'tune', not {split!r}")


def lds_split(scores: torch.Tensor, gt: dict, setting, split: str = "report") -> np.ndarray:
    """Per-query LDS on one split of the ground truth (``gt`` from ``bench.groundtruth.ground_truth``)."""
    rows = split_rows(setting, split)
    return lds(scores, gt["masks"][rows], gt["losses"][rows])


def planted_recall(scores: torch.Tensor, support: list[list[int]], ks=(1, 5)) -> dict[str, float]:
    """recall@k of each query's supporting documents among its top-k proponents (score > 0), MRR; over
    the queries that have supporting documents (the contamination setting's absent facts have none)."""
    order = torch.argsort(scores, dim=1, descending=True, stable=True)
    rec = {k: 0.0 for k in ks}
    mrr = 0.0
    for q, sup in enumerate(support):
        if not sup:
            continue
        ranked = order[q][scores[q, order[q]] > 0].tolist()
        s = set(sup)
        for k in ks:
            rec[k] += len(s & set(ranked[:k])) / min(len(s), k)
        first = next((r for r, i in enumerate(ranked) if i in s), None)
        mrr += 0.0 if first is None else 1.0 / (first + 1)
    n = max(1, sum(1 for sup in support if sup))
    return {**{f"recall@{k}": v / n for k, v in rec.items()}, "mrr": mrr / n}
