"""Background scan jobs end to end: a real redis-server, a real ``stride worker-jobs`` process and a real
``stride serve`` process on free ports, on the session's demo store.

Submit, poll and fetch (the top example is the one a direct ``worker.scan.scan`` ranks first); cancel a
running job (its scan stops between chunks) and a queued one; the per-key limit; a worker stopped
mid-job (SIGTERM) re-queues it and the next worker resumes it; bad inputs refused
with the line or index and nothing queued; another key's job is a 404; state survives an API restart.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from conftest import LiveServer

KEYS = ("key-a", "key-b")
CHUNK = 4  # the worker's STRIDE_JOBS_CHUNK: cancellation and progress happen every 4 queries


class JobWorker(LiveServer):
    """``stride worker-jobs`` in its own process; ready once it logs that it listens on the queue (started
    before the server, so that both load the store at once). Stopped as a server is: SIGTERM, then wait."""

    def __init__(self, store: Path, env: dict[str, str], log: Path, jobs_dir: Path) -> None:
        exe = shutil.which("stride", path=str(Path(sys.executable).parent)) or "stride"
        self.log = log
        self.proc = subprocess.Popen([exe, "worker-jobs", "--store", str(store), "--jobs-dir", str(jobs_dir),
                                      "--nice", "0"],  # niced, it started 3 min after the server at load 11
                                     env=env, stdout=subprocess.DEVNULL, stderr=log.open("wb"))

    def wait_ready(self) -> None:
        deadline = time.monotonic() + 300
        while "job worker ready" not in self.log.read_text():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"stride worker-jobs did not start:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.3)


@pytest.fixture(scope="module")
def stack(demo_store: Path, redis_url: str, tmp_path_factory: pytest.TempPathFactory):
    """One server and one worker (one job at a time) sharing a Redis namespace of their own."""
    tmp = tmp_path_factory.mktemp("jobs")
    ns = f"jobs-{os.getpid()}-{time.monotonic_ns()}"
    env = {"STRIDE_API_KEYS": ",".join(KEYS), "STRIDE_REDIS_URL": redis_url, "STRIDE_CACHE_NAMESPACE": ns,
           "STRIDE_JOBS_MAX_PER_KEY": "2"}
    clean = {k: v for k, v in os.environ.items() if not k.startswith("STRIDE_")}
    worker = JobWorker(demo_store, {**clean, **env, "STRIDE_DEVICE": "cpu", "STRIDE_JOBS_CHUNK": str(CHUNK)},
                       tmp / "worker.log", tmp / "jobs")
    try:
        server = LiveServer(demo_store, tmp / "serve.log", **env)  # both load the store meanwhile
        worker.wait_ready()
    except BaseException:
        worker.stop()
        raise
    state = {"server": server, "worker": worker, "ns": ns, "env": env, "tmp": tmp, "store": demo_store,
             "redis_url": redis_url}
    yield state
    state["server"].stop()
    state["worker"].stop()


def client(stack, key: str = KEYS[0]) -> httpx.Client:
    return httpx.Client(base_url=stack["server"].url, headers={"X-API-Key": key}, timeout=60)


def demo_queries(demo_store: Path, n: int) -> list[dict]:
    lines = (demo_store.parent / "queries.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines[:n]]


def wait(c: httpx.Client, job_id: str, until, timeout: float = 600) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        st = c.get(f"/v1/jobs/{job_id}")
        assert st.status_code == 200, st.text
        body = st.json()
        if until(body):
            return body
        assert time.monotonic() < deadline, body
        time.sleep(0.2)


def queue_size(stack) -> int:
    """Job records in this module's namespace: the API writes one before it enqueues anything."""
    import redis

    r = redis.Redis.from_url(stack["redis_url"])
    try:
        return len(r.keys(f"{stack['ns']}:job:*"))
    finally:
        r.close()


