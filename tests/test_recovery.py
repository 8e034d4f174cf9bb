"""The certified working-set Lasso against scikit-learn's coordinate descent, on real membership designs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import Lasso

from stride.design import random_design
from stride.recovery import SparseDesign, duality_gap, solve

N, K, D = 300, 120, 8


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One thread (the solver's pool follows torch's count): the CI CPU is shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _planted(design: SparseDesign, Q: int, s: int, noise: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Q queries, each an s-sparse influence vector seen through M, plus an offset and noise."""
    gen = torch.Generator().manual_seed(seed)
    W = torch.zeros(design.n, Q, dtype=torch.float64)
    for q in range(Q):
        idx = torch.randperm(design.n, generator=gen)[:s]
        W[idx, q] = torch.randn(s, generator=gen, dtype=torch.float64).sign() * (1 + torch.rand(s, generator=gen))
    Y = design.dense().double() @ W + torch.linspace(-2, 2, Q, dtype=torch.float64)
    return Y + noise * torch.randn(design.K, Q, generator=gen, dtype=torch.float64), W


@pytest.fixture(scope="module")
def problem() -> tuple[SparseDesign, torch.Tensor, torch.Tensor]:
    design = SparseDesign(random_design(N, K, D, seed=0))
    Y, W = _planted(design, 3, 6, 0.05, 0)
    return design, Y, W


def _sklearn(design: SparseDesign, y: torch.Tensor, lam: float) -> tuple[np.ndarray, float]:
    """sklearn minimises 1/(2 K) ||y - Xw - b||^2 + alpha ||w||_1: alpha = lam / K."""
    X = design.dense().double().numpy()
    model = Lasso(alpha=lam / design.K, fit_intercept=True, tol=1e-14, max_iter=500_000)
    model.fit(X, y.double().numpy())
    return model.coef_, float(model.intercept_)


def _objective(design: SparseDesign, y: torch.Tensor, lam: float, w: np.ndarray) -> float:
    Mc = design.dense().double() - design.c
    r = (y - y.mean()).double() - Mc @ torch.as_tensor(w, dtype=torch.float64)
    return float(0.5 * (r**2).sum() + lam * np.abs(w).sum())


def _check_against_sklearn(design: SparseDesign, Y: torch.Tensor, sol, rel: float) -> None:
    w = sol.dense(torch.float64)
    for q in range(Y.shape[1]):
        lam = float(sol.lam[q])
        coef, intercept = _sklearn(design, Y[:, q], lam)
        scale = max(np.abs(coef).max(), 1e-12)
        np.testing.assert_allclose(w[:, q].numpy(), coef, atol=rel * scale)
        assert float(sol.intercept[q]) == pytest.approx(intercept, abs=rel * max(1.0, abs(intercept)))
        big = np.abs(coef) > 1e-2 * scale  # same support, up to tiny coefficients at the threshold
        assert np.all(w[big, q].numpy() != 0)
        # the certified gap bounds the suboptimality against sklearn's optimum
        ours, best = _objective(design, Y[:, q], lam, w[:, q].numpy()), _objective(design, Y[:, q], lam, coef)
        assert ours - best <= float(sol.gap[q]) * ours + 1e-9 * ours


@pytest.mark.parametrize("lam_ratio", [0.02, 0.1, 0.5])
def test_matches_sklearn_lasso(problem, lam_ratio: float) -> None:
    design, Y, _ = problem
    sol = solve(design, Y, lam_ratio=lam_ratio, tol=1e-10)
    assert bool(sol.converged.all()) and bool((sol.gap <= 1e-10).all())
    _check_against_sklearn(design, Y, sol, 1e-4)


@pytest.mark.parametrize(("n", "kind"), [(60, "planted"), (2_000, "planted"), (2_000, "noise"), (20_000, "planted"),
                                         (20_000, "noise")])
