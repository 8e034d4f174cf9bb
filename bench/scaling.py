"""How STRIDE's per-query cost and store size grow with n, next to a projected-gradient baseline.

At each n, STRIDE uses the defaults' resolved shape (``BuildConfig().resolve(n, layers)``: K
subsets, rank r, d memberships) with synthetic operators (Gaussian, scaled like the benchmark's
trained ones) and a real random design; a query is the bench model's forward pass, the K
loss-drop measurements and the Lasso solve, each timed. The store is written with the core's
``write_store`` and measured on disk (without the corpus text copy).

The baseline keeps n projected gradients of dimension k (float32); its query is the bench model's
query gradient projected to k (measured) plus a dot product against the n stored rows. For n
above ``chunk`` rows, the product is timed over one synthesised chunk of ``chunk`` rows, run
n/chunk times in sequence (memory-bound either way; it keeps RAM use at chunk*k*4 bytes).
"""

from __future__ import annotations

import math
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from stride.config import BuildConfig, SolverConfig
from stride.corpus import Corpus, Record
from stride.design import random_design
from stride.measure import loss_drops
from stride.model import LM
from stride.operators import SteeringOperators
from stride.recovery import SparseDesign, solve
from stride.store import write_store


def _median_ms(fn, reps: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1e3)
    return float(np.median(out))


def stride_at(n: int, lm: LM, ref_ops: SteeringOperators, query: Record, model_dir: Path, reps: int,
              warmup: int = 1, seed: int = 0) -> dict:
    cfg = BuildConfig().resolve(n, lm.num_layers)
    K, r, d = int(cfg.num_subsets), cfg.rank, cfg.memberships
    ops = SteeringOperators(lm.hidden_size, r, K)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        ops.h_mean.copy_(ref_ops.h_mean)
        ops.h_scale.copy_(ref_ops.h_scale)
        if ref_ops.rank == r:
            ops.w_psi.copy_(ref_ops.w_psi)
        else:
            ops.w_psi.copy_(torch.randn(lm.hidden_size, r, generator=gen) / lm.hidden_size**0.5)
        ops.A.copy_(torch.randn(K, r, lm.hidden_size, generator=gen) * float(ref_ops.A.std()))
    ops.requires_grad_(False)
    t = time.perf_counter()
    membership = random_design(n, K, d, seed)
    design = SparseDesign(membership)
    setup_s = time.perf_counter() - t
    solver = SolverConfig()
    batch = lm.encode([query])
    state: dict = {}

    def forward():
        state["hz"] = lm.features(batch, int(cfg.layer))

    def measure():
        h, z = state["hz"]
        state["Y"] = loss_drops(lm, ops, h, z, batch.targets, solver.first_order)[1]

    def do_solve():
        state["sol"] = solve(design, state["Y"], solver.lam_ratio, solver.max_iter, solver.tol)

    parts = {"forward": _median_ms(forward, reps, max(warmup, 1)), "measure": _median_ms(measure, reps, max(warmup, 1)),
             "solve": _median_ms(do_solve, reps, warmup)}
    tmp = Path(tempfile.mkdtemp(prefix="stride-scale-"))
    try:
        stub = tmp / "stub.jsonl"
        stub.write_text('{"id": "x", "text": "x"}\n')
        ids = [f"doc-{i:08d}" for i in range(n)]
        corpus = Corpus(stub, ids, np.arange(n, dtype=np.int64) * 48, np.full(n, 48, dtype=np.int64))
        out = write_store(tmp / "store", config=cfg, ops=ops, membership=membership, corpus=corpus,
                          model_path=model_dir, model_sha256="synthetic")
        files = {p.name: p.stat().st_size for p in out.iterdir() if p.name != "corpus.jsonl"}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"n": n, "K": K, "rank": r, "memberships": d, "latency_ms": sum(parts.values()), "parts_ms": parts,
            "timed_repeats": reps,
            "solver_iterations": int(state["sol"].iterations), "converged": bool(state["sol"].converged.all()),
            "design_setup_s": setup_s, "store_bytes": sum(files.values()), "store_files": files}


def projected_at(n: int, k: int, query_cost_ms: float, reps: int, warmup: int = 1, chunk: int = 100_000) -> dict:
    rows = min(n, chunk)
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(rows, k, generator=gen)
    phi = torch.randn(k, generator=gen)
    times = math.ceil(n / rows)

    def dot():
        for _ in range(times):
            (X @ phi).sum()

    ms = _median_ms(dot, reps, warmup)
    return {"n": n, "proj_dim": k, "latency_ms": query_cost_ms + ms, "parts_ms": {"query_gradient+projection":
            query_cost_ms, "dot": ms}, "store_bytes": n * k * 4, "timed_rows": rows, "chunks": times}


def run_scaling(ns: list[int], model_dir: Path, store_dir: Path, query: dict, proj_dim: int,
                grad_query_ms: float, log=print) -> dict:
    from stride.store import load_store

    lm = LM.load(model_dir, "cpu")
    ref = load_store(store_dir, verify=False).operators
    rec = Record("q", query["prompt"], query["completion"])
    stride, proj = [], []
    for n in ns:
        reps, warm = (5, 1) if n <= 10_000 else (3, 1) if n <= 100_000 else (1, 0)
        s = stride_at(n, lm, ref, rec, model_dir, reps, warm)
        p = projected_at(n, proj_dim, grad_query_ms, reps, warm)
        log(f"  n={n:>8}: STRIDE {s['latency_ms']:.1f} ms, {s['store_bytes'] / 2**20:.1f} MiB | projected "
            f"gradients {p['latency_ms']:.1f} ms, {p['store_bytes'] / 2**20:.1f} MiB")
        stride.append(s)
        proj.append(p)
    return {"stride": stride, "projected_gradients": proj}
