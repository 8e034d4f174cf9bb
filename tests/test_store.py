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
from stride.corpus import Corpus, IndexIds, PackedIds, file_sha256
from stride.design import random_design
from stride.model import weights_sha256
from stride.operators import SteeringOperators
from stride.query import Attributor
from stride.store import FORMAT_VERSION, MANIFEST, StoreError, load_store, write_store
from worker.build import build

FILES = ["basis.safetensors", "operators.safetensors", "membership.safetensors", "examples.safetensors",
         "ids.safetensors", "corpus.jsonl"]


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


def m_ids(st) -> str:
    return st.manifest["corpus"]["ids"]


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_round_trip(assets, tmp_path: Path) -> None:
    path, ops, membership, corpus, cfg = _write(tmp_path / "s", assets, seed=5)
    st = load_store(path)
    for name, tensor in ops.state_dict().items():
        assert torch.equal(st.operators.state_dict()[name], tensor), name
    assert torch.equal(st.membership.crow, membership.crow) and torch.equal(st.membership.col.long(), membership.col)
    assert st.membership.num_examples == len(corpus)
    assert st.config == cfg
    assert list(st.corpus.ids) == corpus.ids and m_ids(st) == "packed"
    assert [st.corpus.index_of(rid) for rid in corpus.ids] == list(range(len(corpus)))
    assert [r.text for r in st.corpus.records(range(len(corpus)))] == [
        r.text for r in corpus.records(range(len(corpus)))]
    m = st.manifest
    assert m["format_version"] == FORMAT_VERSION and m["code_version"] and m["created"]
    assert m["model"] == {"path": str(assets["model"].resolve()), "sha256": weights_sha256(assets["model"])}
    assert m["corpus"]["sha256"] == file_sha256(assets["data"]) and m["corpus"]["num_examples"] == len(corpus)
    assert m["config"] == cfg.to_dict()
    assert sorted(m["files"]) == sorted(FILES)
    assert all(file_sha256(path / f) == digest for f, digest in m["files"].items())
    assert st.version == m["version"] == store_mod.content_version(m["files"]) and m["lineage"]["generation"] == 0
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
    assert load_store(path).membership.col.dtype == torch.int32  # mapped as stored, no int64 copy
    # a format-1 store: ids.json and int64 columns, with their digests in the manifest
    _as_format_2(path)
    save_file({"crow": membership.crow, "col": membership.col.long()}, path / "membership.safetensors")
    manifest = json.loads((path / MANIFEST).read_text())
    manifest["format_version"] = 1
    manifest["files"]["membership.safetensors"] = file_sha256(path / "membership.safetensors")
    (path / MANIFEST).write_text(json.dumps(manifest))
    st = load_store(path)
    assert st.membership.col.dtype == torch.long and torch.equal(st.membership.col, membership.col)
    assert st.corpus.ids == [f"ex{i}" for i in range(40)]


def _as_format_2(path: Path) -> list[str]:
    """Rewrite a store as format 2 wrote it (ids.json, no corpus.ids); returns its ids."""
    manifest = json.loads((path / MANIFEST).read_text())
    ids = list(load_store(path).corpus.ids)
    (path / "ids.safetensors").unlink(missing_ok=True)
    (path / "ids.json").write_text(json.dumps(ids))
    manifest["format_version"] = 2
    del manifest["corpus"]["ids"]
    manifest["files"].pop("ids.safetensors", None)
    manifest["files"]["ids.json"] = file_sha256(path / "ids.json")
    (path / MANIFEST).write_text(json.dumps(manifest))
    return ids


