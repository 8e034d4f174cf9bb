"""The operator store: safetensors files plus a manifest written last, atomically.

A store is a directory. It is built in a temporary sibling and renamed into place, so a crash
leaves either the old store or the new one, never a half-written one. Loading verifies every
file's sha256 against the manifest (the files in parallel on torch's thread budget), then maps the
large per-example arrays (membership, offsets, ids) from disk instead of copying them: a page is
read when it is used, and a store replaced on disk later cannot change a mapped one.

Start-up at n = 10^7 (K = 1000, d = 10), side by side with format 2's code (``python -m bench.scaling
--startup-only --ns 1e7 --against DIR``, 1 thread, load average ~4 on 2 cores): ``load_store`` 8.0 ->
0.47 s of CPU (the sha256 of ~700 MB is most of what is left), the whole start-up 10.8 -> 3.1 s of CPU,
3.0 -> 1.0 GiB resident (anonymous 2.4 -> 0.4 GiB). Format 2 spent it on a dict over 10^7 parsed ids
(5.5 s), an int64 copy of the membership columns (2.4 s) and ``json.loads`` of ids.json (1.0 s).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import mmap
import os
import shutil
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from stride import __version__
from stride.config import BuildConfig
from stride.corpus import Corpus, IndexIds, PackedIds, file_sha256
from stride.design import Membership
from stride.operators import SteeringOperators

# 3: ids as a flag (the default str(i)) or a packed blob in ids.safetensors instead of ids.json;
# 2: membership column indices as int32 (half the size); 1 and 2 are still read
FORMAT_VERSION = 3
READS = (1, 2, 3)
MANIFEST = "manifest.json"
IDS_FILE = "ids.safetensors"


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
        """Content version, stable across copies: the manifest's ``version`` (a digest of every file's
        digest, so an update that only removes examples is a new version too); stores written before
        it carry none and are versioned by their operators file."""
        return self.manifest.get("version") or self.manifest["files"]["operators.safetensors"][:16]

    @property
    def generation(self) -> int:
        """0 for a build, the parent's + 1 for each ``stride update`` (``lineage`` in the manifest)."""
        return int(self.manifest.get("lineage", {}).get("generation", 0))


def content_version(files: dict[str, str]) -> str:
    """16 hex digits of the sha256 of the files' digests: what a cache key or a reload compares."""
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()[:16]


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
    lineage: dict[str, Any] | None = None, corpus_source: str | None = None,
) -> Path:
    """``model_path`` is the frozen model the service runs; ``extra`` may name the build's "reference"
    and "deployed" models ({path, sha256} each). ``lineage`` is an update's record (its parent's
    version and manifest sha256, what was added and removed, the refit); a build's is generation 0.
    ``corpus_source`` is recorded as the corpus's path instead of ``corpus.path`` (an update's merged
    file is temporary)."""
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
        ids_kind = _write_ids(corpus.ids, tmp / IDS_FILE)
        shutil.copyfile(corpus.path, tmp / "corpus.jsonl")
        files = {p.name: file_sha256(p) for p in sorted(tmp.iterdir())}
        manifest = {
            "format_version": FORMAT_VERSION,
            "code_version": __version__,
            "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "model": {"path": str(Path(model_path).resolve()), "sha256": model_sha256},
            "corpus": {"path": corpus_source or str(Path(corpus.path).resolve()), "sha256": files["corpus.jsonl"],
                       "num_examples": len(corpus), "ids": ids_kind},
            "config": config.to_dict(),
            "shapes": {"num_subsets": ops.num_subsets, "rank": ops.rank,
                       "hidden_size": int(ops.A.shape[2]), "memberships": membership.memberships},
            "files": files,
            "version": content_version(files),
            "lineage": lineage or {"generation": 0, "parent": None},
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


def _write_ids(ids: Sequence[str], path: Path) -> str:
    """"index" when the ids are the default ``str(i)`` (nothing written), else "packed" (``path``)."""
    if isinstance(ids, IndexIds) or (not isinstance(ids, PackedIds) and list(ids) == IndexIds(len(ids))[:]):
        return "index"
    packed = ids if isinstance(ids, PackedIds) else PackedIds.pack(ids)
    save_file({"offsets": torch.from_numpy(np.ascontiguousarray(packed.offsets)),
               "data": torch.from_numpy(np.ascontiguousarray(packed.data)),
               "order": torch.from_numpy(np.ascontiguousarray(packed.order))}, path)
    return "packed"


_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
           "I16": np.int16, "I8": np.int8, "U64": np.uint64, "U32": np.uint32, "U16": np.uint16, "U8": np.uint8,
           "BOOL": np.bool_}


