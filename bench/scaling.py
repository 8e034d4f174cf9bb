"""How STRIDE's per-query cost and store size grow with n, next to a projected-gradient baseline.

At each n, STRIDE uses the defaults' resolved shape (``BuildConfig().resolve(n, layers)``: K
subsets, rank r, d memberships) with synthetic operators (Gaussian, scaled like the benchmark's
trained ones), a real random design and a corpus file of n short records. The store is written with
the core's ``write_store``, measured on disk (without the corpus text copy) and loaded as the service
loads it; a query is the whole ``Attributor.attribute`` call (forward pass, the K loss-drop
measurements, the Lasso solve, ranking and the top-10 proponents' and opponents' texts read back),
one thread, median of 5 after a warm-up (the previous single cold sample at n = 10^6 read 78 ms
for a solve that takes ~30 ms warm), with its own forward / measure / solve split.

The baseline keeps n projected gradients of dimension k (float32); its query is the bench model's
query gradient projected to k (measured) plus a dot product against the n stored rows. For n
above ``chunk`` rows, the product is timed over one synthesised chunk of ``chunk`` rows, run
n/chunk times in sequence (memory-bound either way; it keeps RAM use at chunk*k*4 bytes).

The solver study (``solver_scan``, also ``python -m bench.scaling --ns 1e3,1e4,1e5,1e6,1e7``) times the
Lasso alone on the issue 9 problem shape: K = 1000, d = 10, lambda = 0.2 lambda_max, y from 50 planted
nonzeros plus noise and dense-noise y, one thread (wall time, and the process's CPU time, which on a
shared CPU is the better estimate of an idle machine's wall time), tol 1e-6 (gap / primal), each
query alone and as a batch; and a written store's start-up in a fresh process: import, ``load_store``
(sha256 verification included, as the service does), the solver's design, one solve; with its resident
memory (from n = 10^5). ``run_scaling`` runs it at its ns, plus 10^7 when 10^6 is among them
(``--quick`` stays small: solves only, at 10^3 and 10^4, a few seconds).

Start-up alone, this code beside another checkout in the same run (the machine is shared, so only
side-by-side figures compare): ``python -m bench.scaling --startup-only --ns 1e5,1e6,1e7 --against DIR``
(DIR, e.g. ``git archive 17fb8e6 | tar -x -C DIR``, writes and loads its own store format).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from stride.config import BuildConfig, Query, SolverConfig
from stride.corpus import Corpus, Record
from stride.design import random_design
from stride.model import LM
from stride.operators import SteeringOperators
from stride.query import Attributor
from stride.recovery import SparseDesign, solve
from stride.store import load_store, write_store


def _median_ms(fn, reps: int, warmup: int = 1) -> tuple[float, float]:
    """Median wall and CPU milliseconds of ``fn`` (CPU time: on a shared machine, close to an idle one's wall)."""
    for _ in range(warmup):
        fn()
    wall, cpu = [], []
    for _ in range(reps):
        t, c = time.perf_counter(), time.process_time()
        fn()
        wall.append((time.perf_counter() - t) * 1e3)
        cpu.append((time.process_time() - c) * 1e3)
    return float(np.median(wall)), float(np.median(cpu))


def synthetic_corpus(path: Path, n: int, texts: bool = True) -> Corpus:
    """n examples with ids ``doc-%08d`` (so the store keeps packed ids, not the index flag); with
    ``texts`` a real JSONL file of n short records, else a one-line stub the offsets do not describe
    (for start-up timing, which reads no record)."""
    ids = [f"doc-{i:08d}" for i in range(n)]
    if not texts:
        path.write_text('{"id": "x", "text": "x"}\n')
        return Corpus(path, ids, np.arange(n, dtype=np.int64) * 48, np.full(n, 48, dtype=np.int64))
    lines = [f'{{"id": "{rid}", "text": "synthetic example {i} of the scaling corpus"}}\n'.encode()
             for i, rid in enumerate(ids)]
    lengths = np.fromiter(map(len, lines), np.int64, n)
    path.write_bytes(b"".join(lines))
    return Corpus(path, ids, np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths)


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
    membership = random_design(n, K, d, seed)
    tmp = Path(tempfile.mkdtemp(prefix="stride-scale-"))
    try:
        corpus = synthetic_corpus(tmp / "corpus.jsonl", n)
        out = write_store(tmp / "store", config=cfg, ops=ops, membership=membership, corpus=corpus,
                          model_path=model_dir, model_sha256="synthetic")
        files = {p.name: p.stat().st_size for p in out.iterdir() if p.name != "corpus.jsonl"}
        del corpus, membership
        t = time.perf_counter()
        att = Attributor(load_store(out), lm, SolverConfig())  # as the service loads it, sha256 checked
        setup_s = time.perf_counter() - t
        rows = []
        with one_thread():
            for i in range(warmup + reps):
                t, c = time.perf_counter(), time.process_time()
                ans = att.attribute(query.prompt, query.completion, top_k=10, include_text=True)
                if i >= warmup:
                    rows.append({"ms": (time.perf_counter() - t) * 1e3, "cpu_ms": (time.process_time() - c) * 1e3,
                                 **ans.timing_ms})
            sol = att._solve(att._measure([att.prepare(Query(query.prompt, query.completion))[0]])[1])  # passes
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    med = {key: float(np.median([row[key] for row in rows])) for key in rows[0]}
    parts = {key: med[key] for key in ("forward", "measure", "solve")}
    return {"n": n, "K": K, "rank": r, "memberships": d, "latency_ms": med["ms"], "parts_ms": parts,
            "cpu_ms": med["cpu_ms"], "latency_ms_min": min(row["ms"] for row in rows),
            # ranking the sparse answer and reading 2 x 10 records back, outside the three parts
            "other_ms": float(np.median([row["ms"] - sum(row[k] for k in parts) for row in rows])),
            "timed_repeats": reps, "warmup": warmup,
            "solver_iterations": int(ans.diagnostics["iterations"]), "converged": bool(ans.diagnostics["converged"]),
            "solver_gap": float(ans.diagnostics["gap"]), "solver_passes": int(sol.passes.max()),
            "nonzeros": int(ans.diagnostics["nonzeros"]),
            "design_setup_s": setup_s, "store_bytes": sum(files.values()), "store_files": files}


def projected_at(n: int, k: int, query_cost_ms: float, reps: int, warmup: int = 1, chunk: int = 100_000,
                 query_cost_cpu_ms: float | None = None) -> dict:
    rows = min(n, chunk)
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(rows, k, generator=gen)
    phi = torch.randn(k, generator=gen)
    times = math.ceil(n / rows)

    def dot():
        for _ in range(times):
            (X @ phi).sum()

    ms, cpu = _median_ms(dot, reps, warmup)
    out = {"n": n, "proj_dim": k, "latency_ms": query_cost_ms + ms, "parts_ms": {"query_gradient+projection":
           query_cost_ms, "dot": ms}, "store_bytes": n * k * 4, "timed_rows": rows, "chunks": times}
    if query_cost_cpu_ms is not None:
        out["cpu_ms"] = query_cost_cpu_ms + cpu
    return out


class one_thread:
    """One thread, restored after (the issue's figures are per query on one thread; the solver's
    thread pool follows torch's count)."""

    def __enter__(self):
        self.torch = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        torch.set_num_threads(self.torch)


def synthetic_queries(design: SparseDesign, planted: int = 4, noise_only: int = 4, nonzeros: int = 50,
                      seed: int = 1) -> torch.Tensor:
    """Y (K, planted + noise_only): ``nonzeros`` positive influences seen through M plus noise and an
    offset, then dense standard-normal y (no sparse structure: the solver's hardest case)."""
    gen = torch.Generator().manual_seed(seed)
    cols = []
    for _ in range(planted):
        w = torch.zeros(design.n, dtype=torch.float64)
        w[torch.randperm(design.n, generator=gen)[:nonzeros]] = torch.rand(nonzeros, generator=gen,
                                                                            dtype=torch.float64) + 0.5
        cols.append(design.matvec(w)[:, 0] + 0.5 * torch.randn(design.K, generator=gen, dtype=torch.float64) + 3.0)
    cols += [torch.randn(design.K, generator=gen, dtype=torch.float64) for _ in range(noise_only)]
    return torch.stack(cols, 1)


def solve_at(membership, reps: int = 3, tol: float = 1e-6, max_iter: int = 10_000) -> dict:
    """Per-query solve time (median over ``reps``, each query alone, 1 thread), the certified gap, and a
    batch of all queries solved together."""
    design = SparseDesign(membership)
    Y = synthetic_queries(design)
    kinds = ["planted"] * 4 + ["noise"] * 4
    with one_thread():
        solve(design, Y[:, :1], tol=tol, max_iter=max_iter)  # compiled kernels loaded
        rows = []
        for q in range(Y.shape[1]):
            times, cpu = [], []
            for _ in range(reps):
                t, c = time.perf_counter(), time.process_time()
                sol = solve(design, Y[:, q : q + 1], tol=tol, max_iter=max_iter)
                times.append((time.perf_counter() - t) * 1e3)
                cpu.append((time.process_time() - c) * 1e3)
            rows.append({"kind": kinds[q], "ms": float(np.median(times)), "ms_min": min(times),
                         "cpu_ms": float(np.median(cpu)),
                         "gap": float(sol.gap[0]), "converged": bool(sol.converged[0]),
                         "nonzeros": int(sol.nonzeros()[0]), "epochs": int(sol.epochs[0]),
                         "passes": int(sol.passes[0])})
        t = time.perf_counter()
        batch = solve(design, Y, tol=tol, max_iter=max_iter)
        batch_ms = (time.perf_counter() - t) * 1e3
    out = {"queries": rows, "batch_ms_per_query": batch_ms / Y.shape[1],
           "batch_converged": bool(batch.converged.all()), "tol": tol}
    for kind in ("planted", "noise"):
        sel = [r for r in rows if r["kind"] == kind]
        # ms_best: each query's fastest repeat, the median over queries (on a shared CPU the least disturbed)
        out[kind] = {"ms_median": float(np.median([r["ms"] for r in sel])), "ms_max": max(r["ms"] for r in sel),
                     "ms_best": float(np.median([r["ms_min"] for r in sel])),
                     # CPU time of the one solving thread: on a shared CPU, close to an idle machine's wall time
                     "cpu_ms_median": float(np.median([r["cpu_ms"] for r in sel])),
                     "cpu_ms_max": max(r["cpu_ms"] for r in sel),
                     "gap_max": max(r["gap"] for r in sel), "converged": all(r["converged"] for r in sel),
                     "passes_max": max(r["passes"] for r in sel), "nonzeros_median": float(np.median(
                         [r["nonzeros"] for r in sel]))}
    return out


_READY = r"""
import json, os, sys, time
t0, c0 = time.perf_counter(), time.process_time()
import torch
torch.set_num_threads(1)
from stride.recovery import SparseDesign, solve
from stride.store import load_store
t1, c1 = time.perf_counter(), time.process_time()
store = load_store(sys.argv[1], verify=True)
t2, c2 = time.perf_counter(), time.process_time()
design = SparseDesign(store.membership)
t3, c3 = time.perf_counter(), time.process_time()
sol = solve(design, torch.randn(design.K, 1, generator=torch.Generator().manual_seed(0)))
t4, c4 = time.perf_counter(), time.process_time()
status = dict(line.split(":", 1) for line in open("/proc/self/status") if ":" in line)
kb = lambda key: int(status[key].split()[0]) / 1024
print(json.dumps({"import_s": t1 - t0, "load_store_s": t2 - t1, "design_s": t3 - t2, "first_solve_s": t4 - t3,
                  "ready_s": t4 - t0, "rss_mb": kb("VmRSS"), "peak_rss_mb": kb("VmHWM"),
                  # CPU time of the process: on a shared machine, close to an idle machine's wall time
                  "import_cpu_s": c1 - c0, "load_store_cpu_s": c2 - c1, "design_cpu_s": c3 - c2, "ready_cpu_s": c4 - c0,
                  # anonymous memory is the process's own; file-backed pages (mapped store files) are
                  # shared with the page cache and dropped under memory pressure
                  "rss_anon_mb": kb("RssAnon"), "rss_file_mb": kb("RssFile"),
                  "format_version": store.manifest["format_version"], "converged": bool(sol.converged.all())}))
"""


def startup_at(membership, K: int, d: int, rank: int = 64, hidden: int = 64) -> dict:
    """Write a store for this design (tiny operators, stub corpus) and time its start-up in a fresh process."""
    n = membership.num_examples
    cfg = BuildConfig(num_subsets=K, memberships=d, rank=min(rank, hidden), layer=0, steps=1)
    ops = SteeringOperators(hidden, min(rank, hidden), K).requires_grad_(False)
    tmp = Path(tempfile.mkdtemp(prefix="stride-start-"))
    try:
        corpus = synthetic_corpus(tmp / "stub.jsonl", n, texts=False)
        t = time.perf_counter()
        out = write_store(tmp / "store", config=cfg, ops=ops, membership=membership, corpus=corpus,
                          model_path=tmp, model_sha256="synthetic")
        write_s = time.perf_counter() - t
        del corpus
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        t = time.perf_counter()
        res = subprocess.run([sys.executable, "-c", _READY, str(out)], capture_output=True, text=True, env=env,
                             check=True)
        wall = time.perf_counter() - t
        info = json.loads(res.stdout.strip().splitlines()[-1])
        info["process_wall_s"] = wall  # interpreter start included
        info["write_store_s"] = write_s
        info["store_bytes"] = sum(p.stat().st_size for p in out.iterdir() if p.name != "corpus.jsonl")
        info["membership_file_bytes"] = (out / "membership.safetensors").stat().st_size
        return info
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


_STARTUP = """
import json, sys
import bench.scaling
from stride.design import random_design
n, K, d = map(int, sys.argv[1:4])
bench.scaling._READY = sys.argv[4]  # every tree's store is timed by the same script
print(json.dumps(bench.scaling.startup_at(random_design(n, K, d, 0), K, d)))
"""


def startup_compare(ns: list[int], trees: dict[str, Path], K: int = 1000, d: int = 10, rounds: int = 1,
                    log=print) -> list[dict]:
    """Start-up of the same design written and loaded by each checkout in ``trees`` (name -> root), one
    after the other at each n, so a shared machine's load hits them alike; each tree's compiled kernels
    are cached first by a start-up at n = 10^3."""
    def one(tree: Path, n: int) -> dict:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(tree)}
        res = subprocess.run([sys.executable, "-c", _STARTUP, str(n), str(K), str(d), _READY], cwd=tree, env=env,
                             capture_output=True, text=True, check=True)
        return json.loads(res.stdout.strip().splitlines()[-1])

    for tree in trees.values():
        one(tree, 1000)
    rows = []
    for n in ns:
        for r in range(rounds):
            for name, tree in trees.items():
                info = {"tree": name, "n": n, "round": r, "loadavg": list(os.getloadavg()), **one(tree, n)}
                log(f"  start-up n={n:>9} {name:>8}: load_store {info['load_store_s']:.2f} s (cpu "
                    f"{info['load_store_cpu_s']:.2f}), design {info['design_s']:.2f} s "
                    f"(cpu {info['design_cpu_s']:.2f}), "
                    f"ready {info['ready_s']:.2f} s (cpu {info['ready_cpu_s']:.2f}), RSS {info['rss_mb']:.0f} MiB "
                    f"(anon {info['rss_anon_mb']:.0f}), load average {info['loadavg'][0]:.1f}")
                rows.append(info)
    return rows