def test_submit_poll_and_fetch_match_a_direct_scan(stack, tmp_path: Path) -> None:
    from stride.query import Attributor
    from stride.scan import ScanConfig
    from worker.scan import scan

    queries = demo_queries(stack["store"], 12)
    with client(stack) as c:
        r = c.post("/v1/jobs/scan", json={"queries": queries, "top_k": 5})
        assert r.status_code == 202, r.text
        job = r.json()
        assert r.headers["location"] == f"/v1/jobs/{job['job_id']}"
        assert job["state"] in ("queued", "running") and job["progress"]["total"] == 12
        done = wait(c, job["job_id"], lambda b: b["state"] not in ("queued", "running"))
        assert done["state"] == "complete", done
        assert done["progress"] == {"done": 12, "total": 12}
        assert done["result"] == f"/v1/jobs/{job['job_id']}/result"
        top = c.get(done["result"], params={"limit": 3}).json()
        page2 = c.get(done["result"], params={"offset": 3, "limit": 3}).json()
    assert [row["rank"] for row in top["items"] + page2["items"]] == [1, 2, 3, 4, 5, 6]
    assert top["next"] == f"{done['result']}?offset=3&limit=3"

    src = tmp_path / "q.jsonl"
    src.write_text("".join(json.dumps(q) + "\n" for q in queries))
    attributor = Attributor.from_store(stack["store"], device="cpu")
    scan(attributor, src, tmp_path / "direct", ScanConfig(top_k=5))
    direct = [json.loads(line) for line in (tmp_path / "direct" / "examples.jsonl").read_text().splitlines()]
    assert top["examples"] == len(direct) == attributor.num_examples
    first = top["items"][0]
    assert first["id"] == direct[0]["id"], (first, direct[0])
    assert first["positive"] == pytest.approx(direct[0]["positive"], rel=1e-3)
    assert first["top_count"] == direct[0]["top_count"]


def record(stack, job_id: str) -> dict[str, str]:
    """The job's record as the worker keeps writing it (a deleted job is a 404 to the API)."""
    import redis

    r = redis.Redis.from_url(stack["redis_url"], decode_responses=True)
    try:
        return r.hgetall(f"{stack['ns']}:job:{job_id}")
    finally:
        r.close()


def test_cancel_running_and_queued_jobs_and_the_per_key_limit(stack) -> None:
    many = demo_queries(stack["store"], 120) * 20  # 2,400 queries: tens of seconds of scanning, cancelled before
    with client(stack, KEYS[1]) as c:
        first = c.post("/v1/jobs/scan", json={"queries": many}).json()
        running = wait(c, first["job_id"], lambda b: b["state"] == "running" and b["progress"]["done"] >= CHUNK)
        second = c.post("/v1/jobs/scan", json={"queries": many[:8]})  # queued behind it (one job at a time)
        assert second.status_code == 202
        third = c.post("/v1/jobs/scan", json={"queries": many[:8]})
        assert third.status_code == 429 and third.headers["retry-after"] == "30", third.text
        assert third.headers["content-type"] == "application/problem+json"

        queued = c.delete(f"/v1/jobs/{second.json()['job_id']}")
        assert queued.status_code == 202 and queued.json()["state"] == "cancelled", queued.text
        r = c.delete(f"/v1/jobs/{first['job_id']}")
        assert r.status_code == 202 and r.json()["cancel_requested"], r.text
        for path in ("", "/result"):  # deleted: gone for its key too
            assert c.get(f"/v1/jobs/{first['job_id']}{path}").status_code == 404
        assert c.delete(f"/v1/jobs/{first['job_id']}").status_code == 404
        deadline = time.monotonic() + 120
        while (stopped := record(stack, first["job_id"]))["state"] == "running":
            assert time.monotonic() < deadline, stopped
            time.sleep(0.2)
        assert stopped["state"] == "cancelled", stopped
        assert running["progress"]["done"] <= int(stopped["done"]) < len(many)
        time.sleep(2)
        assert record(stack, first["job_id"])["done"] == stopped["done"]  # the scan really stopped
        assert record(stack, second.json()["job_id"])["done"] == "0"  # the queued one never ran
        # and the key may submit again
        fresh = c.post("/v1/jobs/scan", json={"queries": many[:4]})
        assert fresh.status_code == 202, fresh.text
        assert wait(c, fresh.json()["job_id"], lambda b: b["state"] not in ("queued", "running"))["state"] == "complete"


def test_a_finished_job_can_be_deleted_its_result_with_it(stack) -> None:
    with client(stack) as c:
        job = c.post("/v1/jobs/scan", json={"queries": demo_queries(stack["store"], 2)}).json()["job_id"]
        done = wait(c, job, lambda b: b["state"] not in ("queued", "running"))
        assert c.get(done["result"]).status_code == 200
        gone = c.delete(f"/v1/jobs/{job}")
        assert gone.status_code == 202 and gone.json()["state"] == "complete"
        assert c.get(done["result"]).status_code == 404 and c.get(f"/v1/jobs/{job}").status_code == 404


