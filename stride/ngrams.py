"""Exact word n-gram overlap index over a store's corpus: which training documents hold a text verbatim.

Contamination checks ask whether a benchmark item (question and answer) was in the training data.
Attribution says which documents taught the model the answer; this index says, lexically, which
documents contain the item's words in order. Words are lower-cased ``\\w+`` runs (case, punctuation
and spacing do not matter); a text's grams are its word n-grams (n = 8 by default; published
contamination checks use 8- to 13-grams), and a text shorter than n words is one gram of all its
words, found inside longer documents through the index's word postings. Grams are hashed to uint64
deterministically (blake2b of each word, a polynomial over the window, a splitmix64 finish; never
Python's salted ``hash``), so an index written by one process is read by another.

The index is sorted (hash, example row) pairs, 12 bytes each (uint64 + int32): one per distinct
n-gram of each document and one per distinct word of each document (sizes and build times:
``bench/results/contamination.md``). It is saved atomically *beside* the store (``STORE.ngrams-8.npz``:
the store's own files are hashed by its manifest) with the corpus's sha256, and rebuilt when the
corpus differs.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DEFAULT_N = 8
FORMAT = 2  # 2: word postings beside the n-grams
_WORD = re.compile(r"\w+")
_BASE = np.uint64(0x100000001B3)  # odd multiplier of the window polynomial (the FNV-64 prime)
_LENGTH = 0x9E3779B97F4A7C15  # the window's length enters the hash: a short text's gram != an n-gram


class NgramIndexError(RuntimeError):
    """An index file that cannot be used (the message names the file)."""


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def _mix(h: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: spreads the polynomial's low-entropy high bits (uint64 wraps)."""
    h = (h ^ (h >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    h = (h ^ (h >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return h ^ (h >> np.uint64(31))


class _WordHashes:
    """uint64 per word (blake2b, cached: a corpus has far fewer distinct words than words)."""

    def __init__(self) -> None:
        self.cache: dict[str, int] = {}

    def __call__(self, ws: list[str]) -> np.ndarray:
        out = np.empty(len(ws), np.uint64)
        cache = self.cache
        for i, w in enumerate(ws):
            h = cache.get(w)
            if h is None:
                h = cache[w] = int.from_bytes(hashlib.blake2b(w.encode(), digest_size=8).digest(), "little")
            out[i] = h
        return out


def _windows(wh: np.ndarray, n: int) -> np.ndarray:
    """Hash of every window of n consecutive word hashes (one window of all of them when fewer)."""
    m = len(wh)
    if m == 0:
        return np.empty(0, np.uint64)
    n = min(n, m)
    h = np.zeros(m - n + 1, np.uint64)
    for j in range(n):
        h = h * _BASE + wh[j : m - n + 1 + j]
    return _mix(h + np.uint64(n * _LENGTH % 2**64))


def gram_hashes(text: str, n: int = DEFAULT_N, hasher: Callable[[list[str]], np.ndarray] | None = None) -> np.ndarray:
    """The distinct gram hashes of a text, sorted."""
    return np.unique(_windows((hasher or _WordHashes())(words(text)), n))


def holds_phrase(text: str, phrase: str) -> bool:
    """Whether ``text`` contains ``phrase``'s words consecutively (lower-cased ``\\w+`` words): the
    answer verbatim, whatever the case, punctuation or spacing around it."""
    p = words(phrase)
    return bool(p) and f" {' '.join(p)} " in f" {' '.join(words(text))} "


def _sorted_pairs(keys: list[np.ndarray], rows: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    k = np.concatenate(keys) if keys else np.empty(0, np.uint64)
    r = np.concatenate(rows) if rows else np.empty(0, np.int32)
    order = np.lexsort((r, k))
    return k[order], r[order]


def _postings(keys: np.ndarray, rows: np.ndarray, wanted: np.ndarray) -> list[np.ndarray]:
    lo, hi = np.searchsorted(keys, wanted, "left"), np.searchsorted(keys, wanted, "right")
    return [rows[a:b] for a, b in zip(lo, hi, strict=True)]


@dataclass
class NgramIndex:
    """Sorted (hash, example row) pairs: every distinct word n-gram of each document, and every
    distinct word (so that an item shorter than n words, one gram of all its words, is found inside
    longer documents too: the documents holding all its words are read and checked)."""

    n: int
    hashes: np.ndarray  # (pairs,) uint64 n-gram hashes, sorted
    examples: np.ndarray  # (pairs,) int32: the example row holding each gram
    word_hashes: np.ndarray  # (word pairs,) uint64 word hashes, sorted
    word_examples: np.ndarray  # (word pairs,) int32
    num_examples: int
    corpus_sha256: str

    @classmethod
    def build(cls, texts: Iterable[str], n: int = DEFAULT_N, corpus_sha256: str = "") -> NgramIndex:
        """From the corpus's texts in row order."""
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        hasher, grams, words_, g_rows, w_rows, count = _WordHashes(), [], [], [], [], 0
        for i, text in enumerate(texts):
            wh = hasher(words(text))
            g = np.unique(_windows(wh, n)) if wh.size >= n else np.empty(0, np.uint64)
            u = np.unique(wh)
            grams.append(g)
            words_.append(u)
            g_rows.append(np.full(g.size, i, np.int32))
            w_rows.append(np.full(u.size, i, np.int32))
            count = i + 1
        return cls(n, *_sorted_pairs(grams, g_rows), *_sorted_pairs(words_, w_rows), count, corpus_sha256)

    @property
    def nbytes(self) -> int:
        return int(self.hashes.nbytes + self.examples.nbytes + self.word_hashes.nbytes + self.word_examples.nbytes)

    def overlaps(self, text: str, texts: Callable[[list[int]], list[str]] | None = None,
                 limit: int = 1000) -> tuple[np.ndarray, np.ndarray, int]:
        """Every example sharing a gram with ``text``: (rows, share of the text's distinct grams each
        holds, most first; the text's number of distinct grams).

        A text of fewer than n words is one gram: the examples holding all its words are candidates
        and ``texts`` (reading examples' texts by row) checks which hold the words in order; only the
        first ``limit`` candidates in corpus order are read (a short text of common words only)."""
        ws = words(text)
        if not ws:
            return np.empty(0, np.int64), np.empty(0), 0
        wh = _WordHashes()(ws)
        if len(ws) < self.n:
            if texts is None:
                raise TypeError("a text shorter than n words needs texts= to check its candidates")
            rows = None
            for post in sorted(_postings(self.word_hashes, self.word_examples, np.unique(wh)), key=len):
                rows = post if rows is None else np.intersect1d(rows, post, assume_unique=True)
                if rows.size == 0:
                    break
            rows = rows[:limit].astype(np.int64).tolist()
            held = [r for r, t in zip(rows, texts(rows) if rows else [], strict=True) if holds_phrase(t, text)]
            return np.asarray(held, np.int64), np.ones(len(held)), 1
        g = np.unique(_windows(wh, self.n))
        hits = np.concatenate(_postings(self.hashes, self.examples, g))
        rows, counts = np.unique(hits, return_counts=True)
        order = np.lexsort((rows, -counts))
        return rows[order].astype(np.int64), counts[order] / g.size, int(g.size)

    def save(self, path: str | Path) -> None:
        """Atomically (a temporary file renamed over the old index)."""
        path = Path(path)
        buf = io.BytesIO()
        np.savez(buf, hashes=self.hashes, examples=self.examples, word_hashes=self.word_hashes,
                 word_examples=self.word_examples, meta=np.array([FORMAT, self.n, self.num_examples], np.int64),
                 corpus_sha256=np.array(self.corpus_sha256))
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            f.write(buf.getvalue())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | Path) -> NgramIndex:
        path = Path(path)
        try:
            with np.load(path) as z:
                fmt, n, num = (int(x) for x in z["meta"])
                index = cls(n, z["hashes"], z["examples"], z["word_hashes"], z["word_examples"], num,
                            str(z["corpus_sha256"]))
        except (OSError, KeyError, ValueError) as e:
            raise NgramIndexError(f"{path}: unreadable n-gram index ({e})") from None
        if fmt != FORMAT or index.hashes.dtype != np.uint64 or index.hashes.shape != index.examples.shape \
                or index.word_hashes.shape != index.word_examples.shape:
            raise NgramIndexError(f"{path}: not an n-gram index of format {FORMAT}")
        return index


def index_path(store_path: str | Path, n: int = DEFAULT_N) -> Path:
    """``STORE.ngrams-N.npz`` beside the store directory (never inside it: its files are hashed)."""
    store_path = Path(store_path).resolve()
    return store_path.with_name(f"{store_path.name}.ngrams-{n}.npz")


def for_store(store, n: int = DEFAULT_N, chunk: int = 4096) -> tuple[NgramIndex, dict]:
    """The store's index, loaded when its recorded corpus sha256 is the store's, else built and saved.

    Returns (index, info: path, whether it was built, build seconds, size in bytes)."""
    path, sha = index_path(store.path, n), store.manifest["corpus"]["sha256"]
    if path.is_file():
        try:
            index = NgramIndex.load(path)
        except NgramIndexError:
            index = None  # damaged: rebuilt below
        if index is not None and index.corpus_sha256 == sha and index.n == n \
                and index.num_examples == len(store.corpus):
            return index, {"path": str(path), "built": False, "bytes": index.nbytes, "file_bytes": path.stat().st_size}
    t = time.perf_counter()
    corpus = store.corpus

    def texts() -> Iterable[str]:
        for s in range(0, len(corpus), chunk):
            yield from (r.text for r in corpus.records(range(s, min(s + chunk, len(corpus)))))

    index = NgramIndex.build(texts(), n, sha)
    index.save(path)
    return index, {"path": str(path), "built": True, "seconds": time.perf_counter() - t, "bytes": index.nbytes,
                   "file_bytes": path.stat().st_size}


# ---------------------------------------------------------------- contamination of benchmark items


@dataclass
class ItemCheck:
    """One benchmark item against its top proponents and against the whole corpus.

    A document *holds* an item when it has at least ``threshold`` of the item's distinct n-grams and
    the answer's words consecutively. The item is *flagged* when one of its top-k proponents holds it
    (``match``, its ``overlap`` and 1-based ``rank`` among the proponents: the first such one). Per
    the index alone, ``corpus_match`` is the corpus document holding it with the most overlap; an item
    with a corpus match but no flag is one the attribution does not trace to the copy it has seen.
    """

    flagged: bool
    match: int | None
    overlap: float
    rank: int | None
    answer_in_proponent: bool  # some top-k proponent contains the answer's words verbatim
    proponent_overlaps: list[float]  # each top proponent's share of the item's grams, in rank order
    corpus_match: int | None
    corpus_overlap: float
    grams: int


def check_item(index: NgramIndex, prompt: str, completion: str, proponents: Sequence[int],
               texts: Callable[[list[int]], list[str]], threshold: float = 0.5, candidates: int = 50) -> ItemCheck:
    """The flag rule above for one item (prompt = question, completion = answer); ``texts`` reads
    documents' texts by row (the answer check), ``candidates`` bounds the corpus documents read."""
    rows, shares, grams = index.overlaps(prompt + completion, texts)
    share_of = dict(zip(rows.tolist(), shares.tolist(), strict=True))
    proponents = [int(p) for p in proponents]
    prop_texts = texts(proponents) if proponents else []
    has_answer = [holds_phrase(t, completion) for t in prop_texts]
    overlaps = [share_of.get(p, 0.0) for p in proponents]
    match = next((k for k, (o, a) in enumerate(zip(overlaps, has_answer, strict=True)) if a and o >= threshold), None)
    close = [int(r) for r, s in zip(rows[:candidates], shares[:candidates], strict=False) if s >= threshold]
    held = [r for r, t in zip(close, texts(close) if close else [], strict=True) if holds_phrase(t, completion)]
    return ItemCheck(
        flagged=match is not None, match=None if match is None else proponents[match],
        overlap=0.0 if match is None else overlaps[match], rank=None if match is None else match + 1,
        answer_in_proponent=any(has_answer), proponent_overlaps=overlaps,
        corpus_match=held[0] if held else None, corpus_overlap=share_of[held[0]] if held else 0.0, grams=grams)
