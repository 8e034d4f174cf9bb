"""Load, Redis faults and a soak against a real ``stride serve`` (issue 14's campaign, kept).

The server runs as deployed (``stride serve``, default settings, a private ``redis-server`` as its
cache); the load comes from a separate process (an asyncio closed loop over raw keep-alive HTTP/1.1:
each client sends its next request when the last is answered) pinned to the last core with
``taskset`` and niced, so it cannot take the server's CPU unnoticed: its own CPU seconds are
recorded beside the server's. The server's own view of each request (its access log's
``duration_ms``, from the app's first byte to its response) is reported beside the client's.
Every request is a distinct demo query (a fact behind a one-word prefix, ``serve_latency``'s bodies
in a random order, then again with another ``top_k``: part of the cache key, not of the cost), and
each row starts where the last ended, so nothing is answered from the cache.

Rows: 1, 8, 32, 64, 128 clients, ``--requests`` each; then 32 clients with Redis killed (SIGKILL)
a third of the way through, and with Redis frozen (SIGSTOP, resumed at the end). Per row: p50, p95,
p99 of answered requests, req/s, failures by kind (503 shed, 504, 5xx, transport errors: a request
that got no response at all), the server's RSS before and after, the load average. ``--soak``: 32
clients for ``--soak-s`` seconds (600), RSS sampled every 10 s. ``--setting STRIDE_X=V`` runs the
client rows against a server with other settings (e.g. a lower ``STRIDE_MAX_INFLIGHT``) and keeps
them beside the default rows. A client told 503 waits its ``Retry-After`` times a random 1-1.5 before
the next request, as ``stride.client`` does.

    .venv/bin/python -m bench.load --store demo/store --queries demo/queries.jsonl
    .venv/bin/python -m bench.load --store demo/store --queries demo/queries.jsonl --soak

Results go to ``bench/results/load.json`` and ``load.md`` (the soak adds its section to both).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.serve_latency import free_port, load_bodies, loadavg, wait_ready
from stride.client import Client

RESULTS = Path(__file__).parent / "results"
LEVELS = (1, 8, 32, 64, 128, 256, 512)


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of the whole process, finished threads included."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Redis:
    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc = subprocess.Popen(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no"], stdout=subprocess.DEVNULL)
        time.sleep(0.5)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)
            self.proc.terminate()
            self.proc.wait(timeout=10)


class Server:
    """``stride serve`` with the default settings and a cache."""

    def __init__(self, store: Path, redis_url: str, log: Path, settings: dict[str, str]) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        env = {**{k: v for k, v in os.environ.items() if not k.startswith("STRIDE_")},
               "STRIDE_REDIS_URL": redis_url, "STRIDE_LOG_LEVEL": "WARNING", "STRIDE_DEVICE": "cpu", **settings}
        exe = shutil.which("stride", path=str(Path(sys.executable).parent)) or "stride"
        self.proc = subprocess.Popen([exe, "serve", "--store", str(store), "--port", str(self.port)], env=env,
                                     stdout=subprocess.DEVNULL, stderr=log.open("ab"))

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=120)


# --- the load generator (its own process) -----------------------------------------------------------


async def _drive(base: str, bodies: list[dict[str, Any]], clients: int, requests: int, duration: float,
                 fault: str | None, redis_pid: int | None, offset: int) -> dict[str, Any]:
    latencies: list[float] = []
    failures: dict[str, int] = {}
    sent = 0
    done = 0
    faulted = False
    stop_at = time.monotonic() + duration if duration else None

    def take() -> dict[str, Any] | None:
        nonlocal sent
        if (stop_at is None and sent >= requests) or (stop_at is not None and time.monotonic() >= stop_at):
            return None
        i = offset + sent
        sent += 1
        return {**bodies[i % len(bodies)], "top_k": 1 + (i // len(bodies)) % 100}

    host, port = base.removeprefix("http://").split(":")

    async def client() -> None:
        nonlocal done, faulted
        conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        while (body := take()) is not None:
            t0 = time.perf_counter()
            retry_after = 0.0
            try:
                if conn is None:
                    conn = await asyncio.open_connection(host, int(port))
                async with asyncio.timeout(120):
                    status, headers = await _post(*conn, f"{host}:{port}", json.dumps(body).encode())
                kind = "ok" if status == 200 else str(status)
                if status == 503:  # shed: a well-behaved client waits as told, jittered (stride.client's rule)
                    retry_after = float(headers.get("retry-after", 1)) * Client.jitter()
                if headers.get("connection") == "close":
                    conn[1].close()
                    conn = None
            except (OSError, asyncio.IncompleteReadError, TimeoutError, ValueError) as e:
                kind = f"transport:{type(e).__name__}"
                if conn is not None:
                    conn[1].close()
                conn = None
            if kind == "ok":
                latencies.append(time.perf_counter() - t0)
            else:
                failures[kind] = failures.get(kind, 0) + 1
            done += 1
            if fault and not faulted and redis_pid and done >= requests / 3:
                faulted = True
                os.kill(redis_pid, signal.SIGKILL if fault == "kill" else signal.SIGSTOP)
            if retry_after:
                await asyncio.sleep(retry_after)
        if conn is not None:
            conn[1].close()

    t0 = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    wall = time.perf_counter() - t0
    return {"latencies": latencies, "failures": failures, "wall_s": wall, "sent": sent}


async def _post(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str,
                body: bytes) -> tuple[int, dict[str, str]]:
    """One keep-alive HTTP/1.1 POST on an open connection; (status, lower-cased headers), body read and
    dropped. Raw asyncio streams, not httpx: httpx cost the generator 10-19 ms of CPU per request
    (measured at 32 and 128 clients), as much as the server's own work, so on 2 cores the
    generator's scheduling delays were being reported as the server's latency."""
    writer.write(b"POST /v1/attribute HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (host.encode(), len(body), body))
    await writer.drain()
    line = await reader.readline()
    if not line:
        raise ConnectionResetError("the server closed the connection")
    status = int(line.split()[1])
    headers = {}
    while (line := await reader.readline()) not in (b"\r\n", b""):
        k, _, v = line.decode("latin-1").partition(":")
        headers[k.strip().lower()] = v.strip()
    await reader.readexactly(int(headers.get("content-length", 0)))
    return status, headers


def generator_main(argv: list[str]) -> None:
    """``python -m bench.load --generator SPEC.json``: run one row, print its raw figures as JSON."""
    spec = json.loads(Path(argv[0]).read_text())
    out = asyncio.run(_drive(spec["base"], spec["bodies"], spec["clients"], spec["requests"], spec["duration"],
                             spec.get("fault"), spec.get("redis_pid"), spec["offset"]))
    out["cpu_s"] = time.process_time()
    print(json.dumps(out))


def run_row(server: Server, bodies: list[dict[str, Any]], clients: int, requests: int, work: Path, *,
            offset: int, duration: float = 0, fault: str | None = None, redis: Redis | None = None,
            sample: list[dict[str, float]] | None = None) -> dict[str, Any]:
    spec = work / f"row-{clients}-{fault}.json"
    spec.write_text(json.dumps({"base": server.base, "bodies": bodies, "clients": clients, "requests": requests,
                                "duration": duration, "fault": fault, "offset": offset,
                                "redis_pid": redis.proc.pid if redis else None}))
    last_core = str((os.cpu_count() or 1) - 1)
    argv = ["taskset", "-c", last_core, "nice", "-n", "5", sys.executable, "-m", "bench.load", "--generator",
            str(spec)]
    before = {"rss_mb": rss_mb(server.proc.pid), "load": loadavg(), "cpu": cpu_s(server.proc.pid)}
    out_file = spec.with_suffix(".out")  # a file, not a pipe: the raw latencies overflow a pipe's buffer
    with out_file.open("w") as out:
        proc = subprocess.Popen(argv, stdout=out, text=True, cwd=Path(__file__).parent.parent)
    t0 = time.monotonic()
    while proc.poll() is None:  # sample the server's memory while the row runs (the soak's flatness)
        time.sleep(1)
        if sample is not None and time.monotonic() - t0 >= 10 * (len(sample) + 1):
            sample.append({"t_s": round(time.monotonic() - t0), "rss_mb": round(rss_mb(server.proc.pid), 1),
                           "load": loadavg()})
    raw = json.loads(out_file.read_text())
    after = {"rss_mb": rss_mb(server.proc.pid), "load": loadavg(), "cpu": cpu_s(server.proc.pid)}
    lat = sorted(raw["latencies"])

    def pct(p: float) -> float:
        return round(1e3 * lat[min(len(lat) - 1, int(p * len(lat)))], 1) if lat else float("nan")

    row = {"clients": clients, "fault": fault, "requests": raw["sent"], "answered": len(lat),
           "failures": raw["failures"], "failed": sum(raw["failures"].values()),
           "no_response": sum(v for k, v in raw["failures"].items() if k.startswith("transport")),
           "req_s": round(len(lat) / raw["wall_s"], 1), "wall_s": round(raw["wall_s"], 1),
           "p50_ms": pct(0.50), "p95_ms": pct(0.95), "p99_ms": pct(0.99),
           "mean_ms": round(1e3 * statistics.fmean(lat), 1) if lat else float("nan"),
           "max_ms": round(1e3 * lat[-1], 1) if lat else float("nan"),
           "rss_mb_before": round(before["rss_mb"], 1), "rss_mb_after": round(after["rss_mb"], 1),
           "load_before": before["load"], "load_after": after["load"],
           "server_cpu_s": round(after["cpu"] - before["cpu"], 1),
           "generator_cpu_s": round(raw["cpu_s"], 1)}
    print(json.dumps({k: v for k, v in row.items() if k != "failures"} | {"failures": raw["failures"]}),
          flush=True)
    return row


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--generator":
        generator_main(sys.argv[2:])
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--store", type=Path, default=Path("demo/store"))
    ap.add_argument("--queries", type=Path, default=Path("demo/queries.jsonl"))
    ap.add_argument("--requests", type=int, default=2000, help="requests per row")
    ap.add_argument("--clients", default=",".join(map(str, LEVELS)))
    ap.add_argument("--soak", action="store_true", help="only the soak: 32 clients for --soak-s seconds")
    ap.add_argument("--soak-s", type=float, default=600)
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--setting", action="append", default=[], metavar="STRIDE_X=V",
                    help="a server setting for this run; the rows then go under 'variants' in load.json")
    args = ap.parse_args()
    settings = dict(kv.split("=", 1) for kv in args.setting)
    work = Path(tempfile.mkdtemp(prefix="stride-load-"))  # row specs, raw outputs, the server's log
    bodies = load_bodies(args.store, args.queries, top_k=10)
    random.Random(0).shuffle(bodies)
    redis = Redis()
    server = Server(args.store, redis.url, work / "server.log", settings)
    asyncio.run(wait_ready(server.base))
    result_path = args.out / "load.json"
    result: dict[str, Any] = json.loads(result_path.read_text()) if result_path.is_file() else {}
    result["machine"] = {"cpus": os.cpu_count(), "generator": f"taskset -c {(os.cpu_count() or 1) - 1}, nice 5",
                         "note": "shared 2-core machine: other jobs ran beside the benchmark (see the load columns)"}
    try:
        run_row(server, bodies, 8, 200, work, offset=0)  # warm the connection path; not reported
        if args.soak:
            samples: list[dict[str, float]] = []
            row = run_row(server, bodies, 32, 0, work, offset=10**6, duration=args.soak_s, sample=samples)
            result["soak"] = {**row, "duration_s": args.soak_s, "rss_samples": samples,
                              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
        elif settings:
            levels = list(map(int, args.clients.split(",")))
            rows = [run_row(server, bodies, c, args.requests, work, offset=(20 + i) * args.requests)
                    for i, c in enumerate(levels)]
            name = " ".join(args.setting)
            result.setdefault("variants", {})[name] = {
                "rows": rows, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
        else:
            levels = list(map(int, args.clients.split(",")))
            rows, offset = [], args.requests
            for c in levels:  # at least 8 requests a client, so a row is more than its first burst
                n = max(args.requests, 8 * c)
                rows.append(run_row(server, bodies, c, n, work, offset=offset))
                offset += n
            faults = []
            for i, fault in enumerate(("stop", "kill")):  # frozen first: a killed Redis does not come back
                faults.append(run_row(server, bodies, 32, args.requests, work, fault=fault, redis=redis,
                                      offset=offset + i * args.requests))
                if fault == "stop":
                    os.kill(redis.proc.pid, signal.SIGCONT)
            result.update(rows=rows, faults=faults, requests_per_row=args.requests,
                          date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    finally:
        result["server_exit"] = server.stop()
        redis.stop()
    result_path.write_text(json.dumps(result, indent=1) + "\n")
    (args.out / "load.md").write_text(report(result))


def report(r: dict[str, Any]) -> str:
    def table(rows: list[dict[str, Any]], first: str) -> list[str]:
        out = [f"| {first} | requests | answered | req/s | p50 ms | p95 ms | p99 ms | max ms | failed (kinds) "
               "| no response | RSS MB before -> after | load before -> after | server / generator CPU s |",
               "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for x in rows:
            kinds = ", ".join(f"{k}: {v}" for k, v in sorted(x["failures"].items())) or "-"
            label = x["clients"] if first == "clients" else f"32, Redis {x['fault'] or '-'}"
            out.append(f"| {label} | {x['requests']} | {x['answered']} | {x['req_s']} | {x['p50_ms']} | "
                       f"{x['p95_ms']} | {x['p99_ms']} | {x['max_ms']} | {x['failed']} ({kinds}) | "
                       f"{x['no_response']} | {x['rss_mb_before']} -> {x['rss_mb_after']} | "
                       f"{x['load_before']} -> {x['load_after']} | {x['server_cpu_s']} / {x['generator_cpu_s']} |")
        return out

    lines = ["# Load, Redis faults and soak: `stride serve` on the demo store", "",
             "`python -m bench.load` (and `--soak`): a real `stride serve` with default settings and a private "
             "Redis as its cache; the load from a separate asyncio process speaking raw keep-alive HTTP/1.1 "
             "(closed loop, one connection per client), pinned to the last core and niced. Every request is "
             "a distinct demo query (uncached). A client told 503 waits its Retry-After times a random 1-1.5 "
             "(stride.client's rule). " + r.get("machine", {}).get("note", ""), "",
             "How to read it: past the service's capacity, requests are refused at the door (503 + "
             "Retry-After, before their body is read: `app.middleware.Admission`) once the event loop's "
             "backlog plus the model work already admitted passes `STRIDE_MAX_QUEUE_WAIT_S` (1 s), so the "
             "answered requests' p99 stays near that plus one batch however many clients come, and the "
             "answered rate stays flat instead of falling. p50/p95/p99 are of answered requests, as the "
             "client saw them.", ""]
    if "rows" in r:
        lines += [f"## Clients ({r['requests_per_row']} requests per row, at least 8 per client; {r['date']})", "",
                  *table(r["rows"], "clients"), "",
                  "## Redis faults (32 clients; Redis frozen with SIGSTOP, or killed with SIGKILL, a third of "
                  "the way through)", "", *table(r["faults"], "row"), ""]
    for name, v in r.get("variants", {}).items():
        lines += [f"## With `{name}` ({v['date']})", "", *table(v["rows"], "clients"), ""]
    if "soak" in r:
        s = r["soak"]
        rss = [x["rss_mb"] for x in s["rss_samples"]]
        lines += [f"## Soak: 32 clients for {s['duration_s']:.0f} s ({s['date']})", "", *table([s], "clients"), "",
                  f"Server RSS sampled every 10 s: first {rss[0] if rss else 'n/a'} MB, last "
                  f"{rss[-1] if rss else 'n/a'} MB, min {min(rss, default=float('nan'))}, max "
                  f"{max(rss, default=float('nan'))} MB over {len(rss)} samples.", ""]
    lines += [f"The server exited with status {r.get('server_exit')} on SIGTERM (-15: uvicorn re-raises the "
              "signal once its graceful shutdown is done).", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