def test_matches_sklearn_at_several_n(n: int, kind: str) -> None:
    """Working sets (n > 4K) and the all-columns case (n <= 4K), planted sparse w and dense-noise y."""
    design = SparseDesign(random_design(n, 100, 6, seed=n))
    if kind == "planted":
        Y, _ = _planted(design, 2, 8, 0.1, n)
    else:
        Y = torch.randn(100, 2, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    sol = solve(design, Y, lam_ratio=0.2, tol=1e-9)
    assert bool(sol.converged.all())
    _check_against_sklearn(design, Y, sol, 1e-4)


def test_lambda_is_relative_to_lambda_max(problem) -> None:
    design, Y, _ = problem
    M = design.dense().double()
    Mc, yc = M - M.mean(0), Y - Y.mean(0)
    lam_max = (Mc.T @ yc).abs().amax(0)
    torch.testing.assert_close(solve(design, Y, lam_ratio=0.1, max_iter=5).lam, 0.1 * lam_max)
    # at lambda_max the solution is exactly zero and the intercept is the mean
    sol = solve(design, Y, lam_ratio=1.0)
    assert bool((sol.nonzeros() == 0).all()) and bool(sol.converged.all())
    torch.testing.assert_close(sol.intercept, Y.mean(0))


def test_recovers_the_planted_support(problem) -> None:
    design, Y, W = problem
    sol = solve(design, Y, lam_ratio=0.05, tol=1e-8)
    w = sol.dense(torch.float64)
    for q in range(Y.shape[1]):
        top = set(w[:, q].abs().topk(6).indices.tolist())
        assert top == set(W[:, q].nonzero().flatten().tolist())
        assert bool((w[:, q].sign()[list(top)] == W[list(top), q].sign()).all())


def test_batched_equals_each_column_alone() -> None:
    """A query's answer does not depend on its batch, bit for bit, with working sets and threads."""
    design = SparseDesign(random_design(30_000, 100, 6, seed=5))
    Y, _ = _planted(design, 3, 10, 0.2, 1)
    Y = torch.cat([Y, torch.randn(100, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)], 1)
    torch.set_num_threads(2)  # blocks of each pass and the queries' descents on two threads
    try:
        batched = solve(design, Y)
    finally:
        torch.set_num_threads(1)
    for q in range(Y.shape[1]):
        alone = solve(design, Y[:, q : q + 1])
        assert torch.equal(batched.indices[q], alone.indices[0])
        assert torch.equal(batched.values[q], alone.values[0])
        assert batched.intercept[q] == alone.intercept[0] and batched.gap[q] == alone.gap[0]
        assert batched.lam[q] == alone.lam[0]


def test_duality_gap_reported_small_and_true(problem) -> None:
    design, Y, _ = problem
    sol = solve(design, Y, lam_ratio=0.05, tol=1e-6)
    assert bool(sol.converged.all()) and bool((sol.gap <= 1e-6).all())
    yc = Y - Y.mean(0)
    gap = duality_gap(design, yc, sol.dense(torch.float64), sol.lam)
    w = sol.dense(torch.float64)
    primal = torch.tensor([_objective(design, Y[:, q], float(sol.lam[q]), w[:, q].numpy()) for q in range(3)])
    torch.testing.assert_close(sol.gap, gap / primal, rtol=1e-6, atol=1e-12)
    # an unconverged solve says so, and its reported gap is the true one
    early = solve(design, Y, lam_ratio=0.01, max_iter=2, tol=1e-12)
    assert early.iterations <= 3 and not bool(early.converged.any())
    w = early.dense(torch.float64)
    gap = duality_gap(design, yc, w, early.lam)
    primal = torch.tensor([_objective(design, Y[:, q], float(early.lam[q]), w[:, q].numpy()) for q in range(3)])
    torch.testing.assert_close(early.gap, gap / primal, rtol=1e-6, atol=1e-12)


def test_constant_y_gives_zero_weights() -> None:
    design = SparseDesign(random_design(50, 20, 4, seed=1))
    Y = torch.full((20, 2), 3.25)
    sol = solve(design, Y)
    assert bool((sol.nonzeros() == 0).all()) and sol.dense().abs().sum() == 0
    torch.testing.assert_close(sol.intercept, torch.full((2,), 3.25, dtype=torch.float64))
    assert bool(sol.converged.all())
    assert torch.isfinite(sol.gap).all()


def test_sparse_answer_and_top() -> None:
    design = SparseDesign(random_design(5_000, 100, 6, seed=3))
    Y, W = _planted(design, 2, 5, 0.05, 3)
    sol = solve(design, Y, lam_ratio=0.1)
    dense = sol.dense()
    assert dense.shape == (5_000, 2) and dense.dtype == torch.float32
    for q in range(2):
        assert bool((sol.indices[q][1:] > sol.indices[q][:-1]).all())
        for sign in (1.0, -1.0):
            top = sol.top(q, 3, sign)
            assert top and all(v * sign > 0 for _, v in top)
            want = [i for i in (sign * dense[:, q]).topk(3).indices.tolist() if sign * dense[i, q] > 0]
            assert [i for i, _ in top] == want


def test_full_pass_through_torch_matches_the_compiled_one() -> None:
    """The CUDA path's full pass (torch gathers), run here on the CPU, gives the same answers."""
    design = SparseDesign(random_design(20_000, 100, 6, seed=4))
    Y, _ = _planted(design, 2, 8, 0.1, 4)
    ref = solve(design, Y, tol=1e-9)
    design.ids_device = torch.from_numpy(design.ids.astype(np.int32))
    via_torch = solve(design, Y, tol=1e-9)
    for q in range(2):
        assert torch.equal(ref.indices[q], via_torch.indices[q])
        torch.testing.assert_close(ref.values[q], via_torch.values[q], rtol=0, atol=1e-8)
    assert bool(via_torch.converged.all())


def test_matvec_and_rmatvec_are_the_centred_design() -> None:
    design = SparseDesign(random_design(400, 30, 5, seed=6))
    Mc = design.dense().double() - design.c
    w, r = torch.randn(400, 3, dtype=torch.float64), torch.randn(30, 2, dtype=torch.float64)
    torch.testing.assert_close(design.matvec(w), Mc @ w)
    torch.testing.assert_close(design.rmatvec(r), Mc.T @ r)