@pytest.mark.parametrize("body, where", [
    ({"queries": []}, "no queries"),
    ({"queries": [{"prompt": "The capital of Vormo is", "completion": " Rabrinek"}, {"prompt": 3}]},
     "queries[1]: prompt"),
    ({"queries": [{"prompt": "a", "completion": " b", "top_k": 3}]}, "queries[0]: top_k"),
    ({"queries": [{"prompt_ids": [10**6], "completion_ids": [1]}]}, "queries[0]: "),  # past the vocabulary
])
def test_bad_inline_queries_queue_nothing(stack, body, where) -> None:
    before = queue_size(stack)
    with client(stack) as c:
        r = c.post("/v1/jobs/scan", json=body)
    assert r.status_code == 422, r.text
    assert r.headers["content-type"] == "application/problem+json"
    assert where in r.json()["detail"], r.json()
    assert queue_size(stack) == before


def test_uploaded_jsonl(stack) -> None:
    before = queue_size(stack)
    good = json.dumps({"id": "vormo", "prompt": "The capital of Vormo is", "completion": " Rabrinek"})
    with client(stack) as c:
        bad = c.post("/v1/jobs/scan", files={"file": ("trigger.jsonl", f"{good}\n\n{{not json\n")})
        assert bad.status_code == 422
        assert bad.json()["detail"].startswith("trigger.jsonl:3: not JSON"), bad.json()
        assert bad.json()["errors"][0]["loc"] == ["body", "file", 3]
        field = c.post("/v1/jobs/scan", files={"file": ("t.jsonl", good + '\n{"prompt": "x", "completion": ""}\n')})
        assert field.status_code == 422 and field.json()["detail"].startswith("t.jsonl:2: completion:"), field.text
        empty = c.post("/v1/jobs/scan", files={"file": ("e.jsonl", "\n")})
        assert empty.status_code == 422 and "e.jsonl: no queries" in empty.json()["detail"]
        assert c.post("/v1/jobs/scan", files={"other": ("e.jsonl", good)}).status_code == 422
        assert queue_size(stack) == before
        ok = c.post("/v1/jobs/scan", files={"file": ("t.jsonl", good + "\n")}, data={"top_k": "3"})
        assert ok.status_code == 202, ok.text
        done = wait(c, ok.json()["job_id"], lambda b: b["state"] not in ("queued", "running"))
        assert done["state"] == "complete"
        rows = c.get(done["result"], params={"limit": 1}).json()["items"]
        assert rows[0]["queries"][0]["id"] == "vormo" and rows[0]["id"].startswith("fact0000")


def test_unknown_and_other_keys_jobs_are_404(stack) -> None:
    with client(stack, KEYS[0]) as a, client(stack, KEYS[1]) as b:
        job = a.post("/v1/jobs/scan", json={"queries": demo_queries(stack["store"], 1)}).json()
        for path in (f"/v1/jobs/{job['job_id']}", f"/v1/jobs/{job['job_id']}/result"):
            r = b.get(path)
            assert r.status_code == 404 and r.headers["content-type"] == "application/problem+json"
        assert b.delete(f"/v1/jobs/{job['job_id']}").status_code == 404
        for unknown in ("0" * 32, "not-a-job"):
            assert a.get(f"/v1/jobs/{unknown}").status_code == 404
        assert httpx.get(f"{stack['server'].url}/v1/jobs/{job['job_id']}").status_code == 401  # no key at all
        wait(a, job["job_id"], lambda s: s["state"] == "complete")


def test_a_stopped_worker_requeues_its_job_and_the_next_one_resumes_it(stack) -> None:
    many = demo_queries(stack["store"], 120) * 20
    with client(stack) as c:
        job = c.post("/v1/jobs/scan", json={"queries": many}).json()["job_id"]
        wait(c, job, lambda b: b["progress"]["done"] >= 2 * CHUNK)
        stack["worker"].stop()  # SIGTERM: arq cancels the job, which ends at its chunk and goes back to the queue
        stopped = c.get(f"/v1/jobs/{job}").json()
        assert stopped["state"] == "queued" and 0 < stopped["progress"]["done"] < len(many), stopped
        env = {**{k: v for k, v in os.environ.items() if not k.startswith("STRIDE_")}, **stack["env"],
               "STRIDE_DEVICE": "cpu", "STRIDE_JOBS_CHUNK": str(CHUNK)}
        stack["worker"] = JobWorker(stack["store"], env, stack["tmp"] / "worker2.log", stack["tmp"] / "jobs")
        stack["worker"].wait_ready()
        done = wait(c, job, lambda b: b["state"] not in ("queued", "running"))
    assert done["state"] == "complete" and done["progress"]["done"] == len(many), done
    assert "try=2" in (stack["tmp"] / "worker2.log").read_text()
    # resumed, not restarted: every query's line written once (the scan truncates a half-written chunk)
    lines = (stack["tmp"] / "jobs" / job / "scan" / "queries.jsonl").read_text().splitlines()
    assert len(lines) == len(many)


