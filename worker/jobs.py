"""Background scan jobs: the arq worker (``stride worker-jobs``) and the job record both sides share.

The API process only validates, enqueues and reads (``app/jobs.py``); the scan runs here, in a
separate process that loads the store once, so a long scan never holds the service's model thread.
State lives in Redis (arq's queue plus one hash per job), so jobs outlive an API restart, and each
job scans into its own directory under ``STRIDE_JOBS_DIR`` with ``worker.scan.scan``'s resumable
state, so a job whose worker died continues where its last chunk ended once arq runs it again: at
once after a SIGTERM, and 3 heartbeats (15 s) after a ``kill -9`` (``reclaim_orphans``), not after
arq's lock lapses.

Record ``{ns}:job:{id}`` (a hash): owner (sha256 of the API key), state (queued, running, complete,
failed, cancelled), done/total queries, timestamps, error; ``cancel`` is set by DELETE on a running
job and read by the scan's progress hook after every chunk; ``deleted`` hides it from the API.
Result ``{ns}:job:{id}:result``: the first ``STRIDE_JOBS_RESULT_ROWS`` rows of examples.jsonl (a list,
so GET pages with LRANGE). Both
expire ``STRIDE_JOBS_RESULT_TTL_S`` after the last write.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import shutil
import time
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import Any

from stride.result import QueryError
from stride.scan import ScanConfig
from stride.store import StoreError

log = logging.getLogger("stride.jobs")

ACTIVE = ("queued", "running")
TERMINAL = ("complete", "failed", "cancelled")
FUNCTION = "scan_job"

# compare-and-set of a record's state: HSET only when the current state is one of ARGV[1] (comma list);
# refreshes the TTL; returns the previous state, or false when the record is gone or in another state
_TRANSITION = """
local s = redis.call('HGET', KEYS[1], 'state')
if not s then return false end
for allowed in string.gmatch(ARGV[1], '[^,]+') do
  if allowed == s then
    redis.call('HSET', KEYS[1], 'state', ARGV[2], unpack(ARGV, 4))
    redis.call('EXPIRE', KEYS[1], tonumber(ARGV[3]))
    return s
  end