def solver_scan(ns: list[int], K: int = 1000, d: int = 10, startup: bool = True, log=print) -> list[dict]:
    """Solve time, certified gap and start-up (load, ready, RSS) at each n, on the issue's problem shape."""
    rows = []
    for n in ns:
        t = time.perf_counter()
        membership = random_design(n, K, d, 0)
        draw_s = time.perf_counter() - t
        reps = 3 if n <= 10**6 else 2
        row = {"n": n, "K": K, "memberships": d, "design_draw_s": draw_s, **solve_at(membership, reps)}
        if startup and n >= 10**5:  # a fresh process costs ~10 s of imports: skipped where load is trivial
            row["startup"] = startup_at(membership, K, d)
        p, z = row["planted"], row["noise"]
        log(f"  solver n={n:>9}: planted {p['ms_median']:.1f} ms (cpu {p['cpu_ms_median']:.1f}, max {p['ms_max']:.1f}, "
            f"gap {p['gap_max']:.1e}), noise {z['ms_median']:.1f} ms (cpu {z['cpu_ms_median']:.1f}, max "
            f"{z['ms_max']:.1f}, gap {z['gap_max']:.1e}), batch "
            f"{row['batch_ms_per_query']:.1f} ms/query"
            + (f"; ready {row['startup']['ready_s']:.2f} s, RSS {row['startup']['rss_mb']:.0f} MiB"
               if "startup" in row else ""))
        rows.append(row)
        del membership
    return rows


