"""Random subset design: each example joins exactly ``d`` of ``K`` subsets.

The membership matrix M (K x n) is then a left-d-regular bipartite graph, an expander with high
probability, which is what makes sparse recovery from K << n measurements work.

Every conversion here is O(n d) (counting passes in compiled loops, no sorts): a store with
n = 10^7 must load in seconds (issue 9).
"""

from __future__ import annotations

import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numba
import numpy as np
import torch
from torch import Tensor


def jit(**options):
    """``numba.njit(cache=True, nogil=True)``, without the on-disk cache where none is writable.

    numba refuses ``cache=True`` at decoration when neither the package directory nor a user cache
    directory can be written (a read-only container); the module must still import there.
    """

    def wrap(fn):
        try:
            return numba.njit(cache=True, nogil=True, **options)(fn)
        except RuntimeError:  # "cannot cache function ...: no locator available"
            return numba.njit(nogil=True, **options)(fn)

    return wrap


_BLOCK = 1 << 16  # examples per block: a block's rows (~1.3 MB at d = 10) stay in cache


@jit()
def _block_starts(crow, col, n, starts):  # pragma: no cover - compiled
    """starts[b, k]: where subset k's examples reach block b (binary search in each sorted CSR row)."""
    nb = starts.shape[0] - 1
    for k in range(crow.size - 1):
        lo, hi = crow[k], crow[k + 1]
        for b in range(nb + 1):
            starts[b, k] = lo + np.searchsorted(col[lo:hi], min(n, b * _BLOCK))


@jit()
def _csr_to_rows(crow, col, starts, b0, b1, out):  # pragma: no cover - compiled
    """out[i] = the subsets of example i, increasing, for the examples of blocks b0..b1; returns the
    number of entries out of place (0 for a left-d-regular design).

    Example blocks, each subset's run inside a block read in turn: a plain scatter over all n
    misses cache and TLB on every write (6.3 s at n = 10^7, K = 1000, d = 10; blocked ~0.5 s when
    the machine is idle). Blocks are independent, so callers spread them over threads.
    """
    n, d = out.shape
    K = crow.size - 1
    fill = np.zeros(_BLOCK, np.int64)
    bad = 0
    for b in range(b0, b1):
        lo = b * _BLOCK
        hi = min(n, lo + _BLOCK)
        fill[:] = 0
        for k in range(K):
            for p in range(starts[b, k], starts[b + 1, k]):
                i = col[p] - lo
                if fill[i] >= d:
                    bad += 1
                else:
                    out[lo + i, fill[i]] = k
                    fill[i] += 1
        for i in range(hi - lo):
            if fill[i] != d:
                bad += 1
    return bad


@jit()
def _rows_to_csr(subsets, crow, col):  # pragma: no cover - compiled
    """Counting sort of (subset, example) pairs: each CSR row's examples come out increasing.

    Blocked like ``_csr_to_rows``: a block is sorted by subset in cache, then each subset's run is
    copied out whole (a direct scatter: 5.7 s at n = 10^7).
    """
    n, d = subsets.shape
    K = crow.size - 1
    for i in range(n):
        for t in range(d):
            crow[subsets[i, t] + 1] += 1
    for k in range(K):
        crow[k + 1] += crow[k]
    pos = crow[:-1].copy()
    local = np.empty(_BLOCK * d, np.int64)
    start = np.empty(K + 1, np.int64)
    for lo in range(0, n, _BLOCK):
        hi = min(n, lo + _BLOCK)
        start[:] = 0
        for i in range(lo, hi):
            for t in range(d):
                start[subsets[i, t] + 1] += 1
        for k in range(K):
            start[k + 1] += start[k]
        at = start[:-1].copy()
        for i in range(lo, hi):
            for t in range(d):
                k = subsets[i, t]
                local[at[k]] = i
                at[k] += 1
        for k in range(K):
            m = start[k + 1] - start[k]
            col[pos[k] : pos[k] + m] = local[start[k] : start[k + 1]]
            pos[k] += m


_M1, _M2, _GOLD = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB), np.uint64(0x9E3779B97F4A7C15)


@jit()
def _mix(x):  # pragma: no cover - compiled
    """splitmix64's finaliser: a counter-based generator, so draws do not depend on chunking or threads."""
    z = x + _GOLD
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


@jit()
def _draw_rows(n, K, d, seed, out):  # pragma: no cover - compiled
    """Row i: d distinct uniform ids in [0, K), redrawn whole until distinct (a uniform d-subset)."""
    key = _mix(np.uint64(seed))
    for i in range(n):
        attempt = 0
        while True:
            base = _mix(key ^ _mix(np.uint64(i) * np.uint64(64) + np.uint64(attempt)))
            for t in range(d):
                z = _mix(base + np.uint64(t))
                out[i, t] = ((z >> np.uint64(32)) * np.uint64(K)) >> np.uint64(32)
            ok = True
            for t in range(1, d):
                for u in range(t):
                    if out[i, t] == out[i, u]:
                        ok = False
            if ok:
                break
            attempt += 1


