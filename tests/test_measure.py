"""Loss-drop measurements against a direct loop over operators."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _tiny import write_model

from stride.corpus import Record
from stride.measure import loss_drops, query_losses
from stride.model import LM
from stride.operators import SteeringOperators

LAYER, RANK, K = 0, 4, 7
QUERIES = [
    Record("q0", "the old farmer crossed", " the green river ."),  # scored positions start mid-row
    Record("q1", "", "a small boat painted the window of the market ."),  # longest row
    Record("q2", "a", " song ."),
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> tuple[LM, SteeringOperators, torch.Tensor, torch.Tensor, torch.Tensor]:
    lm = LM.load(write_model(tmp_path_factory.mktemp("m") / "model", "gpt2", seed=3), "cpu")
    batch = lm.encode(QUERIES)
    h, z = lm.features(batch, LAYER)
    ops = SteeringOperators(lm.hidden_size, RANK, K)
    ops.init_basis(h[batch.attention_mask.bool()], seed=0)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        ops.A.copy_(0.5 * torch.randn(K, RANK, lm.hidden_size, generator=gen))
    return lm, ops, h, z, batch.targets


def _direct(lm: LM, ops: SteeringOperators, h, z, targets) -> tuple[torch.Tensor, torch.Tensor]:
    """Each query's loss, and under each operator, computed one at a time with no compaction."""
    base = torch.zeros(len(QUERIES))
    drops = torch.zeros(K, len(QUERIES))
    for q in range(len(QUERIES)):
        keep = targets[q] != -100
        tgt = targets[q][keep]
        base[q] = F.cross_entropy(lm.logits(z[q])[keep], tgt)
        for k in range(K):
            shifted = z[q] + ops.project(h[q]) @ ops.A[k]
            drops[k, q] = base[q] - F.cross_entropy(lm.logits(shifted)[keep], tgt)
    return base, drops


def test_query_loss_is_the_models_completion_loss(setup) -> None:
    lm, _, _, z, targets = setup
    batch = lm.encode(QUERIES)
    with torch.no_grad():
        logits = lm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    for q in range(len(QUERIES)):
        want = F.cross_entropy(logits[q][targets[q] != -100], targets[q][targets[q] != -100])
        torch.testing.assert_close(query_losses(lm, z, targets)[q], want, rtol=1e-5, atol=1e-5)


