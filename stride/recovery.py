"""Sparse recovery: an exact, certified Lasso with intercept, by working-set coordinate descent.

    w = argmin_w 1/2 ||y_c - M_c w||^2 + lam ||w||_1,   lam = lam_ratio * ||M_c^T y_c||_inf

``y_c`` and ``M_c`` are centred over subsets (the intercept, unpenalised, solved out). Every example
is in exactly d subsets, so each centred column is ``M_j - (d/K) 1`` with squared norm d (1 - d/K):
coordinate descent needs no Lipschitz constant, and a coordinate touches only its d rows. The
centring is a scalar: with ``R = y_c - M w`` kept explicitly, ``M_c_j^T r = sum_{k in S_j} R_k -
(d/K) sum(R)`` and ``r = R + (d/K) sum(w)``.

Per query: coordinate descent on a working set (the ``working_set`` columns with the largest
``|M_c^T y_c|``, default max(4K, n / 500)), then one full pass ``M_c^T r`` over all n examples, which gives the
full problem's duality gap; the query stops only when ``gap <= tol * primal`` (``converged``), else
the largest KKT violators join its working set and descent resumes. ``max_iter`` caps the descent
epochs (sweeps over the working set or its support) per query.

The design is held as a contiguous (n, d) array of subset ids (uint16 when K <= 65536: the full pass
reads 2 bytes per entry). Compiled with numba: full passes are fused over all active queries of a
batch; blocks of a pass, and per-query descent, run on a thread pool of ``torch.get_num_threads()``
threads (the kernels release the GIL). A query's arithmetic never depends on the other queries in
its batch, so its answer is the same alone or batched, bit for bit. On a CUDA design the full passes
run on the device through torch (the K x Q residuals go over; the descent stays on the CPU, where a
few thousand columns of d ids are fastest). Answers come back on the CPU. That path is tested here
through torch on the CPU only: no GPU was available to measure it.

Tolerance: ``tol`` bounds gap / primal (``SolverConfig.tol``'s comment, "relative to 1/2 ||y_c||^2",
described the former FISTA stop). At 1e-6 the objective is certified to six digits; the descent
takes up to ~1,200 epochs on dense-noise y at K = 1000 (support ~0.7 K), so ``max_iter`` must allow
that (``SolverConfig.max_iter`` = 500 came from FISTA; the default here is 10,000).

Measured with ``python -m bench.scaling`` (K = 1000, d = 10, lam = 0.2 lam_max, one thread, tol 1e-6,
planted and dense-noise y): 3 full passes per query from n = 10^4 up, every query certified.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from stride.design import Membership, jit

_BLOCK = 1 << 14  # columns per block of a full pass: per-block candidate lists stay small
# Growth of a working set after a full pass: every violator (|g_j| > lam) plus the nearest
# near-violators (|g_j| > 0.8 lam), GROW per violator and at least MIN_GROW. Adding violators alone
# took 4-5 full passes at n = 10^6 (each round uncovered a few new ones); this takes 3 (the first
# pass included) on planted and dense-noise y alike.
_NEAR, _GROW, _MIN_GROW = 0.8, 4, 256


@dataclass
class Solution:
    """Per query q: ``w`` is zero except at ``indices[q]``, where it is ``values[q]`` (float64)."""

    indices: list[Tensor]  # per query (nnz,) int64, increasing
    values: list[Tensor]  # per query (nnz,) float64
    num_examples: int
    intercept: Tensor  # (Q,)
    iterations: int  # most descent epochs of any query (per-query counts in ``epochs``)
    gap: Tensor  # (Q,) the full problem's duality gap relative to its primal objective
    converged: Tensor  # (Q,) bool: gap <= tol
    lam: Tensor  # (Q,)
    epochs: Tensor  # (Q,) descent epochs per query
    passes: Tensor  # (Q,) full passes over the n examples per query, the first (lambda_max) included

    @property
    def num_queries(self) -> int:
        return len(self.indices)

    def nonzeros(self) -> Tensor:
        return torch.tensor([i.numel() for i in self.indices], dtype=torch.long)

    def dense(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """(n, Q): for callers that need every score (the benchmark); O(n Q) memory."""
        out = torch.zeros(self.num_examples, self.num_queries, dtype=dtype)
        for q, (i, v) in enumerate(zip(self.indices, self.values, strict=True)):
            out[i, q] = v.to(dtype)
        return out

    def top(self, q: int, k: int, sign: float = 1.0) -> list[tuple[int, float]]:
        """The k largest ``sign * w`` that are strictly positive, as (index, w), over the support only."""
        vals = self.values[q] * sign
        keep = vals > 0
        idx, vals = self.indices[q][keep], vals[keep]
        order = torch.argsort(-vals, stable=True)[:k]
        return [(int(i), float(v) * sign) for i, v in zip(idx[order], vals[order], strict=True)]


class SparseDesign:
    """The centred design M_c, as each example's d subset ids (an (n, d) array, O(n d) to build).

    Nothing else is precomputed: no Lipschitz constant (descent uses the exact column norm), no
    transposed copy. On CUDA the ids also go to the device, for the full passes.
    """

    def __init__(self, membership: Membership, device: torch.device | str = "cpu"):
        self.K, self.n, self.d = membership.num_subsets, membership.num_examples, membership.memberships
        self.ids = membership.rows(np.uint16 if self.K <= 1 << 16 else np.int32)
        self.c = self.d / self.K  # every column mean
        self.col_norm2 = self.d * (1.0 - self.c)  # ||M_c_j||^2, the same for every j
        self.device = torch.device(device)
        self.ids_device = None
        if self.device.type == "cuda":
            self.ids_device = torch.from_numpy(self.ids.astype(np.int32)).to(self.device)

    @property
    def col_mean(self) -> Tensor:
        """(n,) column means of M, kept for callers of the former interface."""
        return torch.full((self.n,), self.c)

    def matvec(self, w: Tensor) -> Tensor:
        """M_c w: (n, Q) -> (K, Q), float64 on the CPU."""
        W = np.ascontiguousarray(w.detach().cpu().double().numpy().reshape(self.n, -1))
        out = np.zeros((self.K, W.shape[1]))
        _matvec(self.ids, W, out)
        out -= self.c * W.sum(0)
        return torch.from_numpy(out)

    def rmatvec(self, r: Tensor) -> Tensor:
        """M_c^T r: (K, Q) -> (n, Q), float64 on the CPU; O(n Q) memory, for tests and ablations."""
        R = np.ascontiguousarray(r.detach().cpu().double().numpy().reshape(self.K, -1))
        out = np.empty((self.n, R.shape[1]))
        _rmatvec(self.ids, R, self.c * R.sum(0), out)
        return torch.from_numpy(out)

    def dense(self) -> Tensor:
        """M (K, n) as float32, for small designs in tests."""
        out = torch.zeros(self.K, self.n)
        out[torch.from_numpy(self.ids.astype(np.int64)), torch.arange(self.n)[:, None]] = 1.0
        return out


# ---------------------------------------------------------------- compiled kernels


@jit()
def _rmatvec(ids, R, shift, out):  # pragma: no cover - compiled
    n, d = ids.shape
    for j in range(n):
        for q in range(R.shape[1]):
            s = 0.0
            for t in range(d):
                s += R[ids[j, t], q]
            out[j, q] = s - shift[q]


@jit()
def _matvec(ids, W, out):  # pragma: no cover - compiled
    n, d = ids.shape
    for j in range(n):
        for q in range(W.shape[1]):
            v = W[j, q]
            if v != 0.0:
                for t in range(d):
                    out[ids[j, t], q] += v


@jit()
def _keep_top(idx, val, count, cap):  # pragma: no cover - compiled
    """Keep the ``cap`` largest of val[:count] (ties: lower index) in front; return the new count."""
    if count <= cap:
        return count
    order = np.argsort(-val[:count], kind="mergesort")
    ti, tv = idx[order[:cap]].copy(), val[order[:cap]].copy()
    idx[:cap] = ti
    val[:cap] = tv
    return cap


@jit()
def _scan(G, q, lo, thr, cap, bidx, bval):  # pragma: no cover - compiled
    """Max |G[:, q]| and the ``cap`` largest above ``thr`` into bidx/bval (2 cap long); returns (max, count).

    The threshold rises to the cap-th largest kept whenever the buffer fills, so the buffer stays small.
    """
    size = bidx.size
    mx = 0.0
    cnt = 0
    for i in range(G.shape[0]):
        v = abs(G[i, q])
        if v > mx:
            mx = v
        if v > thr:
            if cnt == size:
                cnt = _keep_top(bidx, bval, cnt, cap)
                thr = max(thr, bval[cap - 1])
                if v <= thr:
                    continue
            bidx[cnt] = lo + i
            bval[cnt] = v
            cnt += 1
    return mx, _keep_top(bidx, bval, cnt, cap)


@jit()
def _full_pass(ids, R, shift, thr, cap, b0, b1, out_max, out_idx, out_val, out_cnt):  # pragma: no cover - compiled
    """Blocks b0..b1 of one pass over the n columns for the Qa queries of R (K, Qa), fused: the ids are read once.

    g_j = sum_{k in S_j} R[k] - shift; per block of columns and query: max |g| and the ``cap``
    largest |g| above ``thr``. Gather first, scan after: a fused scan with per-query state in
    arrays ran 6x slower than the bare gather (63 against 10 ms at n = 10^6, Q = 1).
    """
    n, d = ids.shape
    Qa = R.shape[1]
    for b in range(b0, b1):
        lo = b * _BLOCK
        hi = min(n, lo + _BLOCK)
        G = np.empty((hi - lo, Qa))
        if Qa == 1:
            for j in range(lo, hi):
                s = 0.0
                for t in range(d):
                    s += R[ids[j, t], 0]
                G[j - lo, 0] = s - shift[0]
        else:
            for j in range(lo, hi):  # the same order of sums as above: a query's g never depends on Qa
                for q in range(Qa):
                    G[j - lo, q] = 0.0
                for t in range(d):
                    row = ids[j, t]
                    for q in range(Qa):
                        G[j - lo, q] += R[row, q]
                for q in range(Qa):
                    G[j - lo, q] -= shift[q]
        bidx = np.empty(2 * cap, np.int64)
        bval = np.empty(2 * cap)
        for q in range(Qa):
            mx, c = _scan(G, q, lo, thr[q], cap, bidx, bval)
            out_max[b, q] = mx
            out_cnt[b, q] = c
            out_idx[b, q, :c] = bidx[:c]
            out_val[b, q, :c] = bval[:c]


@jit()
def _sweep(ids_w, order, count, w, R, S, sumR, c, inv, step):  # pragma: no cover - compiled
    """One coordinate-descent sweep over columns order[:count]; returns (S, sumR, largest |step|)."""
    d = ids_w.shape[1]
    moved = 0.0
    for a in range(count):
        i = order[a]
        g = -c * sumR
        for t in range(d):
            g += R[ids_w[i, t]]
        old = w[i]
        z = old + g * inv
        new = z - step if z > step else (z + step if z < -step else 0.0)
        if new != old:
            delta = new - old
            w[i] = new
            S += delta
            sumR -= d * delta
            for t in range(d):
                R[ids_w[i, t]] -= delta
            if abs(delta) > moved:
                moved = abs(delta)
    return S, sumR, moved


@jit()
def _residual(ids_w, order, count, w, yc, R):  # pragma: no cover - compiled
    """R = y_c - M w over columns order[:count] (the others zero); returns sum(w)."""
    d = ids_w.shape[1]
    R[:] = yc
    S = 0.0
    for a in range(count):
        i = order[a]
        v = w[i]
        if v != 0.0:
            S += v
            for t in range(d):
                R[ids_w[i, t]] -= v
    return S


@jit()
def _objective(R, off, lam, w, order, count):  # pragma: no cover - compiled
    rr = 0.0
    for k in range(R.size):
        r = R[k] + off
        rr += r * r
    l1 = 0.0
    for a in range(count):
        l1 += abs(w[order[a]])
    return 0.5 * rr + lam * l1


_AA = 5  # Anderson acceleration memory: on dense-noise y (support ~0.7 K) it cut descent epochs ~5x


@jit()
def _anderson(hist):  # pragma: no cover - compiled
    """Extrapolation weights from the last AA+1 iterates (rows of hist): min ||sum c_i U_i||, sum c = 1."""
    M = hist.shape[0] - 1
    U = hist[1:] - hist[:-1]
    C = U @ U.T
    reg = 1e-10 * max(np.trace(C), 1e-300)
    for i in range(M):
        C[i, i] += reg
    z = np.ones(M)
    # Gaussian elimination with partial pivoting (M = 5): no LAPACK call, no exception path
    A = C.copy()
    for col in range(M):
        p = col
        for r in range(col + 1, M):
            if abs(A[r, col]) > abs(A[p, col]):
                p = r
        if A[p, col] == 0.0:
            return np.zeros(0)
        if p != col:
            for k in range(M):
                A[col, k], A[p, k] = A[p, k], A[col, k]
            z[col], z[p] = z[p], z[col]
        for r in range(col + 1, M):
            f = A[r, col] / A[col, col]
            for k in range(col, M):
                A[r, k] -= f * A[col, k]
            z[r] -= f * z[col]
    for r in range(M - 1, -1, -1):
        s = z[r]
        for k in range(r + 1, M):
            s -= A[r, k] * z[k]
        z[r] = s / A[r, r]
    tot = z.sum()
    if tot == 0.0 or not np.isfinite(tot):
        return np.zeros(0)
    return z / tot


@jit()
def _cd(ids_w, w, yc, c, nrm, lam, tol_rel, max_epochs):  # pragma: no cover - compiled
    """Coordinate descent on one query's working set (m, d), from ``w``, until the working-set
    duality gap is <= tol_rel * primal or ``max_epochs`` sweeps. Returns (epochs, R, max_W |g|).

    Each round: one sweep over the whole set and its gap; then sweeps over the support alone (the
    set is a few thousand columns, the support at most ~K), Anderson-extrapolated every AA sweeps and
    kept when it lowers the objective, until they stop moving.
    """
    m, d = ids_w.shape
    everything = np.arange(m)
    R = np.empty_like(yc)
    S = _residual(ids_w, everything, m, w, yc, R)
    sumR = R.sum()
    inv = 1.0 / nrm
    step = lam * inv
    active = np.empty(m, np.int64)
    hist = np.empty((_AA + 1, m))
    R_try = np.empty_like(yc)
    epochs = 0
    maxg = 0.0
    while True:
        S, sumR, big = _sweep(ids_w, everything, m, w, R, S, sumR, c, inv, step)
        epochs += 1
        maxg = 0.0
        l1 = 0.0
        for i in range(m):
            g = -c * sumR
            for t in range(d):
                g += R[ids_w[i, t]]
            if abs(g) > maxg:
                maxg = abs(g)
            l1 += abs(w[i])
        gap, primal = _gap(R, yc, c * S, lam, l1, maxg)
        if gap <= tol_rel * primal or epochs >= max_epochs or big == 0.0:
            break
        na = 0
        for i in range(m):
            if w[i] != 0.0:
                active[na] = i
                na += 1
        filled = 0
        while epochs < max_epochs:
            S, sumR, moved = _sweep(ids_w, active, na, w, R, S, sumR, c, inv, step)
            epochs += 1
            for a in range(na):
                hist[filled, a] = w[active[a]]
            filled += 1
            if filled == _AA + 1:
                coef = _anderson(hist[:, :na])
                filled = 0
                if coef.size:
                    trial = np.zeros(m)
                    for a in range(na):
                        v = 0.0
                        for k in range(_AA):
                            v += coef[k] * hist[k + 1, a]
                        trial[active[a]] = v
                    S_try = _residual(ids_w, active, na, trial, yc, R_try)
                    if _objective(R_try, c * S_try, lam, trial, active, na) < _objective(R, c * S, lam, w, active, na):
                        for a in range(na):
                            w[active[a]] = trial[active[a]]
                        R[:] = R_try
                        S = S_try
                        sumR = R.sum()
                        for a in range(na):
                            hist[0, a] = w[active[a]]
                        filled = 1
            if moved <= 1e-3 * big:  # the support has settled: back to a full sweep and the gap
                break
    return epochs, R, maxg


@jit()
def _gap(R, yc, off, lam, l1, maxg):  # pragma: no cover - compiled
    """Duality gap of the Lasso with intercept at residual r = R + off, with dual point
    theta = r * min(1, lam / max_j |M_c_j^T r|) (feasible: sum(theta) = sum(y_c) = 0 and |M_c^T theta| <= lam)."""
    s = 1.0 if maxg <= lam else lam / maxg
    rr = 0.0
    dd = 0.0
    for k in range(R.size):
        r = R[k] + off
        rr += r * r
        e = yc[k] - s * r
        dd += e * e
    yy = 0.0
    for k in range(R.size):
        yy += yc[k] * yc[k]
    primal = 0.5 * rr + lam * l1
    dual = 0.5 * yy - 0.5 * dd
    return max(primal - dual, 0.0), primal


# ---------------------------------------------------------------- the solve


_pool: ThreadPoolExecutor | None = None
_pool_size = 0


def _threads() -> int:
    """The process's thread budget is torch's: numba's own threading layer is not used, since its
    OpenMP layer shares the OpenMP runtime with torch and changed torch's thread count."""
    return max(1, torch.get_num_threads())