@dataclass
class Membership:
    """M in CSR form: row k lists the examples of subset k, in increasing order."""

    crow: Tensor  # (K+1,) int64
    col: Tensor  # (K*avg,) int64 (int32 accepted)
    num_examples: int
    _subsets_of: Tensor | None = field(default=None, repr=False, compare=False)

    @property
    def num_subsets(self) -> int:
        return int(self.crow.numel() - 1)

    @property
    def memberships(self) -> int:
        return int(self.col.numel() // self.num_examples)

    def members(self, k: int) -> Tensor:
        return self.col[self.crow[k] : self.crow[k + 1]]

    def subsets_of(self) -> Tensor:
        """(n, d) int32: the subsets each example belongs to, increasing; computed once."""
        if self._subsets_of is None:
            self._subsets_of = torch.from_numpy(self.rows(np.int32))
        return self._subsets_of

    def rows(self, dtype=np.int32) -> np.ndarray:
        """(n, d) subset ids per example as a new contiguous array of ``dtype``, in O(n d).

        ``uint16`` halves the solver's full-pass memory traffic when K <= 65536. Blocks of examples
        run on ``torch.get_num_threads()`` threads. Measured at n = 10^7, K = 1000, d = 10 on the
        2-core CPU under a load average of ~9, one thread: 3.4 s (the argsort it replaces: 1.3 s at 10^6).
        """
        n, d = self.num_examples, self.memberships
        if self.num_subsets > np.iinfo(dtype).max + 1:
            raise ValueError(f"{np.dtype(dtype).name} cannot hold {self.num_subsets} subset ids")
        out = np.empty((n, d), dtype=dtype)
        crow, col = self.crow.numpy(), self.col.numpy()
        nb = -(-n // _BLOCK)
        starts = np.empty((nb + 1, self.num_subsets), np.int64)
        _block_starts(crow, col, n, starts)
        parts = max(1, min(torch.get_num_threads(), nb))
        edges = [nb * i // parts for i in range(parts + 1)]
        if parts == 1:
            bad = _csr_to_rows(crow, col, starts, 0, nb, out)
        else:  # the kernel releases the GIL
            with ThreadPoolExecutor(parts) as pool:
                bad = sum(pool.map(lambda i: _csr_to_rows(crow, col, starts, edges[i], edges[i + 1], out),
                                   range(parts)))
        # entries outside 0..n-1 or rows that do not cover every entry
        bad += int(starts[0].sum() - crow[:-1].sum()) + int(crow[1:].sum() - starts[-1].sum())
        if bad:
            raise ValueError(f"{bad} examples are not in exactly {d} subsets: not a left-regular design")
        return out

    def sizes(self) -> Tensor:
        return self.crow[1:] - self.crow[:-1]

    def sparse(self, device: torch.device | str = "cpu", dtype=torch.float32) -> Tensor:
        values = torch.ones(self.col.numel(), dtype=dtype)
        with warnings.catch_warnings():  # "sparse CSR support is in beta": it is used on purpose
            warnings.simplefilter("ignore", UserWarning)
            m = torch.sparse_csr_tensor(self.crow, self.col.long(), values,
                                        size=(self.num_subsets, self.num_examples), check_invariants=False)
        return m.to(device)

    def dense(self) -> Tensor:
        return self.sparse().to_dense()


# Up to this many uniforms (n * K) the draw is the original top-d of K uniforms per example, so
# stores and benchmarks built before issue 9 keep their exact designs (n <= 134,217 at K = 1000);
# beyond it that draw costs minutes (10^10 uniforms at n = 10^7) and rejection sampling is used.
_TOPK_DRAW_LIMIT = 1 << 27


def random_design(num_examples: int, num_subsets: int, d: int, seed: int) -> Membership:
    """Each example picks d distinct subsets uniformly; deterministic in ``seed``, chunked to bound memory.

    Small designs (n K <= 2^27) or dense ones (d(d-1) > K) take the top d of K uniforms per example;
    large sparse ones draw d ids from a counter-based generator and redraw rows with a repeat (a
    uniform d-subset either way; about d(d-1)/2K = 4.5% of rows at K = 1000, d = 10): n = 10^7 in
    seconds instead of minutes.
    """
    if not 1 <= d <= num_subsets:
        raise ValueError(f"need 1 <= memberships ({d}) <= num_subsets ({num_subsets})")
    gen = torch.Generator().manual_seed(seed)
    picks = []
    if num_examples * num_subsets <= _TOPK_DRAW_LIMIT or d * (d - 1) > num_subsets:
        chunk = max(1, (1 << 22) // num_subsets)
        for start in range(0, num_examples, chunk):
            rows = min(chunk, num_examples - start)
            picks.append(torch.rand(rows, num_subsets, generator=gen).topk(d, dim=1).indices.to(torch.int32))
    else:
        rows = np.empty((num_examples, d), dtype=np.int32)
        _draw_rows(num_examples, num_subsets, d, seed & 0xFFFFFFFFFFFFFFFF, rows)
        return from_subsets(torch.from_numpy(rows), num_subsets)
    return from_subsets(torch.cat(picks), num_subsets)


def from_subsets(subsets: Tensor, num_subsets: int) -> Membership:
    """The membership whose example i belongs to the subsets in row i of ``subsets`` (n, d); O(n d)."""
    n, d = subsets.shape
    sub = np.ascontiguousarray(subsets.cpu().numpy())
    if sub.size and (int(sub.min()) < 0 or int(sub.max()) >= num_subsets):
        raise ValueError(f"subset ids must lie in 0..{num_subsets - 1}")
    crow = np.zeros(num_subsets + 1, dtype=np.int64)
    col = np.empty(n * d, dtype=np.int64)
    _rows_to_csr(sub, crow, col)
    return Membership(torch.from_numpy(crow), torch.from_numpy(col), n)