def map_safetensors(path: Path) -> dict[str, np.ndarray]:
    """A safetensors file's arrays as views of a private (copy-on-write) memory map, not copies.

    Pages are read on first touch and stay file-backed: the int32 membership columns at n = 10^7
    (400 MB) cost no copy, and the ids and offsets no memory until a record is read.
    StoreError names the file and the entry when the header does not describe the file.
    """
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = int.from_bytes(f.read(8), "little")
            if size < 8 or head > size - 8:
                raise StoreError(f"{path}: not a safetensors file (header length {head}, file {size} bytes)")
            header = json.loads(f.read(head))
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    except (OSError, ValueError) as e:  # json's errors and bad UTF-8 are ValueErrors
        raise StoreError(f"{path}: unreadable store file ({e})") from None
    if not isinstance(header, dict):
        raise StoreError(f"{path}: the safetensors header is not a JSON object")
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = np.dtype(_DTYPES[info["dtype"]])
            shape = tuple(int(x) for x in info["shape"])
            begin, end = (8 + head + int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise StoreError(f"{path}: entry {name!r} has a bad header ({e!r})") from None
        count = int(np.prod(shape, dtype=np.int64))
        if not 8 + head <= begin <= end <= size or end - begin != count * dtype.itemsize:
            raise StoreError(f"{path}: entry {name!r} lies outside the file or has the wrong size")
        out[name] = np.frombuffer(buf, dtype, count, begin).reshape(shape)
    return out


def _read_ids(path: Path, manifest: dict[str, Any], n: int) -> Sequence[str]:
    """The store's ids: ids.json up to format 2, else the manifest's corpus.ids ("index" or "packed")."""
    if manifest["format_version"] < 3:
        try:
            return json.loads((path / "ids.json").read_text())
        except (OSError, ValueError) as e:
            raise StoreError(f"{path / 'ids.json'}: unreadable ids ({e})") from None
    kind = manifest["corpus"].get("ids")
    if kind == "index":
        return IndexIds(n)
    if kind != "packed":
        raise StoreError(f"{path / MANIFEST}: corpus.ids is {kind!r}, expected 'index' or 'packed'")
    arrays = map_safetensors(path / IDS_FILE)
    try:
        ids = PackedIds(arrays["offsets"], arrays["data"], arrays["order"])
    except KeyError as e:
        raise StoreError(f"{path / IDS_FILE}: no {e} entry") from None
    if len(ids) != n or ids.order.size != n or int(ids.offsets[0]) != 0 or int(ids.offsets[-1]) != ids.data.size:
        raise StoreError(f"{path / IDS_FILE}: offsets, data and order do not describe {n} ids")
    return ids


def _verify(path: Path, files: dict[str, str]) -> None:
    """Every file's sha256 against the manifest, several files at once (hashlib releases the GIL)."""
    for name in files:
        if not (path / name).is_file():
            raise StoreError(f"{path / name}: missing from the store")
    names = sorted(files, key=lambda name: -(path / name).stat().st_size)  # largest first
    with ThreadPoolExecutor(max(1, min(len(names), torch.get_num_threads()))) as pool:
        digests = dict(zip(names, pool.map(lambda name: file_sha256(path / name), names), strict=True))
    for name in names:
        if digests[name] != files[name]:
            raise StoreError(f"{path / name}: sha256 does not match the manifest; the store is corrupt")


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
    missing = [k for k in ("files", "model", "corpus", "config", "shapes") if not isinstance(manifest.get(k), dict)]
    if missing:  # a KeyError traceback later otherwise
        raise StoreError(f"{mf}: no {', '.join(missing)} object in the manifest (not written by `stride build`?)")
    return manifest


def load_store(path: str | Path, verify: bool = True) -> Store:
    path = Path(path)
    manifest = read_manifest(path)
    if verify:
        _verify(path, manifest["files"])
    try:
        basis = load_file(path / "basis.safetensors")
        A = load_file(path / "operators.safetensors")["A"]
    except Exception as e:  # safetensors raises several types for damaged files
        raise StoreError(f"{path}: unreadable store file ({e})") from None
    mem = map_safetensors(path / "membership.safetensors")
    ex = map_safetensors(path / "examples.safetensors")
    for file, arrays, names in (("membership", mem, ("crow", "col")), ("examples", ex, ("offsets", "lengths"))):
        if any(name not in arrays for name in names):
            raise StoreError(f"{path / (file + '.safetensors')}: needs entries {', '.join(names)}")
    n = int(ex["offsets"].size)
    ids = _read_ids(path, manifest, n)
    if len(ids) != n or ex["lengths"].size != n or int(mem["crow"][-1]) != mem["col"].size:
        raise StoreError(f"{path}: {len(ids)} ids, {n} offsets, {ex['lengths'].size} lengths and "
                         f"{mem['col'].size} memberships (crow ends at {int(mem['crow'][-1])}) do not agree")
    K, r, d = A.shape
    ops = SteeringOperators(d, r, K)
    ops.load_state_dict({"h_mean": basis["h_mean"], "h_scale": basis["h_scale"].reshape(()),
                         "w_psi": basis["w_psi"], "A": A})
    corpus = Corpus(path / "corpus.jsonl", ids, ex["offsets"], ex["lengths"])
    # the columns stay int32 (format >= 2): an int64 copy cost 2.4 s and 800 MB at n = 10^7
    membership = Membership(torch.from_numpy(mem["crow"]), torch.from_numpy(mem["col"]), n)
    return Store(path, manifest, BuildConfig.from_dict(manifest["config"]), ops.requires_grad_(False),
                 membership, corpus)
