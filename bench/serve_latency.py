"""Latency and throughput of the HTTP service: p50/p95 and requests/s at 1, 8, 32 concurrent clients.

Starts ``uvicorn app.main:app`` as a subprocess on the given store (default: the embedded default
from ``make demo-store``), then drives it with ``wrk`` (C, one thread: it takes almost no CPU from
the server on a 2-core machine) or, where ``wrk`` is missing, from this process with httpx. Every
request in every row is a demo query (one scored token) made distinct by a one-word prefix, so the
rows share one cost per query and the uncached rows never hit the cache. In the same run it times
``Attributor.attribute_batch`` in-process on the same queries (batches of 1 and 32, the server's
thread setting), before and after the HTTP rows, so the issue's targets can be judged side by side.

Besides wall-clock figures it records the server's CPU time per request, split between the event
loop (the main thread: HTTP, JSON, Redis) and the rest (model thread and its workers), and the load
average: on a shared CPU the wall clock measures the neighbours as much as the service.

``--baseline-app DIR`` serves a second copy of the app from DIR (a directory holding an ``app``
package, e.g. ``git archive HEAD~3 app | tar -x -C DIR``) beside the current one, alternating rows,
for a before/after table from one run. ``--synthetic N`` serves a store of N examples built from the
demo model with random operators and design instead (cost only: its answers mean nothing).

    .venv/bin/python bench/serve_latency.py --store demo/store --queries demo/queries.jsonl
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
WRK_LUA = r"""
local bodies, i = {}, 0
init = function(args)
  for line in io.lines(args[1]) do bodies[#bodies + 1] = line end
end
request = function()
  i = i + 1
  return wrk.format("POST", "/v1/attribute", {["Content-Type"] = "application/json"},
                    bodies[((i - 1) % #bodies) + 1])
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("RESULT %d %.6f %.3f %.3f %.3f %d %d\n", summary.requests, summary.duration / 1e6,
    latency:percentile(50) / 1e3, latency:percentile(95) / 1e3, latency.mean / 1e3, e.status,
    e.connect + e.read + e.write + e.timeout))
end
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def loadavg() -> float:
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except OSError:
        return float("nan")


def load_bodies(store: Path, queries: Path | None, top_k: int) -> list[dict[str, Any]]:
    """Distinct request bodies of one cost: each demo query, then each again behind a one-word prefix
    (words of the corpus, so they are in the vocabulary). Without queries: the corpus texts."""
    base: list[dict[str, Any]] = []
    if queries and queries.is_file():
        for line in queries.read_text().splitlines():
            if line.strip():
                q = json.loads(line)
                base.append({"prompt": q["prompt"], "completion": q.get("completion")})
    texts = []
    for line in (store / "corpus.jsonl").open():
        if line.strip():
            r = json.loads(line)
            texts.append(r.get("text") or f"{r.get('prompt', '')} {r.get('completion', '')}")
        if len(texts) >= 5000:
            break
    if not base:
        base = [{"prompt": t} for t in texts if len(t.split()) >= 3]
    words = sorted({w for t in texts for w in t.split() if w.isalpha() and w.islower()})
    return [{**b, "prompt": f"{w.capitalize()}. {b['prompt']}" if w else b["prompt"], "top_k": top_k}
            for w in ["", *words] for b in base]


def metric(text: str, name: str) -> float:
    return sum(float(m.group(1)) for m in re.finditer(rf"^{re.escape(name)}(?:\{{.*\}})? (\S+)$", text, re.M))


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds of the server's main thread (the event loop) and of all its other threads."""
    out = {"loop": 0.0, "other": 0.0}
    tick = os.sysconf("SC_CLK_TCK")
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out["loop" if int(task.name) == pid else "other"] += (int(fields[11]) + int(fields[12])) / tick
    return out


class Server:
    def __init__(self, name: str, app_dir: Path, store: Path, args: argparse.Namespace):
        self.name, self.port = name, free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "STRIDE_STORE": str(store.resolve()), "STRIDE_REDIS_URL": args.redis_url,
               "STRIDE_CACHE_NAMESPACE": f"bench-{uuid.uuid4().hex[:8]}", "STRIDE_CACHE_TTL_S": "900",
               "STRIDE_LOG_LEVEL": "WARNING", "STRIDE_API_KEYS": "", "PYTHONPATH": str(app_dir)}
        if args.synthetic:
            env["STRIDE_VERIFY_STORE"] = "false"
        if args.device:
            env["STRIDE_DEVICE"] = args.device
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "app.main:app", "--host", "127.0.0.1", "--port", str(self.port),
             "--no-access-log", "--log-level", "warning"], cwd=app_dir, env=env,
        )

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


