"""Every supported architecture family, as a tiny random-initialised model made here and saved."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from _tiny import write_corpus, write_model

from stride.config import BuildConfig
from stride.corpus import Record
from stride.model import LM, weights_sha256
from stride.query import Attributor
from worker.build import build

ARCHS = ["gpt2", "llama", "qwen2", "mistral", "gpt_neox"]
RECORDS = [Record("a", "the old farmer", " crossed the green river ."), Record("b", "", "a boat .")]


def _blocks(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The transformer blocks, found independently of stride.model."""
    depth = model.config.num_hidden_layers
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) == depth]
    assert len(lists) == 1
    return lists[0]


@pytest.fixture(scope="module", params=ARCHS)
def arch_dir(request, tmp_path_factory) -> Path:
    return write_model(tmp_path_factory.mktemp(request.param) / "model", request.param)


def test_load_writes_safetensors_only(arch_dir: Path) -> None:
    assert (arch_dir / "model.safetensors").is_file()
    assert len(weights_sha256(arch_dir)) == 64
    lm = LM.load(arch_dir, "cpu")
    assert lm.num_layers == 2 and lm.hidden_size == 32
    assert not any(p.requires_grad for p in lm.model.parameters())
    assert not lm.model.training


@pytest.mark.parametrize("layer", [0, 1])
def test_features_match_the_model(arch_dir: Path, layer: int) -> None:
    lm = LM.load(arch_dir, "cpu")
    batch = lm.encode(RECORDS)
    h, z = lm.features(batch, layer)
    captured = {}
    hook = _blocks(lm.model)[layer].register_forward_hook(
        lambda mod, args, out: captured.setdefault("h", out[0] if isinstance(out, tuple) else out)
    )
    try:
        with torch.no_grad():
            out = lm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                           output_hidden_states=True, use_cache=False)
    finally:
        hook.remove()
    real = batch.attention_mask.bool()
    assert h.shape == z.shape == (*batch.input_ids.shape, 32)
    torch.testing.assert_close(h, out.hidden_states[layer + 1])
    if layer < lm.num_layers - 1:  # the last entry of hidden_states is after the final norm
        torch.testing.assert_close(h[real], captured["h"][real])
    # z is the state the unembedding reads: it reproduces the model's logits
    torch.testing.assert_close(lm.logits(z)[real], out.logits[real], rtol=1e-4, atol=1e-4)
    # right padding does not change real positions
    h1, z1 = lm.features(lm.encode(RECORDS[1:]), layer)
    n = int(real[1].sum())
    torch.testing.assert_close(h1[0, :n], h[1, :n], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(z1[0, :n], z[1, :n], rtol=1e-4, atol=1e-5)


def test_build_and_attribute(arch_dir: Path, tmp_path: Path) -> None:
    data = write_corpus(tmp_path / "corpus.jsonl", 48, prompt_every=4)
    cfg = BuildConfig(steps=20, num_subsets=32, memberships=4, rank=4, batch_size=8)
    store = build(arch_dir, data, tmp_path / "store", cfg, device="cpu", show_progress=False)
    attributor = Attributor.from_store(store, device="cpu")
    assert attributor.layer == 0  # the middle of 2 layers would be the last, whose output is the normed state
    result = attributor.attribute("the old farmer", " crossed the green river .", top_k=5)
    assert math.isfinite(result.loss) and result.loss > 0
    scores = [s.score for s in result.proponents + result.opponents]
    assert scores and all(math.isfinite(s) for s in scores)
    assert all(s.score > 0 for s in result.proponents) and all(s.score < 0 for s in result.opponents)
    assert result.diagnostics["converged"]
    assert {s.id for s in result.proponents} <= {f"ex{i}" for i in range(48)}
