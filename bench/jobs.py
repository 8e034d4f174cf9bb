"""Interactive latency while a background scan job runs (issue 12: p95 within 2x of idle).

A real ``stride serve`` (default settings, a private ``redis-server``), a real ``stride worker-jobs``
process on the same machine, and ``bench.load``'s load generator (its own process, pinned and niced,
every request a distinct uncached query). Rows of ``--seconds`` each: idle; a scan job running in a
worker at nice 0; the same job with the worker's threads reniced to 10 (``stride worker-jobs``'s default);
idle again (the machine is shared: the two idle rows bracket the background load). The job's progress
is read at the start and end of each busy row (queries per second scanned), so a busy row is only
counted while the scan really ran.

    .venv/bin/python -m bench.jobs --store demo/store --queries demo/queries.jsonl

Results: ``bench/results/jobs.json`` and ``jobs.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from bench.load import Redis, Server, run_row
from bench.serve_latency import load_bodies, loadavg, wait_ready

RESULTS = Path(__file__).parent / "results"


def renice_all(pid: int, nice: int) -> None:
    """Niceness is per thread on Linux: renice every thread of the worker (the scan runs in one)."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        os.setpriority(os.PRIO_PROCESS, int(tid), nice)


def progress(http: httpx.Client, job: str) -> dict[str, Any]:
    return http.get(f"/v1/jobs/{job}").json()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--store", type=Path, default=Path("demo/store"))
    ap.add_argument("--queries", type=Path, default=Path("demo/queries.jsonl"))
    ap.add_argument("--seconds", type=float, default=30, help="length of each row")
    ap.add_argument("--clients", type=int, default=2)
    ap.add_argument("--scan-queries", type=int, default=24000, help="queries in the scan job (the demo's, repeated)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    work = args.out / ".jobs-work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    bodies = load_bodies(args.store, args.queries, top_k=10)
    random.Random(0).shuffle(bodies)
    scan_queries = [json.loads(line) for line in args.queries.read_text().splitlines() if line.strip()]
    scan_queries = scan_queries * (args.scan_queries // len(scan_queries))
    redis = Redis()
    # a job long enough to outlast both busy rows (~150 queries/s scanned at nice 0 on the demo)
    server = Server(args.store, redis.url, work / "server.log", {"STRIDE_JOBS_MAX_QUERIES": str(len(scan_queries)),
                                                                  "STRIDE_MAX_BODY_BYTES": str(50 * 2**20)})
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("STRIDE_")}, "STRIDE_DEVICE": "cpu"}
    exe = shutil.which("stride", path=str(Path(sys.executable).parent)) or "stride"
    worker = subprocess.Popen([exe, "worker-jobs", "--store", str(args.store), "--redis-url", redis.url,
                               "--jobs-dir", str(work / "jobs"), "--nice", "0"], env=env,
                              stdout=subprocess.DEVNULL, stderr=(work / "worker.log").open("wb"))
    rows: list[dict[str, Any]] = []
    http = httpx.Client(base_url=server.base, timeout=60)
    try:
        asyncio.run(wait_ready(server.base))
        while "job worker ready" not in (work / "worker.log").read_text():
            if worker.poll() is not None:
                raise SystemExit((work / "worker.log").read_text()[-3000:])
            time.sleep(0.5)
        run_row(server, bodies, args.clients, 100, work, offset=0)  # warm the connection path; not reported
        rows.append({"phase": "idle", **run_row(server, bodies, args.clients, 0, work, offset=10**5,
                                                 duration=args.seconds)})
        job = http.post("/v1/jobs/scan", json={"queries": scan_queries}, timeout=600).json()["job_id"]
        while progress(http, job)["progress"]["done"] == 0:
            time.sleep(0.2)
        for i, nice in enumerate((0, 10)):
            renice_all(worker.pid, nice)
            before = progress(http, job)
            t0 = time.monotonic()
            row = run_row(server, bodies, args.clients, 0, work, offset=(2 + i) * 10**5, duration=args.seconds)
            after = progress(http, job)
            scanned = after["progress"]["done"] - before["progress"]["done"]
            rows.append({"phase": f"scan job, worker nice {nice}", **row, "job_state_after": after["state"],
                         "scan_queries_s": round(scanned / (time.monotonic() - t0), 2)})
        assert http.delete(f"/v1/jobs/{job}").status_code == 202
        # the scan stops after its chunk: through arq's abort or the progress hook, whichever comes first
        while not any(w in (work / "worker.log").read_text() for w in ("aborted", "'state': 'cancelled'")):
            time.sleep(0.2)
        rows.append({"phase": "idle again", **run_row(server, bodies, args.clients, 0, work, offset=4 * 10**5,
                                                       duration=args.seconds)})
    finally:
        http.close()
        worker.terminate()
        worker.wait(timeout=120)
        server.stop()
        redis.stop()
    idle = sorted(r["p95_ms"] for r in rows if r["phase"].startswith("idle"))
    result = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpus": os.cpu_count(),
              "clients": args.clients, "seconds_per_row": args.seconds, "scan_queries": len(scan_queries),
              "load_end": loadavg(), "rows": rows,
              "p95_ratio": {r["phase"]: [round(r["p95_ms"] / idle[0], 2), round(r["p95_ms"] / idle[-1], 2)]
                            for r in rows if r["phase"].startswith("scan")}}
    (args.out / "jobs.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / "jobs.md").write_text(report(result))
    print(report(result))


def _scan(row: dict[str, Any]) -> str:
    return f"{row['scan_queries_s']} (job {row['job_state_after']} at the end)" if "scan_queries_s" in row else ""


def report(r: dict[str, Any]) -> str:
    lines = ["# Interactive latency while a scan job runs", "",
             f"{r['date']}; {r['cpus']} CPUs shared with other work (load averages below); {r['clients']} "
             f"closed-loop clients, {r['seconds_per_row']:g} s a row, every request a distinct uncached query "
             f"(`python -m bench.jobs`). The scan job: {r['scan_queries']} demo queries in a `stride worker-jobs` "
             "process (1 torch thread) beside `stride serve` (default settings).", "",
             "| phase | answered | req/s | p50 ms | p95 ms | p99 ms | failed | scan queries/s | load before / after |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in r["rows"]:
        lines.append(f"| {row['phase']} | {row['answered']} | {row['req_s']} | {row['p50_ms']} | {row['p95_ms']} | "
                     f"{row['p99_ms']} | {row['failed']} | {_scan(row)} | "
                     f"{row['load_before']} / {row['load_after']} |")
    lines += ["", "p95 during the job over idle p95 (against the better / the worse idle row): "
              + "; ".join(f"{k} {a}x / {b}x" for k, (a, b) in r["p95_ratio"].items()), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