def test_a_format_2_store_still_loads_with_its_ids_json(assets, tmp_path: Path) -> None:
    path, _, membership, corpus, _ = _write(tmp_path / "s", assets)
    ids = _as_format_2(path)
    st = load_store(path)
    assert isinstance(st.corpus.ids, list) and st.corpus.ids == ids == corpus.ids
    assert st.corpus.index_of(ids[7]) == 7 and st.corpus.record(7).text == corpus.record(7).text
    with pytest.raises(KeyError):
        st.corpus.index_of("no such id")
    # written again by this code, it becomes format 3
    again = write_store(tmp_path / "again", config=st.config, ops=st.operators, membership=st.membership,
                        corpus=st.corpus, model_path=assets["model"], model_sha256="x")
    st3 = load_store(again)
    assert st3.manifest["format_version"] == FORMAT_VERSION and list(st3.corpus.ids) == ids
    assert torch.equal(st3.membership.col.long(), membership.col)


def test_default_ids_are_a_flag_not_a_file(assets, tmp_path: Path) -> None:
    """A corpus without ids (each example's id is its index) stores none."""
    data = tmp_path / "plain.jsonl"
    data.write_text("".join(json.dumps({"text": r.text}) + "\n" for r in Corpus.scan(assets["data"]).records(
        range(40))))
    ops, membership, _ = _random_parts(assets["data"], 0)
    corpus = Corpus.scan(data)
    path = write_store(tmp_path / "s", config=BuildConfig(num_subsets=12, memberships=3, rank=4, steps=1, layer=1),
                       ops=ops, membership=membership, corpus=corpus, model_path=assets["model"],
                       model_sha256=weights_sha256(assets["model"]))
    st = load_store(path)
    assert m_ids(st) == "index" and not (path / "ids.safetensors").exists() and "ids.safetensors" not in \
        st.manifest["files"]
    assert isinstance(st.corpus.ids, IndexIds) and list(st.corpus.ids) == corpus.ids == [str(i) for i in range(40)]
    assert st.corpus.index_of("39") == 39 and st.corpus.records([3])[0].text == corpus.record(3).text
    for missing in ("40", "07", "-1", "x", "", "٣"):  # out of range, not canonical, not a number
        with pytest.raises(KeyError):
            st.corpus.index_of(missing)


def test_packed_ids_read_and_find_every_id() -> None:
    ids = [f"doc-{i}" for i in range(500)] + ["é", "文書", "doc-1 ", "d"]
    packed = PackedIds.pack(ids)
    assert list(packed) == ids and packed[-1] == "d" and packed[2:4] == ids[2:4] and len(packed) == len(ids)
    assert [packed.find(rid) for rid in ids] == list(range(len(ids)))
    assert [packed.find(rid) for rid in ("doc-", "doc-5000", "do", "é ", "")] == [-1] * 5
    assert "文書" in packed and "nope" not in packed
    with pytest.raises(IndexError):
        packed[len(ids)]


@pytest.mark.parametrize("name", ["membership.safetensors", "examples.safetensors", "ids.safetensors"])
def test_a_truncated_array_file_is_refused_naming_it(assets, tmp_path: Path, name: str) -> None:
    """Unverified loads (verify=False) still check that each mapped file holds what its header says."""
    path, *_ = _write(tmp_path / "s", assets)
    f = path / name
    f.write_bytes(f.read_bytes()[:-9])
    with pytest.raises(StoreError) as info:
        load_store(path, verify=False)
    assert str(f) in str(info.value)
    f.write_bytes(b"\x05")
    with pytest.raises(StoreError, match="not a safetensors file"):
        load_store(path, verify=False)


def test_a_bad_ids_kind_names_the_field(assets, tmp_path: Path) -> None:
    path, *_ = _write(tmp_path / "s", assets)
    manifest = json.loads((path / MANIFEST).read_text())
    manifest["corpus"]["ids"] = "json"
    (path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(StoreError, match="corpus.ids"):
        load_store(path)


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
    from app.serving import preflight
    from app.settings import Settings

    with pytest.raises(StoreError, match="weights differ"):  # `stride serve` refuses it before loading anything
        preflight(Settings(_env_file=None, store=assets["built"], model=other))
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