end
return false
"""


class JobCancelled(Exception):
    """Raised by the progress hook between chunks once a cancel is requested: the scan stops there."""


def record_key(ns: str, job_id: str) -> str:
    return f"{ns}:job:{job_id}"


def result_key(ns: str, job_id: str) -> str:
    return f"{ns}:job:{job_id}:result"


def input_key(ns: str, job_id: str) -> str:
    """The job's queries (JSONL), kept until it ends: not an arq argument, so arq's log lines carry no prompt."""
    return f"{ns}:job:{job_id}:input"


def active_key(ns: str, owner: str) -> str:
    return f"{ns}:jobs:active:{owner}"


def queue_name(ns: str) -> str:
    return f"{ns}:jobs:queue"


def alive_key(ns: str, job_id: str) -> str:
    """Refreshed every HEARTBEAT_S by the worker running the job; gone 3 beats after that worker died."""
    return f"{ns}:job:{job_id}:alive"


HEARTBEAT_S = 5.0
ARQ_IN_PROGRESS = "arq:in-progress:"  # arq's lock on a job being run (arq.constants.in_progress_key_prefix)


def owner_of(api_key: str | None) -> str:
    """Jobs belong to a key; the record keeps its sha256, never the key. No keys configured: one owner."""
    return "open" if api_key is None else hashlib.sha256(api_key.encode()).hexdigest()[:32]


async def transition(redis, ns: str, job_id: str, allowed: tuple[str, ...], state: str, ttl_s: int,
                     **fields: Any) -> str | None:
    """Atomically move a record from one of ``allowed`` to ``state`` (plus fields); the previous state or None."""
    flat = [str(x) for kv in fields.items() for x in kv]
    prev = await redis.eval(_TRANSITION, 1, record_key(ns, job_id), ",".join(allowed), state, str(ttl_s), *flat)
    return prev.decode() if isinstance(prev, bytes) else prev or None


async def read_record(redis, ns: str, job_id: str) -> dict[str, str] | None:
    raw = await redis.hgetall(record_key(ns, job_id))
    return {k.decode(): v.decode() for k, v in raw.items()} if raw else None


class JobProgress:
    """``worker.scan.scan``'s progress hook, called from the scan's thread after each chunk's state is
    saved: writes done/total to the record and raises JobCancelled when a cancel was requested, so a
    cancelled scan stops between chunks with everything before it on disk."""

    def __init__(self, loop: asyncio.AbstractEventLoop, redis, ns: str, job_id: str, done: int, ttl_s: int,
                 stop: Any):
        self.loop, self.redis, self.ns, self.job_id, self.done, self.ttl = loop, redis, ns, job_id, done, ttl_s
        self.stop = stop  # threading.Event: set when arq cancels the task (an abort or a shutdown)

    async def _write(self) -> bool:
        key = record_key(self.ns, self.job_id)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(key, mapping={"done": self.done, "updated": time.time()})
            pipe.expire(key, self.ttl)
            pipe.hget(key, "cancel")
            *_, cancel = await pipe.execute()
        return cancel is not None

    def advance(self, n: int = 1, **stats: float) -> None:
        self.done += n
        try:
            cancel = asyncio.run_coroutine_threadsafe(self._write(), self.loop).result(timeout=30)
        except FutureTimeout:
            log.warning("job %s: progress not written (Redis slow)", self.job_id)
            cancel = False
        if cancel or self.stop.is_set():
            raise JobCancelled(self.job_id)


def _top_rows(path: Path, rows: int) -> list[bytes]:
    out = []
    with open(path, "rb") as f:
        for line in f:
            if len(out) >= rows:
                break
            out.append(line.rstrip(b"\n"))
    return out


async def scan_job(ctx: dict, job_id: str, top_k: int, queries_per_example: int) -> dict:
    """One scan job. Returns a short summary (arq keeps it); the record and result list are what the API reads."""
    import threading

    redis, s = ctx["redis"], ctx["settings"]
    ns, ttl = s.cache_namespace, s.jobs_result_ttl_s
    rec = await read_record(redis, ns, job_id)
    if rec is None or rec["state"] in TERMINAL:  # expired, or cancelled while queued
        return {"state": rec["state"] if rec else "expired"}
    if rec.get("cancel"):  # cancelled while its previous worker was going down
        await _finish(redis, ns, job_id, rec["owner"], "cancelled", ttl)
        return {"state": "cancelled"}
    await _beat(redis, ns, job_id)  # alive before "running": never reclaimed as it starts
    stop = threading.Event()
    beat = asyncio.get_running_loop().create_task(_heartbeat(redis, ns, job_id))
    try:
        if await transition(redis, ns, job_id, ACTIVE, "running", ttl, started=time.time(),
                            attempt=ctx.get("job_try", 1)) is None:
            return {"state": "gone"}
        return await _run(ctx, job_id, top_k, queries_per_example, rec["owner"], stop)
    except Exception as e:  # a bug, not bad input: the record must not say "running" forever (arq does not retry)
        await _finish(redis, ns, job_id, rec["owner"], "failed", ttl,
                      error=f"internal error ({type(e).__name__}); the worker's log has the traceback")
        raise
    finally:
        beat.cancel()
        await asyncio.gather(beat, return_exceptions=True)
        await redis.delete(alive_key(ns, job_id))


async def _beat(redis, ns: str, job_id: str) -> None:
    await redis.set(alive_key(ns, job_id), os.getpid(), ex=int(3 * HEARTBEAT_S))


async def _heartbeat(redis, ns: str, job_id: str) -> None:
    from redis.exceptions import RedisError

    while True:
        await asyncio.sleep(HEARTBEAT_S)
        try:
            await _beat(redis, ns, job_id)
        except RedisError as e:  # Redis away for a beat: the job goes on; two more beats before it counts
            log.warning("job %s: heartbeat not written: %s", job_id, e)


async def _run(ctx: dict, job_id: str, top_k: int, queries_per_example: int, owner: str, stop) -> dict:
    from worker.scan import ScanInputError, resumed
    from worker.scan import scan as run_scan

    redis, s = ctx["redis"], ctx["settings"]
    ns, ttl = s.cache_namespace, s.jobs_result_ttl_s
    jdir = Path(s.jobs_dir) / job_id
    jdir.mkdir(parents=True, exist_ok=True)
    src, out = jdir / "input.jsonl", jdir / "scan"
    if not src.exists():  # written once: the scan's resume key is this file's sha256
        raw = await redis.get(input_key(ns, job_id))
        if raw is None:
            await _finish(redis, ns, job_id, owner, "failed", ttl, error="the job's queries expired")
            return {"state": "failed"}
        tmp = jdir / ".input.jsonl.tmp"
        tmp.write_bytes(raw)
        os.replace(tmp, src)
    loop = asyncio.get_running_loop()
    progress = JobProgress(loop, redis, ns, job_id, resumed(out), ttl, stop)
    await redis.hset(record_key(ns, job_id), "done", progress.done)
    cfg = ScanConfig(top_k=top_k, queries_per_example=queries_per_example, chunk=s.jobs_chunk)
    fut = loop.run_in_executor(None, lambda: run_scan(ctx["attributor"], src, out, cfg, progress=progress))
    try:
        summary = await asyncio.shield(fut)
    except asyncio.CancelledError:
        # arq cancelled the task: a DELETE (abort) or the worker shutting down. The scan thread
        # cannot be interrupted mid-chunk; it stops at the next progress call, its state saved.
        stop.set()
        try:
            await fut
        except JobCancelled:
            pass
        rec = await read_record(redis, ns, job_id) or {}
        if rec.get("cancel"):
            await _finish(redis, ns, job_id, owner, "cancelled", ttl)
        else:  # shutdown: queued again, and arq runs it again (resuming from the saved chunk)
            await transition(redis, ns, job_id, ("running",), "queued", ttl)
        raise
    except JobCancelled:
        await _finish(redis, ns, job_id, owner, "cancelled", ttl)
        return {"state": "cancelled"}
    except (ScanInputError, QueryError, StoreError) as e:
        await _finish(redis, ns, job_id, owner, "failed", ttl, error=str(e).replace(str(src), "queries"))
        return {"state": "failed"}
    rows = _top_rows(out / "examples.jsonl", s.jobs_result_rows)
    rkey = result_key(ns, job_id)
    async with redis.pipeline(transaction=True) as pipe:
        pipe.delete(rkey)
        if rows:
            pipe.rpush(rkey, *rows)
        pipe.expire(rkey, ttl)
        await pipe.execute()
    await _finish(redis, ns, job_id, owner, "complete", ttl, examples=summary["examples"], result_rows=len(rows),
                  store_version=summary["store_version"])
    return {"state": "complete", "top": summary["top"][:3]}


async def _finish(redis, ns: str, job_id: str, owner: str, state: str, ttl: int, **fields: Any) -> None:
    await transition(redis, ns, job_id, ACTIVE, state, ttl, finished=time.time(), **fields)
    await redis.srem(active_key(ns, owner), job_id)
    await redis.delete(input_key(ns, job_id))


async def reclaim_orphans(redis, ns: str, ttl: int) -> list[str]:
    """Jobs whose worker died outright (``kill -9``, a lost machine): arq's lock on them would hold them
    for ``STRIDE_JOBS_TIMEOUT_S`` (24 h by default). A job whose record says running but whose worker
    stopped refreshing its alive key is queued again and its lock dropped, so the next free worker
    resumes it from its last chunk. Run at every worker's start and every HEARTBEAT_S after."""
    reclaimed = []
    async for key in redis.scan_iter(match=f"{ARQ_IN_PROGRESS}*", count=500):
        job_id = (key.decode() if isinstance(key, bytes) else key)[len(ARQ_IN_PROGRESS):]
        rec = await read_record(redis, ns, job_id)
        if rec is None or rec["state"] != "running" or await redis.exists(alive_key(ns, job_id)):
            continue  # another deployment's job, not running, or its worker is alive
        if await transition(redis, ns, job_id, ("running",), "queued", ttl) is not None:
            await redis.delete(key)
            reclaimed.append(job_id)
            log.warning("job %s: its worker stopped without a word; queued again to resume", job_id)
    return reclaimed


