"""JSONL training corpus: validated once, then read lazily by byte offset."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np


class CorpusError(ValueError):
    """A corpus line that cannot be used; the message names file and line."""


@dataclass
class Record:
    id: str
    prompt: str  # "" for plain text examples: the loss then covers every token
    completion: str

    @property
    def text(self) -> str:
        return self.prompt + self.completion


def parse_record(obj: object, where: str, default_id: str) -> Record:
    if not isinstance(obj, dict):
        raise CorpusError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    rid = obj.get("id", default_id)
    if not isinstance(rid, str) or not rid:
        raise CorpusError(f"{where}: field 'id' must be a non-empty string, got {repr(rid)[:60]}")
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
            f"{where}: needs a string 'text', or string 'prompt' and 'completion' fields"
        )
    if not completion.strip():
        raise CorpusError(f"{where}: field 'completion' must be non-empty")
    return Record(str(rid), prompt, completion)


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


class Corpus:
    """Index of a JSONL file: ids and byte offsets, never the texts themselves."""

    def __init__(self, path: str | Path, ids: list[str], offsets: np.ndarray, lengths: np.ndarray):
        self.path = Path(path)
        self.ids = ids
        self.offsets = offsets
        self.lengths = lengths
        self._row = {rid: i for i, rid in enumerate(ids)}

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
        return self._row[rid]

    def records(self, indices: list[int] | np.ndarray) -> list[Record]:
        out = []
        with open(self.path, "rb") as f:
            for i in indices:
                f.seek(int(self.offsets[i]))
                obj = json.loads(f.read(int(self.lengths[i])))
                out.append(parse_record(obj, f"{self.path}#{i}", default_id=self.ids[i]))
        return out

    def record(self, i: int) -> Record:
        return self.records([i])[0]