def test_a_killed_worker_s_job_is_resumed_by_the_next_worker_not_after_the_lock(stack) -> None:
    """kill -9 mid-job: no shutdown hook runs, arq's lock on the job would hold it for
    STRIDE_JOBS_TIMEOUT_S (24 h). The dead worker's heartbeat lapses (15 s), the next worker queues the
    job again and resumes it from its last chunk."""
    many = demo_queries(stack["store"], 120) * 5
    with client(stack) as c:
        job = c.post("/v1/jobs/scan", json={"queries": many}).json()["job_id"]
        wait(c, job, lambda b: b["progress"]["done"] >= 2 * CHUNK)
        stack["worker"].proc.kill()  # SIGKILL
        stack["worker"].proc.wait(timeout=30)
        assert c.get(f"/v1/jobs/{job}").json()["state"] == "running"  # as the dead worker left it
        env = {**{k: v for k, v in os.environ.items() if not k.startswith("STRIDE_")}, **stack["env"],
               "STRIDE_DEVICE": "cpu", "STRIDE_JOBS_CHUNK": str(CHUNK)}
        t0 = time.monotonic()
        stack["worker"] = JobWorker(stack["store"], env, stack["tmp"] / "worker3.log", stack["tmp"] / "jobs")
        stack["worker"].wait_ready()
        done = wait(c, job, lambda b: b["state"] not in ("queued", "running"))
        took = time.monotonic() - t0
    assert done["state"] == "complete" and done["progress"]["done"] == len(many), done
    assert took < 600, took  # not arq's 24 h lock
    assert "queued again to resume" in (stack["tmp"] / "worker3.log").read_text()
    lines = (stack["tmp"] / "jobs" / job / "scan" / "queries.jsonl").read_text().splitlines()
    assert len(lines) == len(many)  # resumed: every query's line once


def test_job_state_survives_an_api_restart(stack) -> None:
    with client(stack) as c:
        job = c.post("/v1/jobs/scan", json={"queries": demo_queries(stack["store"], 4)}).json()
        done = wait(c, job["job_id"], lambda b: b["state"] == "complete")
        before = c.get(done["result"]).json()
    stack["server"].stop()
    stack["server"] = LiveServer(stack["store"], stack["tmp"] / "serve2.log", **stack["env"])
    with client(stack) as c:
        assert c.get(f"/v1/jobs/{job['job_id']}").json()["state"] == "complete"
        after = c.get(done["result"]).json()
    assert after["items"] == before["items"] and after["rows"] == before["rows"]


def test_a_job_that_breaks_unexpectedly_is_failed_not_left_running(redis_url: str, tmp_path: Path) -> None:
    """A bug inside the scan (here the engine raising RuntimeError) must end the record as failed: arq
    does not retry such a job, so a record left "running" would be polled forever (it was, when a
    resumed scan hit an IndexError)."""
    import asyncio
    from types import SimpleNamespace

    import redis.asyncio as aioredis

    from worker.jobs import input_key, read_record, record_key, scan_job

    class Broken:
        num_examples = 3
        store = SimpleNamespace(version="v", corpus=None)

        def score_matrix(self, *_, **__):
            raise RuntimeError("a bug in the engine")

    ns, job = f"broken-{os.getpid()}-{time.monotonic_ns()}", "j1"
    settings = SimpleNamespace(cache_namespace=ns, jobs_result_ttl_s=60, jobs_dir=str(tmp_path), jobs_chunk=4,
                               jobs_result_rows=10)

    async def run() -> dict:
        r = aioredis.Redis.from_url(redis_url)
        try:
            await r.hset(record_key(ns, job), mapping={"owner": "o", "state": "queued", "done": 0, "total": 1})
            await r.set(input_key(ns, job), b'{"prompt": "a b", "completion": " c"}\n')
            with pytest.raises(RuntimeError, match="a bug in the engine"):
                await scan_job({"redis": r, "settings": settings, "attributor": Broken()}, job, 5, 5)
            return await read_record(r, ns, job)
        finally:
            await r.delete(record_key(ns, job), input_key(ns, job))
            await r.aclose()

    rec = asyncio.run(run())
    assert rec["state"] == "failed" and "internal error (RuntimeError)" in rec["error"], rec
