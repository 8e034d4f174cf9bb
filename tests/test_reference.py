"""Fit modes that use a reference checkpoint, the soft-target losses, and the layer rule."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from _tiny import write_corpus, write_model

from stride.config import BuildConfig, ConfigError
from stride.corpus import Corpus
from stride.design import random_design
from stride.fit import (
    FeatureSource,
    Linearity,
    Targets,
    compress,
    ridge_residual_share,
    sample_step,
    soft_kl,
    step_loss,
)
from stride.model import LM, ModelMismatchError
from stride.operators import SteeringOperators
from stride.query import Attributor
from worker.build import build

SMALL = dict(steps=6, num_subsets=16, memberships=3, rank=4, batch_size=4)


@pytest.mark.parametrize("arch", ["gpt2", "llama", "gpt_neox"])
def test_default_layer_never_reads_the_steered_state(tmp_path: Path, arch: str) -> None:
    """transformers returns the final *normed* state as hidden_states[num_layers]: h must not be z."""
    lm = LM.load(write_model(tmp_path / arch, arch), "cpu")
    layer = BuildConfig().resolve(100, lm.num_layers).layer
    assert layer == 0
    h, z = lm.features(lm.encode(lm_records()), layer)
    assert not torch.allclose(h, z)
    last_h, last_z = lm.features(lm.encode(lm_records()), lm.num_layers - 1)
    assert torch.equal(last_h, last_z)  # the reason the last block is refused
    # features runs the base transformer without the LM head: the same states, and z gives the LM's logits
    batch = lm.encode(lm_records())
    full = lm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, output_hidden_states=True)
    torch.testing.assert_close(h, full.hidden_states[layer + 1])
    torch.testing.assert_close(lm.logits(z), full.logits)
    with pytest.raises(ConfigError, match="before the last one"):
        BuildConfig(layer=lm.num_layers - 1).resolve(100, lm.num_layers)


def lm_records():
    from stride.corpus import Record

    return [Record("a", "the old farmer", " crossed the river ."), Record("b", "", "a boat .")]


def test_compress_keeps_a_distribution() -> None:
    logp = torch.log_softmax(torch.randn(3, 5, 40), -1)
    ids, logq = compress(logp, 8)
    assert ids.shape == (3, 5, 8) and logq.shape == (3, 5, 9)
    torch.testing.assert_close(logq.logsumexp(-1), torch.zeros(3, 5), atol=1e-5, rtol=0)
    torch.testing.assert_close(logq[..., :8], torch.gather(logp, -1, ids))


def test_soft_kl_matches_independent_references() -> None:
    torch.manual_seed(0)
    logits, target = torch.randn(4, 6, 30), torch.log_softmax(torch.randn(4, 6, 30), -1)
    full = F.kl_div(torch.log_softmax(logits, -1), target, log_target=True, reduction="none").sum(-1)
    torch.testing.assert_close(soft_kl(logits, *compress(target, 0)), full, atol=1e-5, rtol=1e-5)
    # a one-hot target is the NLL of its token
    tok = torch.randint(30, (4, 6))
    onehot = torch.stack([torch.zeros(4, 6), torch.full((4, 6), -80.0)], -1)
    nll = F.cross_entropy(logits.transpose(1, 2), tok, reduction="none")
    torch.testing.assert_close(soft_kl(logits, tok[..., None], onehot), nll, atol=1e-5, rtol=1e-5)
    # the coarsened KL is a lower bound of the full one (a data-processing inequality)
    assert bool((soft_kl(logits, *compress(target, 5)) <= full + 1e-5).all())


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("ref")
    return (write_model(root / "deployed", "gpt2", seed=1), write_model(root / "reference", "gpt2", seed=2),
            write_corpus(root / "corpus.jsonl", 40, prompt_every=5))


def test_forget_is_the_default_even_without_a_reference(pair) -> None:
    assert BuildConfig().resolve(40, 2, has_reference=False).fit == "forget"
    assert BuildConfig().resolve(40, 2, has_reference=True).fit == "forget"


def test_a_reference_the_mode_does_not_use_is_not_recorded(pair, tmp_path: Path, caplog) -> None:
    deployed, reference, data = pair
    store = build(deployed, data, tmp_path / "s", BuildConfig(**SMALL), device="cpu", show_progress=False,
                  reference_model=reference)
    manifest = json.loads((store / "manifest.json").read_text())
    assert manifest["config"]["fit"] == "forget" and "reference" not in manifest
    assert "does not use the reference model" in caplog.text


def test_revert_records_its_reference(pair, tmp_path: Path) -> None:
    deployed, reference, data = pair
    store = build(deployed, data, tmp_path / "s", BuildConfig(fit="revert", **SMALL), device="cpu",
                  show_progress=False, reference_model=reference)
    manifest = json.loads((store / "manifest.json").read_text())
    assert manifest["config"]["fit"] == "revert" and manifest["model"]["path"] == str(deployed.resolve())
    assert len(manifest["reference"]["sha256"]) == 64
    attributor = Attributor.from_store(store, device="cpu")
    assert attributor.store.config.measurement_sign == -1.0
    assert attributor.attribute("the old farmer", " crossed the river .").diagnostics["converged"]


def test_add_mode_serves_the_reference(pair, tmp_path: Path) -> None:
    deployed, reference, data = pair
    store = build(deployed, data, tmp_path / "s", BuildConfig(fit="add", **SMALL), device="cpu",
                  show_progress=False, reference_model=reference)
    manifest = json.loads((store / "manifest.json").read_text())
    assert manifest["model"]["path"] == str(reference.resolve())
    assert manifest["deployed"]["path"] == str(deployed.resolve())
    assert Attributor.from_store(store, device="cpu").store.config.measurement_sign == 1.0


def test_reference_modes_need_a_reference(pair, tmp_path: Path) -> None:
    deployed, _, data = pair
    with pytest.raises(ConfigError, match="needs a reference model"):
        build(deployed, data, tmp_path / "s", BuildConfig(fit="revert", **SMALL), device="cpu", show_progress=False)
    assert not (tmp_path / "s").exists()


def test_a_mismatched_reference_is_refused(pair, tmp_path: Path) -> None:
    deployed, _, data = pair
    other = write_model(tmp_path / "wide", "gpt2", width=48)
    with pytest.raises(ModelMismatchError, match="hidden_size"):
        build(deployed, data, tmp_path / "s", BuildConfig(**SMALL), device="cpu", show_progress=False,
              reference_model=other)


def test_demo_assets_keep_their_base(demo_dir: Path) -> None:
    """The demo is trained from scratch: its base is the seeded initialisation, usable as a reference."""
    from stride.model import check_same_family, weights_sha256

    LM.load(demo_dir / "base", "cpu")  # its weights load
    check_same_family(LM.load(demo_dir / "model", "cpu"), demo_dir / "base")
    assert weights_sha256(demo_dir / "base") != weights_sha256(demo_dir / "model")


def test_ridge_residual_share_is_zero_for_additive_effects_and_scale_free() -> None:
    torch.manual_seed(0)
    X = torch.randn(32, 8)
    additive = X @ torch.randn(8, 5) + torch.randn(5)  # effects that add up over the sketch, plus an intercept
    assert float(ridge_residual_share(additive, X, 1e-6)) < 1e-6
    noise = torch.randn(32, 5)
    share = ridge_residual_share(noise, X, 1e-3)
    assert 0.3 < float(share) <= 1.0  # 8 of 31 centred directions explained at most
    torch.testing.assert_close(ridge_residual_share(noise * 100, X, 1e-3), share)


def test_linearity_sketch_sums_its_members_rows() -> None:
    mem = random_design(50, 12, 3, 0)
    lin = Linearity.of(mem, 1.0, 4, seed=7, width=5)
    R = torch.randn(50, 5, generator=torch.Generator().manual_seed(7 + 2))
    dense = torch.zeros(12, 50)
    for k in range(12):
        dense[k, mem.members(k)] = 1.0
    torch.testing.assert_close(lin.sketch, dense @ R)


def test_the_linearity_term_trains_only_the_sampled_operators(pair, tmp_path: Path) -> None:
    deployed, _, data = pair
    lm = LM.load(deployed, "cpu")
    corpus = Corpus.scan(data)
    mem = random_design(len(corpus), 16, 3, 0)
    source = FeatureSource(lm, corpus, 0, 64, Targets("forget"))
    ops = SteeringOperators(lm.hidden_size, 4, 16)
    ops.init_basis(source.get(torch.arange(8)).h.flatten(0, 1), 0)
    ops.A.data.normal_(0, 0.1)
    step = sample_step(mem, 4, 2, torch.Generator().manual_seed(3))
    lin = Linearity.of(mem, 5.0, 3, 0)
    plain, _ = step_loss(ops, lm, source, step, 1.0, 2)
    loss, stats = step_loss(ops, lm, source, step, 1.0, 2, lin)
    assert 0.0 <= stats["linearity"] <= 1.0
    torch.testing.assert_close(loss, plain + 5.0 * stats["linearity"], rtol=1e-5, atol=1e-6)
    loss.backward()
    grad = ops.A.grad.to_dense() if ops.A.grad.is_sparse else ops.A.grad
    touched = set(torch.nonzero(grad.flatten(1).abs().amax(1) > 0).squeeze(1).tolist())
    assert touched and touched <= set(step.ks.tolist())
    # a build with the term records it and still answers
    store = build(deployed, data, tmp_path / "s", BuildConfig(linearity_weight=1.0, **SMALL), device="cpu",
                  show_progress=False)
    assert json.loads((store / "manifest.json").read_text())["config"]["linearity_weight"] == 1.0
    assert Attributor.from_store(store, device="cpu").attribute("the old farmer", " crossed the river .") \
        .diagnostics["converged"]