async def wait_ready(base: str, timeout_s: float = 600) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=base, timeout=30) as client:
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            try:
                if (await client.get("/readyz")).status_code == 200:
                    return (await client.get("/v1/info")).json()
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.2)
    raise SystemExit(f"{base}: the service never became ready")


def run_wrk(base: str, bodies: list[dict[str, Any]], clients: int, duration: float, tmp: Path) -> dict[str, Any]:
    (tmp / "bodies.jsonl").write_text("".join(json.dumps(b) + "\n" for b in bodies))
    (tmp / "post.lua").write_text(WRK_LUA)
    cmd = ["wrk", "-t1", f"-c{clients}", f"-d{duration:g}s", "--timeout", "60s", "-s", str(tmp / "post.lua"), base,
           "--", str(tmp / "bodies.jsonl")]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    m = re.search(r"^RESULT (\S+) (\S+) (\S+) (\S+) (\S+) (\S+) (\S+)$", out, re.M)
    if not m:
        raise RuntimeError(f"wrk printed no result:\n{out}")
    n, wall, p50, p95, mean, bad_status, sock = m.groups()
    errors = {k: int(v) for k, v in (("status", bad_status), ("socket", sock)) if int(v)}
    return {"requests": int(n), "wall_s": float(wall), "p50_ms": float(p50), "p95_ms": float(p95),
            "mean_ms": float(mean), "errors": errors}


async def run_httpx(base: str, bodies: list[dict[str, Any]], clients: int, duration: float) -> dict[str, Any]:
    """``clients`` loops, each sending its next request when the last one is answered, for ``duration``."""
    it = iter(bodies)
    lat: list[float] = []
    errors: dict[str, int] = {}
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=base, timeout=120, limits=limits) as client:
        end = time.perf_counter() + duration

        async def worker() -> None:
            for body in it:
                if time.perf_counter() >= end:
                    return
                t0 = time.perf_counter()
                r = await client.post("/v1/attribute", json=body)
                lat.append(time.perf_counter() - t0)
                if r.status_code != 200:
                    errors[str(r.status_code)] = errors.get(str(r.status_code), 0) + 1

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        wall = time.perf_counter() - t0
    ms = sorted(x * 1e3 for x in lat) or [float("nan")]
    return {"requests": len(lat), "wall_s": wall, "p50_ms": statistics.median(ms),
            "p95_ms": ms[max(0, int(0.95 * len(ms)) - 1)], "mean_ms": statistics.fmean(ms), "errors": errors}