def _map(fn, items: list) -> list:
    """Full-pass blocks and per-query descent on a thread pool (the kernels release the GIL); inline
    with one thread."""
    global _pool, _pool_size
    workers = min(_threads(), len(items))
    if workers <= 1:
        return [fn(x) for x in items]
    if _pool is None or _pool_size < workers:
        _pool_size = max(workers, os.cpu_count() or 1)
        _pool = ThreadPoolExecutor(max_workers=_pool_size, thread_name_prefix="stride-solve")
    return list(_pool.map(fn, items))


class _Query:
    """One query's working set and iterate."""

    def __init__(self, yc: np.ndarray, lam: float):
        self.yc, self.lam = yc, lam
        self.cols = np.zeros(0, np.int64)  # working set, increasing
        self.w = np.zeros(0)
        self.R = yc.copy()
        self.maxg_ws = 0.0
        self.epochs = 0
        self.passes = 1
        self.gap = math.inf
        self.primal = 0.0
        self.done = False
        self.tol_in = 0.0

    def set_columns(self, cols: np.ndarray) -> None:
        merged = np.union1d(self.cols, cols)
        w = np.zeros(merged.size)
        w[np.searchsorted(merged, self.cols)] = self.w
        self.cols, self.w = merged, w


def _candidates(design: SparseDesign, R: np.ndarray, shift: np.ndarray, thr: np.ndarray,
                want: int) -> tuple[np.ndarray, list[tuple[np.ndarray, np.ndarray]]]:
    """One fused full pass: per query, max_j |g_j| and about the ``want`` largest |g_j| > thr, g = R^T M - shift."""
    Qa = R.shape[1]
    if design.ids_device is not None:
        return _candidates_torch(design, R, shift, thr, want)
    nb = -(-design.n // _BLOCK)
    cap = int(min(_BLOCK, want if nb == 1 else math.ceil(2 * want * _BLOCK / design.n) + 32))
    out_max = np.zeros((nb, Qa))
    out_idx = np.empty((nb, Qa, cap), np.int64)
    out_val = np.empty((nb, Qa, cap))
    out_cnt = np.zeros((nb, Qa), np.int64)
    R = np.ascontiguousarray(R)
    parts = min(_threads(), nb)
    edges = [nb * i // parts for i in range(parts + 1)]
    _map(lambda i: _full_pass(design.ids, R, shift, thr, cap, edges[i], edges[i + 1], out_max, out_idx, out_val,
                              out_cnt), list(range(parts)))
    found = []
    for q in range(Qa):
        idx = np.concatenate([out_idx[b, q, : out_cnt[b, q]] for b in range(nb)])
        val = np.concatenate([out_val[b, q, : out_cnt[b, q]] for b in range(nb)])
        found.append((idx, val))
    return out_max.max(0), found


def _candidates_torch(design: SparseDesign, R: np.ndarray, shift: np.ndarray, thr: np.ndarray,
                      want: int) -> tuple[np.ndarray, list[tuple[np.ndarray, np.ndarray]]]:
    """The same pass on the design's device, in chunks; sums in a fixed order so a query's |g| does
    not depend on its batch."""
    dev = design.ids_device.device
    Rd = torch.from_numpy(np.ascontiguousarray(R)).to(dev)
    sh = torch.from_numpy(shift).to(dev)
    th = torch.from_numpy(thr).to(dev)
    Qa = R.shape[1]
    mx = torch.zeros(Qa, dtype=torch.float64, device=dev)
    best_v = [torch.zeros(0, dtype=torch.float64, device=dev) for _ in range(Qa)]
    best_i = [torch.zeros(0, dtype=torch.long, device=dev) for _ in range(Qa)]
    chunk = max(1, (1 << 26) // (Qa * design.d))
    for lo in range(0, design.n, chunk):
        ids = design.ids_device[lo : lo + chunk].long()
        g = Rd[ids[:, 0]]
        for t in range(1, design.d):
            g = g + Rd[ids[:, t]]
        g = (g - sh).abs()
        mx = torch.maximum(mx, g.amax(0))
        for q in range(Qa):
            sel = (g[:, q] > th[q]).nonzero().flatten()
            v = torch.cat([best_v[q], g[sel, q]])
            i = torch.cat([best_i[q], sel + lo])
            if v.numel() > want:
                top = torch.topk(v, want).indices
                v, i = v[top], i[top]
            best_v[q], best_i[q] = v, i
    return mx.cpu().numpy(), [(best_i[q].cpu().numpy(), best_v[q].cpu().numpy()) for q in range(Qa)]


def _start_threshold(design: SparseDesign, Yc: np.ndarray, shift: np.ndarray, want: int) -> np.ndarray:
    """Per query, a |M_c^T y_c| level that about 2 ``want`` columns exceed, from a strided sample of
    columns (its 64th largest of 32 n / want): the first pass then keeps few candidates (a zero
    threshold made it 2x slower, its buffers re-sorting as they fill)."""
    Q = Yc.shape[1]
    if 8 * want >= design.n:  # most columns are wanted anyway
        return np.zeros(Q)
    size = 32 * design.n // want
    step = design.n // size
    sample = np.ascontiguousarray(design.ids[::step])
    g = np.empty((sample.shape[0], Q))
    _rmatvec(sample, np.ascontiguousarray(Yc), shift, g)
    rank = min(64, sample.shape[0])
    return np.partition(np.abs(g), -rank, axis=0)[-rank]


def _top(idx: np.ndarray, val: np.ndarray, k: int, exclude: np.ndarray | None = None) -> np.ndarray:
    """The k largest val (ties: lower index) among idx not in ``exclude`` (sorted), increasing."""
    if exclude is not None and exclude.size and idx.size:
        keep = ~np.isin(idx, exclude, assume_unique=True)
        idx, val = idx[keep], val[keep]
    order = np.lexsort((idx, -val))[:k]
    return np.sort(idx[order])


@torch.no_grad()
def solve(
    design: SparseDesign, Y: Tensor, lam_ratio: float = 0.2, max_iter: int = 10_000,
    tol: float = 1e-6, working_set: int | None = None, max_rounds: int = 40, **_ignored,
) -> Solution:
    """Lasso with intercept for each column of Y (K, Q); certified: ``gap <= tol * primal`` or
    ``converged`` is False (``max_iter`` descent epochs, or ``max_rounds`` full passes, spent).

    ``tol`` is relative to the primal objective (gap / primal, so 1e-6 is six correct digits of the
    objective). Extra keywords of the former FISTA interface (``check_every``) are accepted and ignored.
    """
    Yn = Y.detach().to("cpu", torch.float64).numpy().reshape(design.K, -1)
    Q = Yn.shape[1]
    # per query, on its own contiguous column: numpy's sums over an axis of a (K, Q) array change
    # order with Q, and a query's answer must not depend on its batch
    cols = [np.ascontiguousarray(Yn[:, q]) for q in range(Q)]
    y_mean = np.array([v.sum() / design.K for v in cols])
    Yc = np.empty((design.K, Q))
    for q, v in enumerate(cols):
        Yc[:, q] = v - y_mean[q]
    c, nrm = design.c, design.col_norm2
    # 4K columns to start with, n / 500 beyond n = 2 10^6: at n = 10^7 a 4K start missed >1,000 columns
    # of planted-y solutions (4 full passes, ~280 ms CPU); 20,000 took 3 (~220 ms); descent on the
    # larger set costs far less than a pass over 10^7 columns
    size = int(min(design.n, working_set or max(4 * design.K, design.n // 500)))
    # pass 1: lambda_max and each query's starting working set
    shift = c * np.array([np.ascontiguousarray(Yc[:, q]).sum() for q in range(Q)])
    g_max, found = _candidates(design, Yc, shift, _start_threshold(design, Yc, shift, size), size)
    lam = lam_ratio * g_max
    queries = [_Query(np.ascontiguousarray(Yc[:, q]), float(lam[q])) for q in range(Q)]
    for q, st in enumerate(queries):
        half = 0.5 * float(st.yc @ st.yc)
        # constant y, y_c orthogonal to every column, or lam >= lam_max: w = 0 exactly (descent could
        # leave a rounding-level weight at the column that sets lam_max)
        if half <= 0.0 or g_max[q] <= 0.0 or lam_ratio >= 1.0 or nrm <= 0.0:  # nrm = 0: d = K, M_c = 0
            st.done, st.gap, st.primal = True, 0.0, half
            continue
        st.set_columns(_top(*found[q], size))
        st.tol_in = 0.5 * tol
    ids = design.ids

    def descend(st: _Query) -> None:
        ep, st.R, st.maxg_ws = _cd(ids[st.cols], st.w, st.yc, c, nrm, st.lam, st.tol_in, max(1, max_iter - st.epochs))
        st.epochs += ep

    def certify(st: _Query, g_max_all: float) -> bool:
        """The full gap at the query's iterate; True when it is done (certified, or out of epochs)."""
        st.passes += 1
        gap, st.primal = _gap(st.R, st.yc, c * float(st.w.sum()), st.lam, float(np.abs(st.w).sum()), g_max_all)
        st.gap = float(gap)
        st.done = st.gap <= tol * st.primal or st.epochs >= max_iter
        return st.done

    for _ in range(max_rounds):
        active = [st for st in queries if not st.done]
        if not active:
            break
        _map(descend, active)
        partial = []
        for st in active:
            if st.cols.size < design.n:
                partial.append(st)
            else:  # the set is every column: its own gap is the full one, no pass needed
                if not certify(st, st.maxg_ws):
                    st.tol_in *= 0.1
                st.passes -= 1
        if not partial:
            continue
        # one fused pass over the queries still open: the full gap, and each one's KKT violators
        R = np.stack([st.R for st in partial], 1)
        shift = c * np.array([st.R.sum() for st in partial])
        g_all, found = _candidates(design, R, shift, _NEAR * np.array([st.lam for st in partial]), size)
        for st, gm, (idx, val) in zip(partial, g_all, found, strict=True):
            if certify(st, float(gm)):
                continue
            outside = ~np.isin(idx, st.cols)
            viol = int((val[outside] > st.lam).sum())
            add = _top(idx, val, min(st.cols.size, max(_GROW * viol, _MIN_GROW)), exclude=st.cols) if viol else idx[:0]
            if add.size:
                st.set_columns(add)
            else:  # no violator left: the set itself needs a more precise solve
                st.tol_in *= 0.1
    gap = np.array([st.gap / st.primal if st.primal > 0 else 0.0 for st in queries])
    out_i, out_v, intercept = [], [], []
    for q, st in enumerate(queries):
        nz = st.w != 0
        out_i.append(torch.from_numpy(st.cols[nz].astype(np.int64)))
        out_v.append(torch.from_numpy(st.w[nz].copy()))
        intercept.append(y_mean[q] - c * float(st.w.sum()))
    epochs = torch.tensor([st.epochs for st in queries], dtype=torch.long)
    return Solution(
        indices=out_i, values=out_v, num_examples=design.n,
        intercept=torch.tensor(intercept, dtype=torch.float64),
        iterations=int(epochs.max()) if Q else 0,
        gap=torch.from_numpy(gap), converged=torch.from_numpy(gap <= tol) if Q else torch.zeros(0, dtype=torch.bool),
        lam=torch.from_numpy(np.asarray(lam, dtype=np.float64)),
        epochs=epochs, passes=torch.tensor([st.passes for st in queries], dtype=torch.long),
    )


def duality_gap(design: SparseDesign, yc: Tensor, w: Tensor, lam: Tensor) -> Tensor:
    """The full problem's duality gap for a dense w (n, Q): an independent check, O(n Q)."""
    yc = yc.detach().cpu().double().reshape(design.K, -1)
    r = yc - design.matvec(w)
    primal = 0.5 * (r**2).sum(0) + lam.double().cpu() * w.detach().cpu().double().abs().sum(0)
    corr = design.rmatvec(r).abs().amax(0)
    theta = r * torch.clamp(lam.double().cpu() / corr.clamp_min(1e-300), max=1.0)
    dual = 0.5 * (yc**2).sum(0) - 0.5 * ((yc - theta) ** 2).sum(0)
    return (primal - dual).clamp_min(0)