def test_exact_equals_a_direct_loop(setup) -> None:
    lm, ops, h, z, targets = setup
    base, Y = loss_drops(lm, ops, h, z, targets)
    want_base, want = _direct(lm, ops, h, z, targets)
    assert Y.shape == (K, len(QUERIES))
    torch.testing.assert_close(base, want_base, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(Y, want, rtol=1e-4, atol=1e-5)
    assert Y.abs().min() > 1e-4  # the operators really moved the losses


def test_zero_operators_change_nothing(setup) -> None:
    lm, ops, h, z, targets = setup
    zero = SteeringOperators(lm.hidden_size, RANK, K)
    zero.load_state_dict({**ops.state_dict(), "A": torch.zeros_like(ops.A)})
    _, Y = loss_drops(lm, zero, h, z, targets)
    assert torch.equal(Y, torch.zeros_like(Y))


def test_first_order_close_to_exact_for_small_operators(setup) -> None:
    lm, ops, h, z, targets = setup
    small = SteeringOperators(lm.hidden_size, RANK, K)
    small.load_state_dict({**ops.state_dict(), "A": ops.A * 1e-3})
    base, exact = loss_drops(lm, small, h, z, targets)
    base1, linear = loss_drops(lm, small, h, z, targets, first_order=True)
    torch.testing.assert_close(base1, base)
    assert exact.abs().max() > 0
    # the error is second order in A: relative error ~ 1e-3
    assert (linear - exact).abs().max() <= 0.02 * exact.abs().max()
    assert torch.corrcoef(torch.stack([linear.flatten(), exact.flatten()]))[0, 1] > 0.999


def test_first_order_equals_autograd_directional_derivative(setup) -> None:
    lm, ops, h, z, targets = setup
    _, linear = loss_drops(lm, ops, h, z, targets, first_order=True)
    for q in range(len(QUERIES)):
        keep = targets[q] != -100
        zq = z[q].clone().requires_grad_(True)
        with torch.enable_grad():
            loss = F.cross_entropy(lm.logits(zq)[keep], targets[q][keep])
            (g,) = torch.autograd.grad(loss, zq)
        for k in range(K):
            shift = ops.project(h[q]) @ ops.A[k]
            torch.testing.assert_close(linear[k, q], -(g * shift).sum(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("budget", [1, 100_000])
def test_chunking_gives_the_same_answer(setup, budget: int) -> None:
    lm, ops, h, z, targets = setup
    _, whole = loss_drops(lm, ops, h, z, targets)
    _, chunked = loss_drops(lm, ops, h, z, targets, budget_elems=budget)
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-6)


def test_one_query_alone_equals_its_column_in_a_batch(setup) -> None:
    lm, ops, _, _, _ = setup
    batch = lm.encode(QUERIES)
    h, z = lm.features(batch, LAYER)
    _, Y = loss_drops(lm, ops, h, z, batch.targets)
    for q in range(len(QUERIES)):
        one = lm.encode([QUERIES[q]])
        h1, z1 = lm.features(one, LAYER)
        _, y1 = loss_drops(lm, ops, h1, z1, one.targets)
        torch.testing.assert_close(y1[:, 0], Y[:, q], rtol=1e-4, atol=1e-5)


def test_model_weights_are_untouched(setup) -> None:
    lm, ops, h, z, targets = setup
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    loss_drops(lm, ops, h, z, targets)
    loss_drops(lm, ops, h, z, targets, first_order=True)
    after = lm.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_top_slice_over_the_whole_vocabulary_is_exact(setup) -> None:
    lm, ops, h, z, targets = setup
    V = lm.unembed.shape[0]
    _, exact = loss_drops(lm, ops, h, z, targets, top_v=0)
    _, whole = loss_drops(lm, ops, h, z, targets, top_v=V - 1, budget_elems=1000)  # the target fills slot V
    torch.testing.assert_close(whole, exact, rtol=1e-4, atol=1e-5)
    _, default = loss_drops(lm, ops, h, z, targets)  # small K T V d: exact by default
    torch.testing.assert_close(default, exact)


@pytest.mark.parametrize(("scale", "top_v", "max_rel", "min_spearman"), [(0.1, 4, 0.02, 0.995), (1.0, 4, 0.15, 0.98),
                                                                         (1.0, 16, 0.1, 0.995)])
def test_top_slice_error_against_exact(setup, scale: float, top_v: int, max_rel: float, min_spearman: float) -> None:
    """The fast path's error, measured: the tail enters to first order, so the error shrinks with the
    operators' strength and the slice's width. On this tiny GPT-2 (V = 33) it measured max relative
    error 0.008 / 0.077 / 0.050 and Spearman 0.999 / 0.992 / 0.999 for the three cases, never worse
    than the first-order drop (0.010 / 0.091 / 0.091); the bounds leave a margin."""
    lm, ops, h, z, targets = setup
    scaled = SteeringOperators(lm.hidden_size, RANK, K)
    scaled.load_state_dict({**ops.state_dict(), "A": ops.A * scale})
    _, exact = loss_drops(lm, scaled, h, z, targets, top_v=0)
    _, fast = loss_drops(lm, scaled, h, z, targets, top_v=top_v)
    _, linear = loss_drops(lm, scaled, h, z, targets, first_order=True)
    rel = float((fast - exact).abs().max() / exact.abs().max())
    ranks = [torch.argsort(torch.argsort(t.flatten())).float() for t in (fast, exact)]
    spearman = float(torch.corrcoef(torch.stack(ranks))[0, 1])
    assert rel <= max_rel and spearman >= min_spearman, f"rel {rel:.4f}, rho {spearman:.4f}"
    assert (fast - exact).abs().max() <= (linear - exact).abs().max()