def query_scan(ns: list[int], lm: LM, ref: SteeringOperators, rec: Record, model_dir: Path, proj_dim: int,
               grad_query_ms: float, log=print,
               grad_query_cpu_ms: float | None = None) -> tuple[list[dict], list[dict]]:
    """STRIDE's whole query and the projected-gradient query at each n, side by side."""
    stride, proj = [], []
    for n in ns:
        reps = 5 if n <= 1_000_000 else 3
        s = stride_at(n, lm, ref, rec, model_dir, reps, 1)
        with one_thread():
            p = projected_at(n, proj_dim, grad_query_ms, reps, 1, query_cost_cpu_ms=grad_query_cpu_ms)
        log(f"  n={n:>8}: STRIDE {s['latency_ms']:.1f} ms (cpu {s['cpu_ms']:.1f}; fwd/measure/solve/other "
            + "/".join(f"{s['parts_ms'][k]:.1f}" for k in ("forward", "measure", "solve")) + f"/{s['other_ms']:.1f}; "
            f"{s['nonzeros']} nonzeros), {s['store_bytes'] / 2**20:.1f} MiB | projected gradients "
            f"{p['latency_ms']:.1f} ms" + (f" (cpu {p['cpu_ms']:.1f})" if "cpu_ms" in p else "")
            + f", {p['store_bytes'] / 2**20:.1f} MiB | wall {p['latency_ms'] / s['latency_ms']:.2f}x"
            + (f", cpu {p['cpu_ms'] / s['cpu_ms']:.2f}x" if "cpu_ms" in p else "")
            + f" | load average {os.getloadavg()[0]:.1f}")
        stride.append(s)
        proj.append(p)
    return stride, proj


