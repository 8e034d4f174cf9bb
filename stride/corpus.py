"""JSONL training corpus: validated once, then read lazily by byte offset."""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stride.design import jit


class CorpusError(ValueError):
    """A corpus line that cannot be used; the message names file and line."""


@dataclass
class Record:
    id: str
    prompt: str  # "" for plain text examples: the loss then covers every token
    completion: str
    messages: list[dict[str, str]] | None = None  # a chat example: the loss covers its assistant turns

    @property
    def text(self) -> str:
        if self.messages is not None:
            return "\n".join(f"{m['role']}: {m['content']}" for m in self.messages)
        return self.prompt + self.completion


def parse_messages(messages: object, where: str) -> list[dict[str, str]]:
    """A chat example's turns: a non-empty list of {role, content} strings with an assistant turn to learn."""
    if not isinstance(messages, list) or not messages:
        raise CorpusError(f"{where}: field 'messages' must be a non-empty list of {{role, content}} objects")
    out = []
    for j, m in enumerate(messages):
        if not isinstance(m, dict) or set(m) != {"role", "content"}:
            raise CorpusError(f"{where}: messages[{j}] must be an object with exactly 'role' and 'content'")
        if not isinstance(m["role"], str) or not m["role"] or not isinstance(m["content"], str):
            raise CorpusError(f"{where}: messages[{j}]: 'role' must be a non-empty string, 'content' a string")
        out.append({"role": m["role"], "content": m["content"]})
    if not any(m["role"] == "assistant" and m["content"].strip() for m in out):
        raise CorpusError(f"{where}: no non-empty assistant message: nothing to train on (the loss covers "
                          "assistant turns only)")
    return out


def parse_record(obj: object, where: str, default_id: str) -> Record:
    if not isinstance(obj, dict):
        raise CorpusError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    rid = obj.get("id", default_id)
    if not isinstance(rid, str) or not rid:
        raise CorpusError(f"{where}: field 'id' must be a non-empty string, got {repr(rid)[:60]}")
    if "messages" in obj:
        if {"text", "prompt", "completion"} & set(obj):
            raise CorpusError(f"{where}: give 'messages', 'text' or 'prompt'+'completion', not several")
        return Record(str(rid), "", "", parse_messages(obj["messages"], where))
    if "text" in obj:
        if "prompt" in obj or "completion" in obj:
            raise CorpusError(f"{where}: give either 'text' or 'prompt'+'completion', not both")
        text = obj["text"]
        if not isinstance(text, str) or not text.strip():
            raise CorpusError(f"{where}: field 'text' must be a non-empty string")
        return Record(str(rid), "", text)
    prompt, completion = obj.get("prompt"), obj.get("completion")
    if not isinstance(prompt, str) or not isinstance(completion, str):
        raise CorpusError(
            f"{where}: needs a string 'text', string 'prompt' and 'completion' fields, or a 'messages' list"
        )
    if not completion.strip():
        raise CorpusError(f"{where}: field 'completion' must be non-empty")
    return Record(str(rid), prompt, completion)


