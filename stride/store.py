"""The operator store: safetensors files plus a manifest written last, atomically.

A store is a directory. It is built in a temporary sibling and renamed into place, so a crash
leaves either the old store or the new one, never a half-written one. Loading verifies every
file's sha256 against the manifest.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from stride import __version__
from stride.config import BuildConfig
from stride.corpus import Corpus, file_sha256
from stride.design import Membership
from stride.operators import SteeringOperators

FORMAT_VERSION = 2  # 2: membership column indices as int32 (half the size); 1 is still read
READS = (1, 2)
MANIFEST = "manifest.json"


class StoreError(RuntimeError):
    """A store that is missing, corrupt, or does not match the model it names."""


@dataclass
class Store:
    path: Path
    manifest: dict[str, Any]
    config: BuildConfig
    operators: SteeringOperators
    membership: Membership
    corpus: Corpus

    @property
    def version(self) -> str:
        """Content version: the digest of the operators file, stable across copies."""
        return self.manifest["files"]["operators.safetensors"][:16]


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_store(
    out: str | Path, *, config: BuildConfig, ops: SteeringOperators, membership: Membership,
    corpus: Corpus, model_path: str | Path, model_sha256: str, extra: dict[str, Any] | None = None,
) -> Path:
    """``model_path`` is the frozen model the service runs; ``extra`` may name the build's "reference"
    and "deployed" models ({path, sha256} each)."""
    out = Path(out).resolve()
    tmp = out.with_name(f".{out.name}.{uuid.uuid4().hex}.tmp")
    tmp.mkdir(parents=True)
    try:
        save_file(
            {"w_psi": ops.w_psi.detach().cpu().contiguous(), "h_mean": ops.h_mean.cpu(),
             "h_scale": ops.h_scale.cpu().reshape(1)},
            tmp / "basis.safetensors",
        )
        save_file({"A": ops.A.detach().cpu().contiguous()}, tmp / "operators.safetensors")
        col = membership.col.to(torch.int32 if membership.num_examples < 2**31 else torch.int64)
        save_file({"crow": membership.crow, "col": col}, tmp / "membership.safetensors")
        save_file(
            {"offsets": torch.from_numpy(corpus.offsets), "lengths": torch.from_numpy(corpus.lengths)},
            tmp / "examples.safetensors",
        )
        (tmp / "ids.json").write_text(json.dumps(corpus.ids))
        shutil.copyfile(corpus.path, tmp / "corpus.jsonl")
        files = {p.name: file_sha256(p) for p in sorted(tmp.iterdir())}
        manifest = {
            "format_version": FORMAT_VERSION,
            "code_version": __version__,
            "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "model": {"path": str(Path(model_path).resolve()), "sha256": model_sha256},
            "corpus": {"path": str(Path(corpus.path).resolve()), "sha256": files["corpus.jsonl"],
                       "num_examples": len(corpus)},
            "config": config.to_dict(),
            "shapes": {"num_subsets": ops.num_subsets, "rank": ops.rank,
                       "hidden_size": int(ops.A.shape[2]), "memberships": membership.memberships},
            "files": files,
            **(extra or {}),
        }
        write_json_atomic(tmp / MANIFEST, manifest)
        _fsync_dir(tmp)
        if out.exists():
            old = out.with_name(f".{out.name}.{uuid.uuid4().hex}.old")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_manifest(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    mf = path / MANIFEST
    if not mf.is_file():
        raise StoreError(f"{path}: not an operator store (no {MANIFEST}; an interrupted build leaves none)")
    try:
        manifest = json.loads(mf.read_text())
    except json.JSONDecodeError as e:
        raise StoreError(f"{mf}: corrupt manifest ({e})") from None
    if manifest.get("format_version") not in READS:
        raise StoreError(
            f"{mf}: format version {manifest.get('format_version')!r}, this code reads {', '.join(map(str, READS))}"
        )
    return manifest


def load_store(path: str | Path, verify: bool = True) -> Store:
    path = Path(path)
    manifest = read_manifest(path)
    if verify:
        for name, digest in manifest["files"].items():
            f = path / name
            if not f.is_file():
                raise StoreError(f"{f}: missing from the store")
            if file_sha256(f) != digest:
                raise StoreError(f"{f}: sha256 does not match the manifest; the store is corrupt")
    try:
        basis = load_file(path / "basis.safetensors")
        A = load_file(path / "operators.safetensors")["A"]
        mem = load_file(path / "membership.safetensors")
        ex = load_file(path / "examples.safetensors")
    except Exception as e:  # safetensors raises several types for damaged files
        raise StoreError(f"{path}: unreadable store file ({e})") from None
    K, r, d = A.shape
    ops = SteeringOperators(d, r, K)
    ops.load_state_dict({"h_mean": basis["h_mean"], "h_scale": basis["h_scale"].reshape(()),
                         "w_psi": basis["w_psi"], "A": A})
    ids = json.loads((path / "ids.json").read_text())
    corpus = Corpus(path / "corpus.jsonl", ids, ex["offsets"].numpy(), ex["lengths"].numpy())
    membership = Membership(mem["crow"], mem["col"].long(), len(ids))
    return Store(path, manifest, BuildConfig.from_dict(manifest["config"]), ops.requires_grad_(False),
                 membership, corpus)