def drive(server: Server, bodies: list[dict[str, Any]], clients: int, args: argparse.Namespace,
          tmp: Path) -> dict[str, Any]:
    with httpx.Client(base_url=server.base, timeout=30) as c:
        before = c.get("/metrics").text
        cpu0, load0 = thread_cpu(server.proc.pid), loadavg()
        if args.client == "wrk":
            r = run_wrk(server.base, bodies, clients, args.duration, tmp)
        else:
            r = asyncio.run(run_httpx(server.base, bodies, clients, args.duration))
        cpu1, load1 = thread_cpu(server.proc.pid), loadavg()
        after = c.get("/metrics").text
    n = max(r["requests"], 1)
    batches = metric(after, "stride_batch_size_count") - metric(before, "stride_batch_size_count")
    computed = metric(after, "stride_batch_size_sum") - metric(before, "stride_batch_size_sum")
    return {
        "server": server.name, "concurrency": clients, **{k: r[k] for k in ("requests", "errors")},
        "p50_ms": round(r["p50_ms"], 2), "p95_ms": round(r["p95_ms"], 2), "mean_ms": round(r["mean_ms"], 2),
        "requests_per_s": round(r["requests"] / r["wall_s"], 2), "wall_s": round(r["wall_s"], 2),
        "model_batches": int(batches), "computed": int(computed),
        "mean_batch_size": round(computed / batches, 2) if batches else None,
        "server_cpu_ms_per_request": {k: round((cpu1[k] - cpu0[k]) * 1e3 / n, 2) for k in cpu0},
        "loadavg": [load0, load1],
    }


def warm(server: Server, bodies: list[dict[str, Any]]) -> None:
    with httpx.Client(base_url=server.base, timeout=120) as c:
        for b in bodies:
            c.post("/v1/attribute", json=b).raise_for_status()


def in_process(store: Path, bodies: list[dict[str, Any]], batch: int, reps: int, device: str | None,
               threads: int | None) -> dict[str, Any]:
    """``Attributor.attribute_batch`` on these bodies, batches of 1 and ``batch``, as the server runs it:
    in a fresh process, on a worker thread (the model thread), with its window clamp and torch threads.
    Not in this process: here (httpx, asyncio and the servers' clients loaded), under a load average
    of 5-10, the same calls cost 3-10x the CPU per query that they cost in a fresh one (measured)."""
    spec = json.dumps({"store": str(store), "bodies": bodies, "batch": batch, "reps": reps, "device": device,
                       "threads": threads})
    out = subprocess.run([sys.executable, __file__, "--in-process-worker"], input=spec, capture_output=True,
                         text=True, check=True, cwd=ROOT).stdout
    return json.loads(out.strip().splitlines()[-1])


def in_process_worker() -> None:
    from concurrent.futures import ThreadPoolExecutor

    a = json.loads(sys.stdin.read())
    import torch

    torch.ones(64, 64) @ torch.ones(64, 64)  # torch's thread pool started from the main thread, as in uvicorn
    with ThreadPoolExecutor(1) as pool:
        r = pool.submit(_in_process, Path(a["store"]), a["bodies"], a["batch"], a["reps"], a["device"],
                        a["threads"]).result()
    print(json.dumps(r))


def _in_process(store: Path, bodies: list[dict[str, Any]], batch: int, reps: int, device: str | None,
                threads: int | None) -> dict[str, Any]:
    import torch

    from app.engine import Engine, model_threads
    from stride.config import Query
    from stride.query import Attributor

    attr = Attributor.from_store(store, device=device, verify=False)
    Engine._clamp_context(attr)
    n_threads = model_threads(threads or 0, attr.lm.device)
    if n_threads is not None:
        torch.set_num_threads(n_threads)
    qs = [Query(b["prompt"], b.get("completion")) for b in bodies]
    top_k = int(bodies[0].get("top_k", 10))
    # warm-up at both sizes: the first calls after loading cost up to 10x the CPU of later ones (measured:
    # 147 against 17 ms per lone query, torch's 2 threads; the server pays it in its own warm-up and rows)
    pos = 0
    for size in (1, 1, 1, 1, batch, batch):
        attr.attribute_batch(qs[pos : pos + size], top_k, True)
        pos += size
    out: dict[str, Any] = {"torch_threads": torch.get_num_threads(), "loadavg": [loadavg()]}
    for size in (1, batch):
        walls, cpus = [], []
        for _ in range(reps if size > 1 else 4 * reps):
            chunk, pos = qs[pos : pos + size], pos + size
            c0, t0 = time.process_time(), time.perf_counter()
            attr.attribute_batch(chunk, top_k, True)
            walls.append(time.perf_counter() - t0)
            cpus.append(time.process_time() - c0)
        wall = statistics.median(walls)
        out[f"batch_{size}"] = {"batch": size, "repeats": len(walls), "median_ms": round(wall * 1e3, 2),
                                "queries_per_s": round(size / wall, 2),
                                "cpu_ms_per_query": round(statistics.median(cpus) * 1e3 / size, 2)}
    out["loadavg"].append(loadavg())
    del attr
    return out


