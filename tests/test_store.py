"""The operator store: round trip, integrity checks, model matching, atomic replacement."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from _tiny import write_corpus, write_model
from safetensors.torch import load_file, save_file

import stride.store as store_mod
from stride.config import BuildConfig
from stride.corpus import Corpus, file_sha256
from stride.design import random_design
from stride.model import weights_sha256
from stride.operators import SteeringOperators
from stride.query import Attributor
from stride.store import FORMAT_VERSION, MANIFEST, StoreError, load_store, write_store
from worker.build import build

FILES = ["basis.safetensors", "operators.safetensors", "membership.safetensors", "examples.safetensors",
         "ids.json", "corpus.jsonl"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("store")
    model = write_model(root / "model")
    data = write_corpus(root / "corpus.jsonl", 40, prompt_every=3)
    built = build(model, data, root / "built", BuildConfig(steps=10, num_subsets=16, memberships=3, rank=4),
                  device="cpu", show_progress=False)
    return {"root": root, "model": model, "data": data, "built": built}


def _random_parts(data: Path, seed: int, K: int = 12, d: int = 3, r: int = 4, hidden: int = 32):
    corpus = Corpus.scan(data)
    gen = torch.Generator().manual_seed(seed)
    ops = SteeringOperators(hidden, r, K)
    ops.init_basis(torch.randn(50, hidden, generator=gen) * 3 + 1, seed)
    with torch.no_grad():
        ops.A.copy_(torch.randn(K, r, hidden, generator=gen))
    return ops, random_design(len(corpus), K, d, seed), corpus


def _write(out: Path, assets, seed: int = 0) -> tuple[Path, SteeringOperators, object, Corpus, BuildConfig]:
    ops, membership, corpus = _random_parts(assets["data"], seed)
    cfg = BuildConfig(num_subsets=12, memberships=3, rank=4, steps=1, layer=1, seed=seed)
    path = write_store(out, config=cfg, ops=ops, membership=membership, corpus=corpus,
                       model_path=assets["model"], model_sha256=weights_sha256(assets["model"]))
    return path, ops, membership, corpus, cfg


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_round_trip(assets, tmp_path: Path) -> None:
    path, ops, membership, corpus, cfg = _write(tmp_path / "s", assets, seed=5)
    st = load_store(path)
    for name, tensor in ops.state_dict().items():
        assert torch.equal(st.operators.state_dict()[name], tensor), name
    assert torch.equal(st.membership.crow, membership.crow) and torch.equal(st.membership.col, membership.col)
    assert st.membership.num_examples == len(corpus)
    assert st.config == cfg
    assert st.corpus.ids == corpus.ids
    assert [r.text for r in st.corpus.records(range(len(corpus)))] == [
        r.text for r in corpus.records(range(len(corpus)))]
    m = st.manifest
    assert m["format_version"] == FORMAT_VERSION and m["code_version"] and m["created"]
    assert m["model"] == {"path": str(assets["model"].resolve()), "sha256": weights_sha256(assets["model"])}
    assert m["corpus"]["sha256"] == file_sha256(assets["data"]) and m["corpus"]["num_examples"] == len(corpus)
    assert m["config"] == cfg.to_dict()
    assert sorted(m["files"]) == sorted(FILES)
    assert all(file_sha256(path / f) == digest for f, digest in m["files"].items())
    assert st.version == m["files"]["operators.safetensors"][:16]
    assert _leftovers(tmp_path) == []


def test_built_store_loads_and_matches_its_config(assets) -> None:
    st = load_store(assets["built"])
    assert st.config.num_subsets == 16 and st.config.layer == 0 and st.config.steps == 10
    assert st.operators.A.shape == (16, 4, 32)
    assert st.membership.num_subsets == 16 and st.membership.memberships == 3
    assert st.manifest["build"]["world_size"] == 1
    assert not (assets["root"] / ".built.ckpt").exists()  # the checkpoint is gone after success


@pytest.mark.parametrize("name", FILES)
def test_flipped_byte_is_refused_naming_the_file(assets, tmp_path: Path, name: str) -> None:
    path = shutil.copytree(assets["built"], tmp_path / "s")
    f = path / name
    raw = bytearray(f.read_bytes())
    i = len(raw) // 2
    raw[i] ^= 0x01
    f.write_bytes(bytes(raw))
    with pytest.raises(StoreError) as info:
        load_store(path)
    assert str(f) in str(info.value) and "sha256" in str(info.value)
    with pytest.raises(StoreError):
        Attributor.from_store(path, device="cpu")


def test_missing_manifest(assets, tmp_path: Path) -> None:
    path = shutil.copytree(assets["built"], tmp_path / "s")
    (path / MANIFEST).unlink()
    with pytest.raises(StoreError, match="no manifest.json"):
        load_store(path)
    with pytest.raises(StoreError, match="no manifest.json"):
        load_store(tmp_path / "does-not-exist")


def test_truncated_manifest(assets, tmp_path: Path) -> None:
    path = shutil.copytree(assets["built"], tmp_path / "s")
    text = (path / MANIFEST).read_text()
    (path / MANIFEST).write_text(text[: len(text) // 2])
    with pytest.raises(StoreError, match="corrupt manifest") as info:
        load_store(path)
    assert str(path / MANIFEST) in str(info.value)


def test_missing_file(assets, tmp_path: Path) -> None:
    path = shutil.copytree(assets["built"], tmp_path / "s")
    (path / "operators.safetensors").unlink()
    with pytest.raises(StoreError, match="operators.safetensors: missing"):
        load_store(path)


def test_membership_is_int32_on_disk_and_format_1_stores_still_load(assets, tmp_path: Path) -> None:
    path, _, membership, _, _ = _write(tmp_path / "s", assets)
    assert load_file(path / "membership.safetensors")["col"].dtype == torch.int32
    # a format-1 store: int64 columns, its own digest in the manifest
    save_file({"crow": membership.crow, "col": membership.col.long()}, path / "membership.safetensors")
    manifest = json.loads((path / MANIFEST).read_text())
    manifest["format_version"] = 1
    manifest["files"]["membership.safetensors"] = file_sha256(path / "membership.safetensors")
    (path / MANIFEST).write_text(json.dumps(manifest))
    st = load_store(path)
    assert st.membership.col.dtype == torch.long and torch.equal(st.membership.col, membership.col)


def test_unknown_format_version(assets, tmp_path: Path) -> None:
    path = shutil.copytree(assets["built"], tmp_path / "s")
    manifest = json.loads((path / MANIFEST).read_text())
    manifest["format_version"] = FORMAT_VERSION + 1
    (path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(StoreError, match="format version"):
        load_store(path)


def test_a_different_model_is_refused(assets, tmp_path: Path) -> None:
    other = shutil.copytree(assets["model"], tmp_path / "other")
    weights = load_file(other / "model.safetensors")
    name = sorted(weights)[0]
    weights[name] = weights[name] + 1e-3
    save_file(weights, other / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(StoreError, match="weights differ"):
        Attributor.from_store(assets["built"], device="cpu", model=other)
    # a byte-identical copy (the model moved) is accepted
    same = shutil.copytree(assets["model"], tmp_path / "same")
    attributor = Attributor.from_store(assets["built"], device="cpu", model=same)
    assert attributor.attribute("the old farmer", " crossed the river .").proponents
    with pytest.raises(StoreError, match="missing"):
        Attributor.from_store(assets["built"], device="cpu", model=tmp_path / "gone")


def test_a_model_of_another_width_is_refused(assets, tmp_path: Path) -> None:
    path, *_ = _write(tmp_path / "s", assets)
    manifest = json.loads((path / MANIFEST).read_text())
    wide = write_model(tmp_path / "wide", width=48)
    manifest["model"] = {"path": str(wide), "sha256": weights_sha256(wide)}
    # a consistent manifest that names a model of another hidden size
    store_mod.write_json_atomic(path / MANIFEST, manifest)
    with pytest.raises(StoreError, match="hidden size"):
        Attributor.from_store(path, device="cpu")


def test_rewrite_replaces_atomically(assets, tmp_path: Path) -> None:
    out = tmp_path / "s"
    _write(out, assets, seed=1)
    path, ops2, *_ = _write(out, assets, seed=2)
    assert torch.equal(load_store(path).operators.A, ops2.A)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]  # no temp or old dirs left


def test_failed_write_keeps_the_old_store(assets, tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "s"
    _, ops1, *_ = _write(out, assets, seed=1)
    real = store_mod.save_file

    def failing(tensors, path, *a, **kw):
        if Path(path).name == "membership.safetensors":
            raise OSError("disk full")
        return real(tensors, path, *a, **kw)

    monkeypatch.setattr(store_mod, "save_file", failing)
    with pytest.raises(OSError, match="disk full"):
        _write(out, assets, seed=2)
    assert torch.equal(load_store(out).operators.A, ops1.A)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]
    # and a first write that fails leaves nothing at all
    with pytest.raises(OSError, match="disk full"):
        _write(tmp_path / "fresh", assets, seed=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]
