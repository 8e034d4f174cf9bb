"""Fit modes that use a reference checkpoint, the soft-target losses, and the layer rule."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from _tiny import write_corpus, write_model

from stride.config import BuildConfig, ConfigError
from stride.fit import compress, soft_kl
from stride.model import LM, ModelMismatchError
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