def build_synthetic(n: int, model: Path, work: Path) -> Path:
    """A store of ``n`` examples over the demo model: random operators and design, corpus lines
    cycled from the demo corpus. Costs are real; answers mean nothing. Reused when present."""
    import torch

    from stride.config import BuildConfig
    from stride.corpus import Corpus
    from stride.design import random_design
    from stride.model import LM, weights_sha256
    from stride.operators import SteeringOperators
    from stride.store import write_store

    out = work / f"synthetic-{n}"
    if (out / "manifest.json").is_file():
        return out
    work.mkdir(parents=True, exist_ok=True)
    src = [json.loads(line) for line in (model.parent / "corpus.jsonl").read_text().splitlines() if line.strip()]
    texts = [r.get("text") or r["prompt"] + r["completion"] for r in src]
    corpus_path = work / f"synthetic-{n}-corpus.jsonl"
    with open(corpus_path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"id": f"s{i}", "text": texts[i % len(texts)]}) + "\n")
    lm = LM.load(model, "cpu")
    cfg = BuildConfig().resolve(n, lm.num_layers)
    ops = SteeringOperators(lm.hidden_size, cfg.rank, int(cfg.num_subsets))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        ops.w_psi.copy_(torch.randn(lm.hidden_size, cfg.rank, generator=gen) / lm.hidden_size**0.5)
        ops.A.copy_(0.05 * torch.randn(ops.A.shape, generator=gen))
        ops.h_scale.fill_(1.0)
    membership = random_design(n, int(cfg.num_subsets), cfg.memberships, cfg.seed)
    write_store(out, config=cfg, ops=ops, membership=membership, corpus=Corpus.scan(corpus_path),
                model_path=model, model_sha256=weights_sha256(model), extra={"synthetic": True})
    corpus_path.unlink()
    return out


def bench(args: argparse.Namespace, store: Path, bodies: list[dict[str, Any]], tmp: Path) -> dict[str, Any]:
    need = 4 + 2 * args.batch + 4 * args.reps + args.reps * args.batch  # in-process bodies: the last ones
    runs: dict[str, Any] = {"in_process": [in_process(store, bodies[-2 * need : -need], args.batch, args.reps,
                                                       args.device, args.torch_threads)]}
    servers = [Server("current", ROOT, store, args)]
    if args.baseline_app:
        servers.append(Server("baseline", args.baseline_app.resolve(), store, args))
    try:
        infos = {s.name: asyncio.run(wait_ready(s.base)) for s in servers}
        pos = 0

        def take(k: int) -> list[dict[str, Any]]:  # a fresh slice: uncached rows never repeat a key
            nonlocal pos
            if pos + k > len(bodies) - 2 * need - args.hot_set:
                pos = 0  # ran out: later rows may hit keys computed before (reported as such below)
            chunk, pos = bodies[pos : pos + k], pos + k
            return chunk

        rows = []
        for s in servers:
            warm(s, take(8))  # first-request effects out of the way
        for i, c in enumerate(args.concurrency):
            for s in servers if i % 2 == 0 else servers[::-1]:
                rows.append({"mode": "uncached", **drive(s, take(args.max_requests), c, args, tmp)})
        hot = bodies[-2 * need - args.hot_set : -2 * need]
        for s in servers:
            warm(s, hot)  # fill the cache
        for i, c in enumerate(args.concurrency):
            for s in servers if i % 2 == 0 else servers[::-1]:
                rows.append({"mode": "cached", **drive(s, hot, c, args, tmp)})
    finally:
        for s in servers:
            s.stop()
    runs["in_process"].append(in_process(store, bodies[-need:], args.batch, args.reps, args.device,
                                         args.torch_threads))
    return {"info": infos["current"], "rows": rows, **runs}


