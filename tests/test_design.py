"""The subset design: a left-d-regular membership matrix, deterministic in its seed."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stride.design import Membership, from_subsets, random_design


def _check_regular(m: Membership, n: int, K: int, d: int) -> torch.Tensor:
    assert m.num_examples == n and m.num_subsets == K and m.memberships == d
    assert m.crow[0] == 0 and m.crow[-1] == n * d and bool((m.crow[1:] >= m.crow[:-1]).all())
    dense = m.dense()
    assert dense.shape == (K, n)
    assert set(dense.unique().tolist()) <= {0.0, 1.0}  # a duplicate entry would sum to 2
    assert torch.equal(dense.sum(0), torch.full((n,), float(d)))  # each example in exactly d subsets
    for k in range(K):
        mem = m.members(k)
        assert bool((mem[1:] > mem[:-1]).all())  # increasing, hence distinct
        assert torch.equal(dense[k].nonzero().flatten(), mem)
    assert torch.equal(m.sizes().float(), dense.sum(1))
    return dense


@pytest.mark.parametrize(("n", "K", "d"), [(500, 50, 5), (37, 10, 10), (64, 128, 1), (3000, 4096, 3)])
def test_each_example_in_exactly_d_distinct_subsets(n: int, K: int, d: int) -> None:
    # the last case is drawn in several chunks (chunk = 2**22 // K rows)
    _check_regular(random_design(n, K, d, seed=1), n, K, d)


def test_deterministic_per_seed_and_seeds_differ() -> None:
    a, b, c = (random_design(400, 40, 6, seed=s) for s in (3, 3, 4))
    assert torch.equal(a.crow, b.crow) and torch.equal(a.col, b.col)
    assert not (torch.equal(a.crow, c.crow) and torch.equal(a.col, c.col))


def test_subset_sizes_near_n_d_over_k() -> None:
    n, K, d = 4000, 100, 10
    sizes = random_design(n, K, d, seed=0).sizes().float()
    mean = n * d / K  # 400; each size is ~Binomial(n, d/K), std ~19
    assert sizes.mean().item() == pytest.approx(mean)
    std = (n * (d / K) * (1 - d / K)) ** 0.5
    assert (sizes - mean).abs().max().item() < 5 * std
    assert sizes.std().item() == pytest.approx(std, rel=0.35)


def test_every_subset_pair_is_balanced_in_expectation() -> None:
    """Memberships are uniform: each subset is picked about equally often across many examples."""
    n, K, d = 20000, 20, 4
    dense = random_design(n, K, d, seed=7).dense()
    freq = dense.sum(1) / n
    assert torch.allclose(freq, torch.full((K,), d / K), atol=0.02)
    # and d distinct subsets are not correlated in pairs: co-membership ~ d(d-1)/(K(K-1))
    co = (dense @ dense.T / n).fill_diagonal_(0)
    expect = d * (d - 1) / (K * (K - 1))
    assert (co[~torch.eye(K, dtype=torch.bool)] - expect).abs().max() < 0.01


def test_sparse_matches_dense() -> None:
    m = random_design(50, 12, 3, seed=2)
    w = torch.randn(50, 2)
    torch.testing.assert_close(m.sparse() @ w, m.dense() @ w)


@pytest.mark.parametrize(("K", "d"), [(5, 6), (5, 0)])
def test_invalid_memberships(K: int, d: int) -> None:
    with pytest.raises(ValueError, match="memberships"):
        random_design(10, K, d, seed=0)


def _argsort_rows(m: Membership) -> torch.Tensor:
    """The former O(n log n) subsets_of, as a reference."""
    rows = torch.repeat_interleave(torch.arange(m.num_subsets), m.sizes())
    return rows[torch.argsort(m.col, stable=True)].reshape(m.num_examples, -1)


@pytest.mark.parametrize(("n", "K", "d"), [(500, 50, 5), (70_000, 300, 4), (200_000, 1000, 10)])
def test_rows_and_csr_conversions_are_exact(n: int, K: int, d: int) -> None:
    """The O(n d) blocked conversions against the argsort ones, over several blocks of examples;
    the last case takes the large-design draw (n K > 2^27)."""
    m = random_design(n, K, d, seed=2)
    if n <= 500:
        _check_regular(m, n, K, d)
    rows = m.subsets_of()
    assert rows.dtype == torch.int32 and torch.equal(rows.long(), _argsort_rows(m))
    assert bool((rows[:, 1:] > rows[:, :-1]).all())  # d distinct subsets, increasing
    assert np.array_equal(m.rows(np.uint16), rows.numpy())
    again = from_subsets(rows.flip(1), K)  # any order within a row gives the same CSR
    assert torch.equal(again.crow, m.crow) and torch.equal(again.col, m.col)


def test_large_draw_is_uniform_and_deterministic() -> None:
    n, K, d = 150_000, 1000, 10  # n K > 2^27: the rejection draw
    a, b, c = (random_design(n, K, d, seed=s) for s in (1, 1, 2))
    assert torch.equal(a.col, b.col) and torch.equal(a.crow, b.crow)
    assert not torch.equal(a.col, c.col)
    sizes = a.sizes().float()
    std = (n * (d / K) * (1 - d / K)) ** 0.5  # ~37.6 around 1500
    assert (sizes - n * d / K).abs().max().item() < 5 * std
    assert sizes.std().item() == pytest.approx(std, rel=0.2)


def test_rows_rejects_a_design_that_is_not_left_regular() -> None:
    m = random_design(50, 12, 3, seed=2)
    broken = Membership(m.crow.clone(), m.col.clone(), 50)
    broken.col[0] = broken.col[1]  # example col[0] loses a subset, col[1] gains a duplicate
    with pytest.raises(ValueError, match="exactly 3 subsets"):
        broken.rows()