async def prune_dirs(redis, ns: str, jobs_dir: Path) -> int:
    """Remove the directories of jobs whose record expired (results expire; their files too)."""
    removed = 0
    if not jobs_dir.is_dir():
        return 0
    for d in jobs_dir.iterdir():
        if d.is_dir() and not await redis.exists(record_key(ns, d.name)):
            shutil.rmtree(d, ignore_errors=True)
            removed += 1
    return removed


def worker_settings(settings, attributor) -> dict[str, Any]:
    """Keyword arguments of ``arq.Worker``: the scan function, the store loaded once, aborts allowed, one job
    at a time (the scan's thread owns the model while it runs)."""
    from arq.connections import RedisSettings

    ns, ttl = settings.cache_namespace, settings.jobs_result_ttl_s

    async def reaper(redis) -> None:
        from redis.exceptions import RedisError

        while True:
            await asyncio.sleep(HEARTBEAT_S)
            try:
                await reclaim_orphans(redis, ns, ttl)
            except RedisError as e:  # Redis away for now: the next beat tries again
                log.warning("could not look for orphaned jobs: %s", e)

    async def startup(ctx: dict) -> None:
        ctx["settings"], ctx["attributor"] = settings, attributor
        n = await prune_dirs(ctx["redis"], ns, Path(settings.jobs_dir))
        orphans = await reclaim_orphans(ctx["redis"], ns, ttl)
        ctx["reaper"] = asyncio.get_running_loop().create_task(reaper(ctx["redis"]))
        log.info("job worker ready: queue %s, %d expired job directories removed, %d orphaned jobs queued again",
                 queue_name(ns), n, len(orphans))

    async def shutdown(ctx: dict) -> None:
        if "reaper" in ctx:
            ctx["reaper"].cancel()
            await asyncio.gather(ctx["reaper"], return_exceptions=True)

    async def after_job(ctx: dict) -> None:
        await prune_dirs(ctx["redis"], settings.cache_namespace, Path(settings.jobs_dir))

    from arq import func

    return {"functions": [func(scan_job, name=FUNCTION, timeout=settings.jobs_timeout_s)],
            "redis_settings": RedisSettings.from_dsn(settings.redis_url),
            "queue_name": queue_name(ns), "on_startup": startup, "on_shutdown": shutdown, "after_job_end": after_job,
            "allow_abort_jobs": True, "max_jobs": 1, "job_timeout": settings.jobs_timeout_s,
            "keep_result": settings.jobs_result_ttl_s, "poll_delay": 0.5}