def targets(result: dict[str, Any], batch: int) -> list[str]:
    """The issue's service targets, judged on this run's own figures (current server)."""
    up = {r["concurrency"]: r for r in result["rows"] if r["mode"] == "uncached" and r["server"] == "current"}
    inproc = statistics.fmean(x[f"batch_{batch}"]["queries_per_s"] for x in result["in_process"])
    lines = []
    if 32 in up and 1 in up:
        share = up[32]["requests_per_s"] / inproc
        gain = up[32]["requests_per_s"] / up[1]["requests_per_s"]
        lines.append(f"- served uncached at 32 clients / in-process batch-{batch}: {up[32]['requests_per_s']:.1f} / "
                     f"{inproc:.1f} = {share:.0%} (target >= 50%: {'met' if share >= 0.5 else 'missed'})")
        lines.append(f"- served uncached at 32 clients / 1 client: {up[32]['requests_per_s']:.1f} / "
                     f"{up[1]['requests_per_s']:.1f} = {gain:.1f}x (target >= 5x: {'met' if gain >= 5 else 'missed'})")
        one = statistics.fmean(x["batch_1"]["queries_per_s"] for x in result["in_process"])
        lines.append(f"- in-process, the same queries: batch of {batch} {inproc:.1f} q/s, batch of 1 {one:.1f} q/s "
                     f"({inproc / one:.1f}x): the most batching can give the service")
    return lines


def write(result: dict[str, Any], args: argparse.Namespace, out: Path, name: str) -> None:
    import torch

    info = result["info"]
    env = {
        "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
        "python": platform.python_version(), "torch": torch.__version__, "device": info["device"],
        "store": {k: info["store"][k] for k in ("version", "num_examples", "num_subsets")},
        "synthetic": bool(args.synthetic), "limits": info["limits"], "solver": info["solver"], "top_k": args.top_k,
        "client": "wrk, 1 thread" if args.client == "wrk" else "httpx.AsyncClient in this process",
        "duration_s": args.duration, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps({"environment": env, **result}, indent=2) + "\n")

    def row(r: dict[str, Any]) -> str:
        cpu = r["server_cpu_ms_per_request"]
        return (f"| {r['server']} | {r['mode']} | {r['concurrency']} | {r['requests']} | {r['p50_ms']:.1f} | "
                f"{r['p95_ms']:.1f} | {r['requests_per_s']:.1f} | "
                f"{r['mean_batch_size'] if r['mean_batch_size'] is not None else '-'} | {cpu['loop']:.2f} | "
                f"{cpu['other']:.2f} | {r['loadavg'][0]:.1f}-{r['loadavg'][1]:.1f} | {sum(r['errors'].values())} |")

    ip = [f"| {when} | {x['torch_threads']} | {x[f'batch_{s}']['batch']} | {x[f'batch_{s}']['median_ms']:.1f} | "
          f"{x[f'batch_{s}']['queries_per_s']:.1f} | {x[f'batch_{s}']['cpu_ms_per_query']:.2f} | "
          f"{x['loadavg'][0]:.1f}-{x['loadavg'][1]:.1f} |"
          for when, x in zip(("before", "after"), result["in_process"], strict=True) for s in (1, args.batch)]
    store_kind = "synthetic store (demo model, random operators and design)" if args.synthetic else "store"
    md = [
        "# Service latency and throughput",
        "",
        f"`bench/serve_latency.py` against `uvicorn app.main:app` on a {store_kind} of "
        f"{env['store']['num_examples']:,} examples (K={env['store']['num_subsets']}), device `{env['device']}`, "
        f"{env['cpu_count']} CPU cores shared with other work (load average in each row), top_k={args.top_k}, "
        f"micro-batches of up to {info['limits']['batch_max_size']} queries waiting up to "
        f"{info['limits']['batch_max_wait_ms']} ms. Load from {env['client']}, {args.duration:g} s per row, closed "
        "loop (each client sends its next request when answered). Every request is a demo query (one scored "
        "token) behind a distinct one-word prefix: uncached rows compute every request; cached rows cycle a "
        f"warmed set of {args.hot_set} keys answered from Redis. Server CPU is per request: `loop` is the event loop "
        "(HTTP, JSON, Redis), `model` every other thread (forward, measurement, solve, ranking).",
        "",
        "| server | mode | clients | requests | p50 ms | p95 ms | req/s | mean batch | loop CPU ms | model CPU ms "
        "| load avg | errors |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|",
        *(row(r) for r in result["rows"]),
        "",
        "In-process `Attributor.attribute_batch`, same queries and thread setting as the server, timed before "
        "and after the HTTP rows:",
        "",
        "| when | torch threads | batch | median ms | queries/s | CPU ms/query | load avg |",
        "|---|---:|---:|---:|---:|---:|---|",
        *ip,
        "",
        "Targets (issue 9), from this run's own figures:",
        "",
        *targets(result, args.batch),
        "",
        f"Measured {env['date']}; python {env['python']}, torch {env['torch']}.",
        "",
    ]
    (out / f"{name}.md").write_text("\n".join(md))