def run_scaling(ns: list[int], model_dir: Path, store_dir: Path, query: dict, proj_dim: int,
                grad_query_ms: float, log=print) -> dict:
    lm = LM.load(model_dir, "cpu")
    ref = load_store(store_dir, verify=False).operators
    rec = Record("q", query["prompt"], query["completion"])
    stride, proj = query_scan(ns, lm, ref, rec, model_dir, proj_dim, grad_query_ms, log)
    solver_ns = sorted(set(ns) | ({10**7} if max(ns) >= 10**6 else set()))
    return {"stride": stride, "projected_gradients": proj, "solver": solver_scan(solver_ns, log=log)}


def whole_query(ns: list[int], work: Path, store_dir: Path, proj_dim: int, log=print) -> dict:
    """``query_scan`` outside the benchmark run: the bench model and first query in ``work``, a built
    store's operators for scale, and the projected-gradient query's fixed part (backward over the
    nn.Linear weights, projection to ``proj_dim``) timed here, 1 thread."""
    from bench.methods import Grads

    lm = LM.load(work / "model", "cpu")
    ref = load_store(store_dir, verify=False).operators
    q = json.loads((work / "queries.jsonl").read_text().splitlines()[0])
    rec = Record("q", q["prompt"], q["completion"])
    grads = Grads(lm.model, lm.tokenizer)
    R = torch.randn(grads.dim, proj_dim, generator=torch.Generator().manual_seed(0)) / math.sqrt(proj_dim)
    with one_thread():
        grad_ms, grad_cpu = _median_ms(lambda: grads.one(rec) @ R, 7, 2)
    log(f"  projected-gradient query gradient + projection (k={proj_dim}): {grad_ms:.1f} ms (cpu {grad_cpu:.1f})")
    stride, proj = query_scan(ns, lm, ref, rec, work / "model", proj_dim, grad_ms, log, grad_cpu)
    return {"stride": stride, "projected_gradients": proj, "grad_query_ms": grad_ms, "grad_query_cpu_ms": grad_cpu}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="STRIDE solver and start-up scaling (issue 9 problem shape)")
    ap.add_argument("--ns", default="1e3,1e4,1e5,1e6,1e7", help="comma-separated n values")
    ap.add_argument("--no-startup", action="store_true", help="skip writing stores and timing their start-up")
    ap.add_argument("--startup-only", action="store_true", help="time start-up alone (no solves)")
    ap.add_argument("--against", type=Path, help="with --startup-only: another checkout's root, timed alongside")
    ap.add_argument("--rounds", type=int, default=1, help="with --startup-only: start-ups per tree and n")
    ap.add_argument("--whole-query", action="store_true",
                    help="STRIDE's whole query beside projected gradients (needs --work and --store)")
    ap.add_argument("--work", type=Path, help="with --whole-query: bench/work/<key> (model/, queries.jsonl)")
    ap.add_argument("--store", type=Path, help="with --whole-query: a built store (its operators' scale)")
    ap.add_argument("--proj-dim", type=int, default=512, help="with --whole-query: k (the benchmark's 512)")
    ap.add_argument("--out", type=Path, help="write the rows as JSON here")
    args = ap.parse_args(argv)
    ns = [int(float(x)) for x in args.ns.split(",")]
    if args.whole_query:
        if not (args.work and args.store):
            ap.error("--whole-query needs --work and --store")
        rows = whole_query(ns, args.work, args.store, args.proj_dim)
    elif args.startup_only:
        trees = {"this": Path(__file__).resolve().parents[1], **({"against": args.against.resolve()}
                                                                 if args.against else {})}
        rows = startup_compare(ns, trees, rounds=args.rounds)
    else:
        rows = solver_scan(ns, startup=not args.no_startup)
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
