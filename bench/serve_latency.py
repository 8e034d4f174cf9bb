"""Latency and throughput of the HTTP service: p50/p95 and requests/s at 1, 8, 32 concurrent clients.

Starts ``uvicorn app.main:app`` as a subprocess on the given store (default: the embedded default
from ``make demo-store``), then drives it from this process with httpx, uncached (every request a
distinct cache key, so each one is computed) and cached (a warmed set of keys, so each one is a Redis
hit). Writes ``bench/results/service.{json,md}``.

    .venv/bin/python bench/serve_latency.py --store demo/store --queries demo/queries.jsonl
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import platform
import re
import socket
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def load_texts(store: Path, queries: Path | None) -> list[dict[str, Any]]:
    """Distinct request bodies: the demo queries, then every corpus text as a prompt-only query."""
    bodies: list[dict[str, Any]] = []
    if queries and queries.is_file():
        for line in queries.read_text().splitlines():
            if line.strip():
                q = json.loads(line)
                bodies.append({"prompt": q["prompt"], "completion": q.get("completion")})
    for line in (store / "corpus.jsonl").read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            text = r.get("text") or f"{r.get('prompt', '')} {r.get('completion', '')}"
            if len(text.split()) >= 3:
                bodies.append({"prompt": text})
    return bodies


def metric(text: str, name: str) -> float:
    return sum(float(m.group(1)) for m in re.finditer(rf"^{re.escape(name)}(?:\{{.*\}})? (\S+)$", text, re.M))


async def drive(client: httpx.AsyncClient, bodies: list[dict[str, Any]], concurrency: int) -> dict[str, Any]:
    """``concurrency`` clients, each sending its next request as soon as the last one is answered."""
    it = iter(bodies)
    lat: list[float] = []
    errors: dict[str, int] = {}
    cached = 0

    async def worker() -> None:
        nonlocal cached
        for body in it:
            t0 = time.perf_counter()
            r = await client.post("/v1/attribute", json=body)
            lat.append(time.perf_counter() - t0)
            if r.status_code != 200:
                errors[str(r.status_code)] = errors.get(str(r.status_code), 0) + 1
            elif r.json()["cached"]:
                cached += 1

    before = (await client.get("/metrics")).text
    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    after = (await client.get("/metrics")).text
    batches = metric(after, "stride_batch_size_count") - metric(before, "stride_batch_size_count")
    computed = metric(after, "stride_batch_size_sum") - metric(before, "stride_batch_size_sum")
    ms = sorted(x * 1e3 for x in lat)
    return {
        "concurrency": concurrency, "requests": len(ms), "errors": errors, "cached_answers": cached,
        "p50_ms": round(statistics.median(ms), 2), "p95_ms": round(ms[max(0, int(0.95 * len(ms)) - 1)], 2),
        "mean_ms": round(statistics.fmean(ms), 2), "requests_per_s": round(len(ms) / wall, 2),
        "wall_s": round(wall, 2), "model_batches": int(batches),
        "mean_batch_size": round(computed / batches, 2) if batches else None,
    }


async def bench(base: str, bodies: list[dict[str, Any]], args: argparse.Namespace) -> list[dict[str, Any]]:
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    async with httpx.AsyncClient(base_url=base, timeout=120, limits=limits) as client:
        for _ in range(600):
            try:
                if (await client.get("/readyz")).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.1)
        else:
            raise SystemExit("the service never became ready")
        info = (await client.get("/v1/info")).json()
        # distinct keys: each (text, top_k) pair is computed once, in the uncached runs
        keys = ({**b, "top_k": k} for k in range(args.top_k, args.top_k + 50) for b in bodies)
        warm = [{**b, "top_k": args.top_k - 1} for b in bodies[:8]]
        await drive(client, warm, 1)  # first-request effects out of the way
        results = []
        for c in args.concurrency:
            n = max(args.requests, 4 * c)
            r = await drive(client, list(itertools.islice(keys, n)), c)
            results.append({"mode": "uncached", **r})
        hot = [{**b, "top_k": args.top_k - 2} for b in bodies[: args.hot_set]]
        await drive(client, hot, 8)  # fill the cache
        for c in args.concurrency:
            n = max(args.requests, 4 * c)
            r = await drive(client, list(itertools.islice(itertools.cycle(hot), n)), c)
            results.append({"mode": "cached", **r})
        return [info, *results]


def write(results: list[dict[str, Any]], info: dict[str, Any], args: argparse.Namespace, out: Path) -> None:
    import torch

    env = {
        "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
        "python": platform.python_version(), "torch": torch.__version__, "device": info["device"],
        "store": {k: info["store"][k] for k in ("version", "num_examples", "num_subsets")},
        "limits": info["limits"], "solver": info["solver"], "top_k": args.top_k,
        "client": "httpx.AsyncClient in a separate process on the same machine",
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "service.json").write_text(json.dumps({"environment": env, "results": results}, indent=2) + "\n")
    rows = [
        f"| {r['mode']} | {r['concurrency']} | {r['requests']} | {r['p50_ms']:.1f} | {r['p95_ms']:.1f} | "
        f"{r['requests_per_s']:.1f} | {r['mean_batch_size'] if r['mean_batch_size'] is not None else '-'} | "
        f"{sum(r['errors'].values())} |"
        for r in results
    ]
    md = [
        "# Service latency and throughput",
        "",
        f"`bench/serve_latency.py` against `uvicorn app.main:app` on the embedded default store "
        f"({env['store']['num_examples']} examples, K={env['store']['num_subsets']}), device `{env['device']}`, "
        f"{env['cpu_count']} CPU cores shared by the server and the load generator, top_k={args.top_k}, "
        f"micro-batches of up to {info['limits']['batch_max_size']} queries waiting up to "
        f"{info['limits']['batch_max_wait_ms']} ms. Uncached: every request a distinct cache key (computed); "
        "cached: a warmed set of keys answered from Redis. Latency is client-side, per request.",
        "",
        "| mode | clients | requests | p50 ms | p95 ms | req/s | mean batch | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
        *rows,
        "",
        f"Measured {env['date']}; python {env['python']}, torch {env['torch']}.",
        "",
    ]
    (out / "service.md").write_text("\n".join(md))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--store", type=Path, default=ROOT / "demo" / "store")
    p.add_argument("--queries", type=Path, default=ROOT / "demo" / "queries.jsonl")
    p.add_argument("--redis-url", default=os.environ.get("STRIDE_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0"))
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--requests", type=int, default=96, help="Requests per run (at least 4 per client).")
    p.add_argument("--hot-set", type=int, default=64, help="Distinct keys in the cached runs.")
    p.add_argument("--top-k", type=int, default=10)
    p.add_argument("--device", default=None)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = p.parse_args()

    port = free_port()
    env = {**os.environ, "STRIDE_STORE": str(args.store), "STRIDE_REDIS_URL": args.redis_url,
           "STRIDE_CACHE_NAMESPACE": f"bench-{uuid.uuid4().hex[:8]}", "STRIDE_CACHE_TTL_S": "900",
           "STRIDE_LOG_LEVEL": "WARNING", "STRIDE_API_KEYS": ""}
    if args.device:
        env["STRIDE_DEVICE"] = args.device
    server = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "app.main:app", "--host", "127.0.0.1", "--port", str(port),
         "--no-access-log", "--log-level", "warning"], cwd=ROOT, env=env,
    )
    try:
        info, *results = asyncio.run(bench(f"http://127.0.0.1:{port}", load_texts(args.store, args.queries), args))
    finally:
        server.terminate()
        server.wait(timeout=30)
    write(results, info, args, args.out)
    print((args.out / "service.md").read_text())


if __name__ == "__main__":
    main()
