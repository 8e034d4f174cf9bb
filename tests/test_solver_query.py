"""The Attributor's use of the solver, with the model and measurements stubbed: the measurement sign,
ranking over the sparse support, score_matrix, and batch independence."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import stride.query as query_mod
from stride.config import BuildConfig, Query, SolverConfig
from stride.design import random_design
from stride.query import Attributor
from stride.recovery import SparseDesign, solve

N, K, D = 3000, 60, 5


class _LM:
    device = torch.device("cpu")
    tokenizer = SimpleNamespace(decode=lambda ids: "")

    def encode(self, rows):
        Q = len(rows)
        return SimpleNamespace(scored=torch.ones(Q, 1), targets=torch.zeros(Q, 1, dtype=torch.long),
                               input_ids=torch.zeros(Q, 2, dtype=torch.long), prompts=[r.name for r in rows],
                               device=self.device)

    def features(self, batch, layer):
        return batch, None


class _Corpus:
    ids = [f"doc{i}" for i in range(N)]

    def records(self, rows):
        return [SimpleNamespace(text=f"text {i}") for i in rows]


class _Ops:
    def to(self, device):
        return self


@pytest.fixture(scope="module")
def Y() -> torch.Tensor:
    """Four queries' measurements: planted sparse effects seen through the design, plus noise."""
    membership = random_design(N, K, D, seed=1)
    design = SparseDesign(membership)
    gen = torch.Generator().manual_seed(0)
    W = torch.zeros(N, 4, dtype=torch.float64)
    for q in range(4):
        W[torch.randperm(N, generator=gen)[:5], q] = torch.randn(5, generator=gen, dtype=torch.float64)
    return (design.matvec(W) + 0.05 * torch.randn(K, 4, generator=gen, dtype=torch.float64)).float()


def _attributor(fit: str, Y: torch.Tensor, monkeypatch) -> Attributor:
    """Queries are named "q0".."q3"; the stubbed measurement returns their columns of Y."""
    def loss_drops(lm, ops, batch, z, targets, first_order=False, top_v=None):
        cols = [int(p[1:]) for p in batch.prompts]
        return torch.zeros(len(cols)), Y[:, cols]

    monkeypatch.setattr(query_mod, "loss_drops", loss_drops)
    monkeypatch.setattr(query_mod, "token_nll", lambda lm, z, targets: torch.zeros(targets.shape))
    monkeypatch.setattr(Attributor, "prepare", lambda self, q: (
        SimpleNamespace(name=q.completion, ids=[0, 0], scored=[False, True], first=1), []))
    store = SimpleNamespace(config=BuildConfig(fit=fit, layer=0), membership=random_design(N, K, D, seed=1),
                            corpus=_Corpus(), operators=_Ops())
    return Attributor(store, _LM(), SolverConfig(tol=1e-8, max_iter=10_000))


def _queries(*qs: int) -> list[Query]:
    return [Query("", f"q{q}") for q in qs]


def test_leave_out_stores_flip_the_measurements(Y, monkeypatch) -> None:
    add = _attributor("fidelity", Y, monkeypatch)
    out = _attributor("revert", Y, monkeypatch)
    assert add.sign == 1.0 and out.sign == -1.0
    w_add, raw_add, diag = add.score_matrix(_queries(0, 1, 2, 3), chunk=3)
    w_out, raw_out, _ = out.score_matrix(_queries(0, 1, 2, 3), chunk=3)
    assert w_add.shape == raw_add.shape == (4, N) and w_add.dtype == torch.float32
    torch.testing.assert_close(w_out, -w_add)  # the Lasso is odd in y
    torch.testing.assert_close(raw_out, -raw_add)
    w_only, no_raw, _ = add.score_matrix(_queries(0, 1, 2, 3), chunk=3, ablation=False)  # what scans call
    assert no_raw is None
    torch.testing.assert_close(w_only, w_add)
    assert diag["converged_share"] == 1.0 and diag["mean_nonzeros"] > 0 and diag["max_iterations"] > 0
    # the scores are the solver's on the signed measurements
    sol = solve(add.design, Y, add.solver.lam_ratio, add.solver.max_iter, add.solver.tol)
    torch.testing.assert_close(w_add, sol.dense().T)


def test_attribution_ranks_the_support_and_is_batch_independent(Y, monkeypatch) -> None:
    attr = _attributor("revert", Y, monkeypatch)
    w, _, _ = attr.score_matrix(_queries(0, 1, 2, 3))
    batch = attr.attribute_batch(_queries(2, 0, 3), top_k=3)
    for a, q in zip(batch, (2, 0, 3), strict=True):
        alone = attr.attribute_batch(_queries(q), top_k=3)[0]
        assert [(s.index, s.score) for s in a.proponents] == [(s.index, s.score) for s in alone.proponents]
        assert a.diagnostics == alone.diagnostics
        assert set(a.diagnostics.keys()) == {"nonzeros", "iterations", "gap", "converged", "lambda", "intercept"}
        assert set(a.timing_ms.keys()) == {"forward", "measure", "solve", "total"}
        pos = [i for i in w[q].topk(3).indices.tolist() if w[q, i] > 0]
        assert [s.index for s in a.proponents] == pos
        assert all(s.score > 0 for s in a.proponents) and all(s.score < 0 for s in a.opponents)
        assert a.proponents[0].id == f"doc{pos[0]}" and a.proponents[0].text == f"text {pos[0]}"
        assert a.diagnostics["nonzeros"] == int((w[q] != 0).sum()) and a.diagnostics["converged"]
