"""The scan's aggregation against a direct loop over queries, chunking, and resume from its state."""

from __future__ import annotations

import numpy as np
import pytest

from stride.scan import ScanAccumulator, aggregate


def _direct(w: np.ndarray, top_k: int, keep: int) -> dict:
    """The per-example aggregates written as plainly as possible: loops over queries and examples."""
    q, n = w.shape
    pos, neg, count = np.zeros(n), np.zeros(n), np.zeros(n, dtype=int)
    best: list[list[tuple[float, int]]] = [[] for _ in range(n)]
    for i in range(q):
        ranked = sorted(range(n), key=lambda j: -w[i, j])[:top_k]
        for j in ranked:
            if w[i, j] > 0:
                count[j] += 1
        for j in range(n):
            if w[i, j] > 0:
                pos[j] += w[i, j]
                best[j].append((float(w[i, j]), i))
            else:
                neg[j] += w[i, j]
    best = [sorted(b, key=lambda t: (-t[0], t[1]))[:keep] for b in best]
    return {"positive": pos, "negative": neg, "top_count": count, "best": best}


def _sparse_scores(rng: np.random.Generator, q: int, n: int) -> np.ndarray:
    w = rng.normal(size=(q, n)).astype(np.float32)
    w[rng.random((q, n)) < 0.7] = 0.0  # Lasso solutions are sparse: most scores are exactly 0
    return w


@pytest.mark.parametrize("chunks", [1, 3, 7])
def test_matches_direct_loop_whatever_the_chunking(chunks: int) -> None:
    rng = np.random.default_rng(0)
    w = _sparse_scores(rng, 21, 40)
    acc = ScanAccumulator(40, top_k=4, keep=3)
    for part in np.array_split(w, chunks):
        acc.add(part)
    ref = _direct(w, 4, 3)
    assert acc.queries == 21
    np.testing.assert_allclose(acc.positive, ref["positive"], rtol=1e-6)
    np.testing.assert_allclose(acc.negative, ref["negative"], rtol=1e-6)
    np.testing.assert_array_equal(acc.top_count, ref["top_count"])
    for j in range(40):
        got = acc.row(j).queries
        assert [q for q, _ in got] == [q for _, q in ref["best"][j]]
        np.testing.assert_allclose([s for _, s in got], [s for s, _ in ref["best"][j]], rtol=1e-6)


def test_ranking_and_resume_from_state() -> None:
    rng = np.random.default_rng(1)
    w = _sparse_scores(rng, 10, 30)
    w[:, 5] = 2.0  # example 5 supports every query: first in the ranking, a top-k proponent of all 10
    whole = aggregate(w, top_k=3)
    assert whole.ranking()[0] == 5 and whole.row(5).top_count == 10
    assert np.all(np.diff(whole.positive[whole.ranking()]) <= 0)
    first = ScanAccumulator(30, top_k=3)
    first.add(w[:4])
    resumed = ScanAccumulator.from_state({k: v.copy() for k, v in first.state_dict().items()})
    resumed.add(w[4:])
    for key, value in whole.state_dict().items():
        np.testing.assert_array_equal(resumed.state_dict()[key], value)


def test_wrong_width_is_refused() -> None:
    with pytest.raises(ValueError, match=r"\(queries, 30\)"):
        ScanAccumulator(30).add(np.zeros((2, 29)))