def main() -> None:
    if sys.argv[1:] == ["--in-process-worker"]:
        sys.path.insert(0, str(ROOT))
        in_process_worker()
        return
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--store", type=Path, default=ROOT / "demo" / "store")
    p.add_argument("--queries", type=Path, default=ROOT / "demo" / "queries.jsonl")
    p.add_argument("--redis-url", default=os.environ.get("STRIDE_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0"))
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--duration", type=float, default=6.0, help="Seconds of load per row.")
    p.add_argument("--max-requests", type=int, default=1200, help="Distinct bodies set aside per uncached row.")
    p.add_argument("--hot-set", type=int, default=64, help="Distinct keys in the cached runs.")
    p.add_argument("--top-k", type=int, default=10)
    p.add_argument("--batch", type=int, default=32, help="In-process batch size to compare with.")
    p.add_argument("--reps", type=int, default=3, help="In-process batches timed per size (4x for batch 1).")
    p.add_argument("--client", choices=["auto", "wrk", "httpx"], default="auto")
    p.add_argument("--baseline-app", type=Path, help="Also serve the app package found in this directory.")
    p.add_argument("--synthetic", type=int, default=0, help="Serve a synthetic store of this many examples.")
    p.add_argument("--work", type=Path, default=ROOT / "bench" / "work" / "service")
    p.add_argument("--device", default=None)
    p.add_argument("--torch-threads", type=int, default=0, help="As STRIDE_TORCH_THREADS (0: the server's default).")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    p.add_argument("--name", default=None, help="Output file stem (default service, or service-synthetic-N).")
    args = p.parse_args()
    if args.client == "auto":
        args.client = "wrk" if shutil.which("wrk") else "httpx"
    if args.torch_threads:
        os.environ["STRIDE_TORCH_THREADS"] = str(args.torch_threads)
    store = args.store
    if args.synthetic:
        store = build_synthetic(args.synthetic, args.store.parent / "model" if (args.store.parent / "model").is_dir()
                                else ROOT / "demo" / "model", args.work)
    sys.path.insert(0, str(ROOT))
    bodies = load_bodies(store, args.queries, args.top_k)
    with tempfile.TemporaryDirectory() as tmp:
        result = bench(args, store, bodies, Path(tmp))
    name = args.name or ("service" if not args.synthetic else f"service-synthetic-{args.synthetic}")
    write(result, args, args.out, name)
    print((args.out / f"{name}.md").read_text())


if __name__ == "__main__":
    main()
