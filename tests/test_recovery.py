"""The batched FISTA Lasso against scikit-learn's coordinate descent, on a real membership design."""

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
    """Sparse CSR products on 2 OpenMP threads crawl on a loaded CPU (~2000x); see the report."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def problem() -> tuple[SparseDesign, torch.Tensor, torch.Tensor]:
    """Three queries, each a 6-sparse influence vector seen through M, plus an offset and noise."""
    design = SparseDesign(random_design(N, K, D, seed=0))
    gen = torch.Generator().manual_seed(0)
    W = torch.zeros(N, 3)
    for q in range(3):
        idx = torch.randperm(N, generator=gen)[:6]
        W[idx, q] = torch.randn(6, generator=gen).sign() * (1 + torch.rand(6, generator=gen))
    M = design.M.to_dense()
    Y = M @ W + torch.tensor([0.5, -2.0, 0.0]) + 0.05 * torch.randn(K, 3, generator=gen)
    return design, Y, W


def _sklearn(design: SparseDesign, y: torch.Tensor, lam: float) -> tuple[np.ndarray, float]:
    X = design.M.to_dense().double().numpy()
    model = Lasso(alpha=lam / design.K, fit_intercept=True, tol=1e-12, max_iter=200_000)
    model.fit(X, y.double().numpy())
    return model.coef_, float(model.intercept_)


@pytest.mark.parametrize("lam_ratio", [0.02, 0.1, 0.5])
def test_matches_sklearn_lasso(problem, lam_ratio: float) -> None:
    design, Y, _ = problem
    sol = solve(design, Y, lam_ratio=lam_ratio, max_iter=20_000, tol=1e-6)
    assert bool(sol.converged.all())
    for q in range(Y.shape[1]):
        coef, intercept = _sklearn(design, Y[:, q], float(sol.lam[q]))
        scale = np.abs(coef).max()
        np.testing.assert_allclose(sol.w[:, q].numpy(), coef, atol=1e-4 * scale)
        assert float(sol.intercept[q]) == pytest.approx(intercept, abs=1e-4 * max(1.0, abs(intercept)))
        # same support, up to tiny coefficients at the threshold
        big = np.abs(coef) > 1e-2 * scale
        assert np.all(sol.w[big, q].numpy() != 0)


def test_lambda_is_relative_to_lambda_max(problem) -> None:
    design, Y, _ = problem
    M = design.M.to_dense()
    Mc, yc = M - M.mean(0), Y - Y.mean(0)
    lam_max = (Mc.T @ yc).abs().amax(0)
    torch.testing.assert_close(solve(design, Y, lam_ratio=0.1, max_iter=5).lam, 0.1 * lam_max)
    # at lambda_max the solution is exactly zero and the intercept is the mean
    sol = solve(design, Y, lam_ratio=1.0, max_iter=200)
    assert bool((sol.w == 0).all())
    torch.testing.assert_close(sol.intercept, Y.mean(0))


def test_recovers_the_planted_support(problem) -> None:
    design, Y, W = problem
    sol = solve(design, Y, lam_ratio=0.05, max_iter=5000, tol=1e-8)
    for q in range(Y.shape[1]):
        top = set(sol.w[:, q].abs().topk(6).indices.tolist())
        assert top == set(W[:, q].nonzero().flatten().tolist())
        assert bool((sol.w[:, q].sign()[list(top)] == W[list(top), q].sign()).all())


def test_batched_equals_each_column_alone(problem) -> None:
    design, Y, _ = problem
    batched = solve(design, Y, lam_ratio=0.05, max_iter=20_000, tol=1e-6)
    for q in range(Y.shape[1]):
        alone = solve(design, Y[:, q : q + 1], lam_ratio=0.05, max_iter=20_000, tol=1e-6)
        torch.testing.assert_close(batched.w[:, q], alone.w[:, 0], rtol=0, atol=1e-4)
        torch.testing.assert_close(batched.intercept[q], alone.intercept[0], rtol=0, atol=1e-4)
        torch.testing.assert_close(batched.lam[q], alone.lam[0])


def test_duality_gap_reported_small_and_true(problem) -> None:
    design, Y, _ = problem
    sol = solve(design, Y, lam_ratio=0.05, max_iter=5000, tol=1e-6)
    assert bool(sol.converged.all()) and sol.iterations < 5000
    assert bool((sol.gap <= 1e-6).all())
    # the reported gap bounds the true suboptimality: the sklearn optimum is not much better
    yc = Y - Y.mean(0)
    Mc = design.M.to_dense().double() - design.col_mean.double()

    def objective(q: int, w: torch.Tensor) -> float:
        r = yc[:, q].double() - Mc @ w.double()
        return float(0.5 * (r**2).sum() + sol.lam[q].double() * w.abs().sum())

    for q in range(Y.shape[1]):
        coef, _ = _sklearn(design, Y[:, q], float(sol.lam[q]))
        ours = objective(q, sol.w[:, q])
        best = objective(q, torch.from_numpy(coef))
        half = float(0.5 * (yc[:, q] ** 2).sum())
        assert ours - best <= 1e-5 * half + 1e-6
    # an unconverged solve says so
    early = solve(design, Y, lam_ratio=0.01, max_iter=3, tol=1e-12)
    assert early.iterations == 3 and not bool(early.converged.any())
    gap = duality_gap(design, yc, early.w, early.lam) / (0.5 * (yc**2).sum(0))
    torch.testing.assert_close(early.gap, gap)


def test_constant_y_gives_zero_weights() -> None:
    design = SparseDesign(random_design(50, 20, 4, seed=1))
    Y = torch.full((20, 2), 3.25)
    sol = solve(design, Y)
    assert bool((sol.w == 0).all())
    torch.testing.assert_close(sol.intercept, torch.full((2,), 3.25))
    assert bool(sol.converged.all())
    assert torch.isfinite(sol.gap).all()


def test_working_set_matches_full_solve() -> None:
    """Large n: the working-set path (KKT-checked) reaches the full FISTA solution."""
    n, K, Q = 6000, 100, 3
    design = SparseDesign(random_design(n, K, 5, seed=3))
    gen = torch.Generator().manual_seed(0)
    w_true = torch.zeros(n, Q)
    w_true[torch.randint(n, (8, Q), generator=gen), torch.arange(Q)] = 1.0
    Y = design.M @ w_true + 0.05 * torch.randn(K, Q, generator=gen)
    ws = solve(design, Y, 0.2, 5000, 1e-5, working_set=2 * K)
    full = solve(design, Y, 0.2, 5000, 1e-5, working_set=n)
    assert bool(ws.converged.all()) and bool(full.converged.all())
    assert torch.allclose(ws.w, full.w, atol=1e-3 * float(full.w.abs().max()))
    assert torch.allclose(ws.intercept, full.intercept, atol=1e-3)