def file_sha256(path: str | Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


_FNV_OFFSET, _FNV_PRIME = np.uint64(0xCBF29CE484222325), np.uint64(0x100000001B3)


@jit()
def _fnv1a(data, lo, hi):  # pragma: no cover - compiled
    """FNV-1a 64 of data[lo:hi]: a stable hash (Python's ``hash`` of a str changes per process)."""
    h = _FNV_OFFSET
    for p in range(lo, hi):
        h = (h ^ np.uint64(data[p])) * _FNV_PRIME
    return h


@jit()
def _hash_ids(data, offsets, out):  # pragma: no cover - compiled
    for i in range(out.size):
        out[i] = _fnv1a(data, offsets[i], offsets[i + 1])


@jit()
def _find_id(data, offsets, order, key):  # pragma: no cover - compiled
    """Row of the id whose bytes are ``key``, or -1: binary search over ``order`` (rows by hash, ties by
    row), hashing the ~log2(n) ids it visits, then a byte comparison over the equal hashes."""
    h = _fnv1a(key, 0, key.size)
    lo, hi = 0, order.size
    while lo < hi:
        mid = (lo + hi) // 2
        j = order[mid]
        if _fnv1a(data, offsets[j], offsets[j + 1]) < h:
            lo = mid + 1
        else:
            hi = mid
    while lo < order.size:
        j = order[lo]
        if _fnv1a(data, offsets[j], offsets[j + 1]) != h:
            break
        if offsets[j + 1] - offsets[j] == key.size:
            same = True
            for p in range(key.size):
                if data[offsets[j] + p] != key[p]:
                    same = False
                    break
            if same:
                return j
        lo += 1
    return -1


class IndexIds(Sequence[str]):
    """The default ids, ``str(i)`` for example i: nothing stored, nothing parsed at load."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [str(j) for j in range(self.n)[i]]
        if not -self.n <= i < self.n:
            raise IndexError(i)
        return str(i % self.n)

    def find(self, rid: str) -> int:
        """Row of ``rid``, or -1 (only the canonical decimal ``str(i)`` names row i)."""
        if not (rid.isascii() and rid.isdigit()) or (len(rid) > 1 and rid[0] == "0"):
            return -1
        i = int(rid)
        return i if i < self.n else -1

    def __contains__(self, rid: object) -> bool:
        return isinstance(rid, str) and self.find(rid) >= 0


class PackedIds(Sequence[str]):
    """Ids as one UTF-8 blob and n + 1 offsets, plus the rows ordered by each id's FNV-1a hash.

    No Python object per example: a str is made only when one is read, and a lookup by id is a
    binary search. A store of n = 10^7 ids once spent ~6.5 s of start-up on ``json.loads`` of
    ids.json and a dict over it (~1 GiB resident, ``bench/scaling.py``); loaded from a memory map,
    this costs nothing until an id is read.
    """

    def __init__(self, offsets: np.ndarray, data: np.ndarray, order: np.ndarray):
        self.offsets, self.data, self.order = offsets, data, order

    @classmethod
    def pack(cls, ids: Sequence[str]) -> PackedIds:
        """O(n) to pack plus a sort of n hashes (~1 s at n = 10^7; paid once, at build time)."""
        encoded = [rid.encode() for rid in ids]
        offsets = np.zeros(len(encoded) + 1, np.int64)
        np.cumsum(np.fromiter(map(len, encoded), np.int64, len(encoded)), out=offsets[1:])
        data = np.frombuffer(bytearray().join(encoded), np.uint8)  # writable: torch tensors need it
        hashes = np.empty(len(encoded), np.uint64)
        _hash_ids(data, offsets, hashes)
        order = np.argsort(hashes, kind="stable").astype(np.int32 if len(encoded) < 2**31 else np.int64)
        if offsets[-1] < 2**31:  # 4 bytes an id instead of 8 (40 MB at n = 10^7)
            offsets = offsets.astype(np.int32)
        return cls(offsets, data, order)

    def __len__(self) -> int:
        return self.offsets.size - 1

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(len(self))[i]]
        n = len(self)
        if not -n <= i < n:
            raise IndexError(i)
        i %= n
        return self.data[int(self.offsets[i]) : int(self.offsets[i + 1])].tobytes().decode()

    def find(self, rid: str) -> int:
        """Row of ``rid``, or -1."""
        return int(_find_id(self.data, self.offsets, self.order, np.frombuffer(rid.encode(), np.uint8)))

    def __contains__(self, rid: object) -> bool:
        return isinstance(rid, str) and self.find(rid) >= 0


class Corpus:
    """Index of a JSONL file: ids and byte offsets, never the texts themselves.

    ``ids`` is a list (a scanned corpus, or a store written before format 3), ``IndexIds`` or
    ``PackedIds``; lookups by id go through ``index_of``. Records are read with ``os.pread`` on one
    descriptor opened on first use and kept: no open per query, safe from several threads, and a
    store replaced on disk meanwhile goes on reading the file its offsets describe.
    """

    def __init__(self, path: str | Path, ids: Sequence[str], offsets: np.ndarray, lengths: np.ndarray):
        self.path = Path(path)
        self.ids = ids
        self.offsets = offsets
        self.lengths = lengths
        self._row: dict[str, int] | None = None  # for list ids, built on the first lookup
        self._fd: int | None = None
        self._lock = threading.Lock()

    @classmethod
    def scan(cls, path: str | Path) -> Corpus:
        """Validate every line; raise CorpusError naming the first bad one."""
        path = Path(path)
        if not path.is_file():
            raise CorpusError(f"{path}: no such file")
        ids: list[str] = []
        offsets: list[int] = []
        lengths: list[int] = []
        seen: dict[str, int] = {}
        pos = 0
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, start=1):
                start, pos = pos, pos + len(raw)
                if not raw.strip():
                    continue
                where = f"{path}:{lineno}"
                try:
                    obj = json.loads(raw)
                except (json.JSONDecodeError, UnicodeDecodeError) as e:
                    raise CorpusError(f"{where}: invalid JSON ({e})") from None
                rec = parse_record(obj, where, default_id=str(len(ids)))
                if rec.id in seen:
                    raise CorpusError(f"{where}: duplicate id {rec.id!r} (first on line {seen[rec.id]})")
                seen[rec.id] = lineno
                ids.append(rec.id)
                offsets.append(start)
                lengths.append(len(raw))
        if not ids:
            raise CorpusError(f"{path}: the corpus has no examples")
        return cls(path, ids, np.asarray(offsets, np.int64), np.asarray(lengths, np.int64))

    def __len__(self) -> int:
        return len(self.ids)

    def index_of(self, rid: str) -> int:
        """Row of the example with id ``rid``; KeyError when there is none."""
        find = getattr(self.ids, "find", None)
        if find is not None:
            i = find(rid)
        else:
            if self._row is None:
                self._row = {r: i for i, r in enumerate(self.ids)}
            i = self._row.get(rid, -1)
        if i < 0:
            raise KeyError(rid)
        return i

    def _descriptor(self) -> int:
        if self._fd is None:
            with self._lock:
                if self._fd is None:
                    self._fd = os.open(self.path, os.O_RDONLY)
        return self._fd

    def records(self, indices: list[int] | np.ndarray) -> list[Record]:
        fd = self._descriptor()
        out = []
        for i in indices:
            where, size = f"{self.path}#{i}", int(self.lengths[i])
            raw = os.pread(fd, size, int(self.offsets[i]))
            if len(raw) != size:
                raise CorpusError(f"{where}: the file ends before this record (truncated since it was indexed)")
            try:
                obj = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise CorpusError(f"{where}: invalid JSON ({e}); the file changed since it was indexed") from None
            out.append(parse_record(obj, where, default_id=self.ids[i]))
        return out

    def close(self) -> None:
        fd, self._fd = getattr(self, "_fd", None), None
        if fd is not None:
            os.close(fd)

    def __del__(self) -> None:
        self.close()

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fd": None, "_lock": None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _lock=threading.Lock())

    def record(self, i: int) -> Record:
        return self.records([i])[0]
