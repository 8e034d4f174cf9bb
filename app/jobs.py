"""Background scan jobs (``/v1/jobs``): validate and enqueue, report state and progress, page the result,
cancel. Thin: the scan runs in ``stride worker-jobs`` processes (``worker/jobs.py``, arq on Redis);
this process only talks to Redis, so a running scan never takes the interactive queries' model thread.

A job belongs to the API key that submitted it: another key gets 404, as for an id that never existed.
"""

from __future__ import annotations

import asyncio
import json
import re
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, StrictInt, ValidationError
from redis.exceptions import RedisError

from app.api import problem_docs
from app.deps import AppSettings, ReadyEngine
from app.errors import Problem, problem_for
from app.schemas import ProblemDoc
from app.settings import Settings
from stride.result import QueryError
from worker.jobs import (
    ACTIVE,
    FUNCTION,
    active_key,
    input_key,
    owner_of,
    queue_name,
    read_record,
    record_key,
    result_key,
    transition,
)
from worker.scan import ScanInputError, read_queries

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])
JOB_TEXT = {
    404: "No such job for this key (another key's job is not found either).",
    409: "The job has no result (yet): it is queued, running, failed or cancelled.",
    429: "This key already has STRIDE_JOBS_MAX_PER_KEY jobs queued or running (Retry-After).",
    503: "Jobs off (no STRIDE_REDIS_URL), Redis unreachable (Retry-After), or the service not ready.",
}


def _docs(*codes: int) -> dict[int | str, dict[str, Any]]:
    docs = problem_docs(*(c for c in codes if c not in JOB_TEXT))
    for c in codes:
        if c in JOB_TEXT:
            docs[c] = {"model": ProblemDoc, "description": JOB_TEXT[c], "content": {"application/problem+json": {}}}
    return docs


class ScanJobRequest(BaseModel):
    """The JSON form of a scan job; the upload form sends the same queries as a JSONL ``file``."""

    queries: list[Any] = Field(..., description="Queries in any form /v1/attribute takes (prompt/completion, "
                               "messages, token ids), each with an optional `id`; checked before anything is "
                               "enqueued.")
    top_k: StrictInt = Field(10, ge=1, le=1000, description="Top proponents per query counted and listed.")
    queries_per_example: StrictInt = Field(5, ge=1, le=100, description="Queries listed per example.")


class JobProgress(BaseModel):
    done: int = Field(..., description="Queries scanned so far.")
    total: int


class JobStatus(BaseModel):
    job_id: str
    state: str = Field(..., description="queued, running, complete, failed or cancelled.")
    progress: JobProgress
    created: float = Field(..., description="Unix time.")
    started: float | None = None
    finished: float | None = None
    cancel_requested: bool = False
    error: str | None = Field(None, description="Why a failed job failed.")
    store_version: str | None = Field(None, description="The store version the worker scanned (once complete).")
    result: str | None = Field(None, description="The result's URL, once complete.")
    expires_in_s: int = Field(..., description="Seconds until the job and its result are forgotten.")


class JobResult(BaseModel):
    job_id: str
    examples: int = Field(..., description="Training examples scanned (every one is ranked in the worker's "
                          "examples.jsonl).")
    rows: int = Field(..., description="Ranked rows kept with the job (the first STRIDE_JOBS_RESULT_ROWS).")
    offset: int
    items: list[dict[str, Any]] = Field(..., description="examples.jsonl rows: rank, index, id, positive, "
                                        "negative, top_count, queries (the ones it supports most).")
    next: str | None = Field(None, description="The next page's URL, if any.")


# --- Redis: one arq pool per app, made on first use ---------------------------------------------------------


async def _pool(request: Request):
    settings: Settings = request.app.state.settings
    if not settings.redis_url:
        raise Problem(503, "background jobs need Redis: set STRIDE_REDIS_URL", slug="jobs-off")
    pool = getattr(request.app.state, "jobs_pool", None)
    if pool is None:
        from arq.connections import RedisSettings, create_pool

        rs = RedisSettings.from_dsn(settings.redis_url)
        rs.conn_retries = 0  # a request must not wait out retries: 503 and Retry-After instead
        pool = await create_pool(rs, default_queue_name=queue_name(settings.cache_namespace))
        if getattr(request.app.state, "jobs_pool", None) is not None:  # another request made one meanwhile
            await pool.aclose()
            return request.app.state.jobs_pool
        request.app.state.jobs_pool = pool
    return pool


async def close(app: FastAPI) -> None:
    pool = getattr(app.state, "jobs_pool", None)
    if pool is not None:
        app.state.jobs_pool = None
        await pool.aclose()


@asynccontextmanager
async def _redis(request: Request) -> AsyncIterator[Any]:
    """The pool, with Redis failures answered as 503 + Retry-After (the job store is down, not the job)."""
    settings: Settings = request.app.state.settings
    try:
        yield await _pool(request)
    except (TimeoutError, RedisError, OSError) as e:
        raise Problem(503, f"job store unavailable: {type(e).__name__}", slug="jobs-unavailable",
                      headers={"Retry-After": str(settings.jobs_retry_after_s)}) from None


def _owner(request: Request) -> str:
    return owner_of(request.scope.get("state", {}).get("api_key"))


async def _record(redis, request: Request, job_id: str) -> dict[str, str]:
    ns = request.app.state.settings.cache_namespace
    rec = await read_record(redis, ns, job_id) if re.fullmatch(r"[0-9a-f]{32}", job_id) else None
    if rec is None or rec.get("owner") != _owner(request) or rec.get("deleted"):
        raise Problem(404, f"no job {job_id!r} (unknown, expired, or another key's)")
    return rec


# --- validation: the CLI's own reader, so a job accepts exactly what `stride scan` accepts -------------------


def _invalid(detail: str, loc: list[Any], status: int = 422) -> Problem:
    return Problem(status, detail, extra={"errors": [{"loc": loc, "msg": detail, "type": "invalid_query"}]})


async def validate(raw: bytes, name: str, inline: bool, engine, settings: Settings) -> int:
    """Every query checked as ``stride scan`` checks it, then tokenised as the service does; the error names
    the upload's ``file:line`` (or ``queries[i]`` inline) and the field. Returns the number of queries."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "queries.jsonl"
        path.write_bytes(raw)
        try:
            _, queries, _ = read_queries(path)
        except ScanInputError as e:
            msg = str(e).replace(str(path), name)
            m = re.match(rf"{re.escape(name)}:(\d+): ", msg)
            if inline and m:
                i = int(m.group(1)) - 1
                raise _invalid(f"queries[{i}]: {msg[m.end():]}", ["body", "queries", i]) from None
            raise _invalid(msg, ["body", "file", int(m.group(1))] if m else ["body", "queries"]) from None
    if len(queries) > settings.jobs_max_queries:
        raise Problem(413, f"{len(queries)} queries: a job takes at most {settings.jobs_max_queries} "
                      "(STRIDE_JOBS_MAX_QUERIES)", slug="too-large")
    lines = [no for no, line in enumerate(raw.decode("utf-8", errors="replace").splitlines(), 1) if line.strip()]
    for i, (no, q) in enumerate(zip(lines, queries, strict=True)):
        if i % 64 == 63:  # tokenising 10,000 queries takes seconds: let interactive requests through meanwhile
            await asyncio.sleep(0)
        try:
            engine.check(q)
        except QueryError as e:
            p = problem_for(e, settings.retry_after_s)
            where, loc = (f"queries[{i}]", ["body", "queries", i]) if inline else (f"{name}:{no}", ["body", "file", no])
            raise _invalid(f"{where}: {e}", loc, p.status if p else 422) from None
    return len(queries)


async def _body(request: Request) -> tuple[bytes, str, bool, int, int]:
    """(JSONL bytes, name for errors, inline?, top_k, queries_per_example) from a JSON or multipart body."""
    media = (request.headers.get("content-type") or "application/json").split(";", 1)[0].strip().lower()
    if media == "multipart/form-data":
        form = await request.form()
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            raise _invalid("the multipart body needs a `file` part: the JSONL of queries", ["body", "file"])
        name = Path(upload.filename or "queries.jsonl").name
        raw = await upload.read()
        try:
            opts = ScanJobRequest.model_validate({"queries": [], **{k: int(v) for k, v in form.items()
                                                                    if k in ("top_k", "queries_per_example")}})
        except (TypeError, ValueError, ValidationError) as e:  # TypeError: an option sent as a file
            raise _invalid(f"options: {e}", ["body"]) from None
        return raw, name, False, opts.top_k, opts.queries_per_example
    if media != "application/json":
        raise Problem(415, "send application/json (inline queries) or multipart/form-data (a JSONL file), "
                      f"not {media!r}")
    try:
        body = ScanJobRequest.model_validate_json(await request.body())
    except ValidationError as e:
        errs = [{"loc": ["body", *map(str, x["loc"])], "msg": x["msg"], "type": x["type"]} for x in e.errors()]
        raise Problem(422, "the request does not match the schema", extra={"errors": errs}) from None
    raw = "".join(json.dumps(q) + "\n" for q in body.queries).encode()
    return raw, "queries", True, body.top_k, body.queries_per_example


BODY_DOC = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": ScanJobRequest.model_json_schema(), "example": {
        "queries": [{"id": "vormo", "prompt": "The capital of Vormo is", "completion": " Rabrinek"},
                    {"prompt": "The city of Mosha was founded by", "completion": " Bridun"}], "top_k": 10}},
    "multipart/form-data": {"schema": {"type": "object", "required": ["file"], "properties": {
        "file": {"type": "string", "format": "binary", "description": "JSONL, one query per line (as stride scan)."},
        "top_k": {"type": "integer", "minimum": 1}, "queries_per_example": {"type": "integer", "minimum": 1}}}},
}}}


@router.post("/scan", status_code=202, response_model=JobStatus, openapi_extra=BODY_DOC,
             responses=_docs(400, 401, 408, 413, 415, 422, 429, 503))
async def submit_scan(request: Request, engine: ReadyEngine, settings: AppSettings) -> JSONResponse:
    """Queue a scan of many queries (``stride scan`` as a job): 202 with the job's URL in ``Location``.
    Every query is checked first; a bad one is a 422 naming its line (or index) and field, and nothing is queued."""
    raw, name, inline, top_k, per_example = await _body(request)
    total = await validate(raw, name, inline, engine, settings)
    owner, ns, ttl = _owner(request), settings.cache_namespace, settings.jobs_result_ttl_s
    job_id = uuid.uuid4().hex
    async with _redis(request) as redis:
        active = active_key(ns, owner)
        for other in await redis.smembers(active):  # forget finished or expired jobs still listed
            rec = await read_record(redis, ns, other.decode())
            if rec is None or rec["state"] not in ACTIVE:
                await redis.srem(active, other)
        if await redis.scard(active) >= settings.jobs_max_per_key:
            raise Problem(429, f"this key already has {settings.jobs_max_per_key} jobs queued or running "
                          "(STRIDE_JOBS_MAX_PER_KEY); retry when one ends", slug="too-many-jobs",
                          headers={"Retry-After": str(settings.jobs_retry_after_s)})
        now = time.time()
        async with redis.pipeline(transaction=True) as pipe:
            pipe.hset(record_key(ns, job_id), mapping={"owner": owner, "state": "queued", "done": 0, "total": total,
                                                       "created": now, "top_k": top_k})
            pipe.expire(record_key(ns, job_id), ttl)
            pipe.set(input_key(ns, job_id), raw, ex=ttl)
            pipe.sadd(active, job_id)
            await pipe.execute()
        await redis.enqueue_job(FUNCTION, job_id, top_k, per_example, _job_id=job_id)
        rec = await read_record(redis, ns, job_id)
    url = str(request.url_for("job_status", job_id=job_id).path)
    return JSONResponse(_status(job_id, rec or {}, ttl, request), status_code=202, headers={"Location": url})


def _status(job_id: str, rec: dict[str, str], ttl: int, request: Request) -> dict[str, Any]:
    def num(k: str) -> float | None:
        return float(rec[k]) if k in rec else None

    done = rec.get("state") == "complete"
    return {"job_id": job_id, "state": rec.get("state", "queued"),
            "progress": {"done": int(rec.get("done", 0)), "total": int(rec.get("total", 0))},
            "created": num("created") or 0.0, "started": num("started"), "finished": num("finished"),
            "cancel_requested": bool(rec.get("cancel")), "error": rec.get("error"),
            "store_version": rec.get("store_version"),
            "result": str(request.url_for("job_result", job_id=job_id).path) if done else None, "expires_in_s": ttl}


@router.get("/{job_id}", response_model=JobStatus, responses=_docs(401, 404, 503))
async def job_status(job_id: str, request: Request, settings: AppSettings) -> dict[str, Any]:
    """State and progress (queries done of total)."""
    async with _redis(request) as redis:
        rec = await _record(redis, request, job_id)
        ttl = await redis.ttl(record_key(settings.cache_namespace, job_id))
    return _status(job_id, rec, max(int(ttl), 0), request)


@router.get("/{job_id}/result", response_model=JobResult, responses=_docs(401, 404, 409, 422, 503))
async def job_result(job_id: str, request: Request, settings: AppSettings,
                     offset: int = Query(0, ge=0, description="First rank to return, from 0."),
                     limit: int = Query(100, ge=1, le=1000, description="Rows per page (top-N: offset 0, limit N).")
                     ) -> dict[str, Any]:
    """The ranked training examples (the scan's examples.jsonl rows, most positive aggregate first), paged."""
    async with _redis(request) as redis:
        rec = await _record(redis, request, job_id)
        if rec["state"] != "complete":
            yet = " yet" if rec["state"] in ACTIVE else ""
            raise Problem(409, f"job {job_id} is {rec['state']}: no result{yet}",
                          slug="job-not-complete", extra={"state": rec["state"]})
        raw = await redis.lrange(result_key(settings.cache_namespace, job_id), offset, offset + limit - 1)
    rows = int(rec.get("result_rows", 0))
    more = offset + limit < rows
    nxt = f"{request.url.path}?offset={offset + limit}&limit={limit}" if more else None
    return {"job_id": job_id, "examples": int(rec.get("examples", 0)), "rows": rows, "offset": offset,
            "items": [json.loads(r) for r in raw], "next": nxt}


@router.delete("/{job_id}", status_code=202, response_model=JobStatus, responses=_docs(401, 404, 503))
async def delete_job(job_id: str, request: Request, settings: AppSettings) -> dict[str, Any]:
    """Cancel and forget a job: a queued one never starts, a running one stops after the chunk in progress
    (``cancel_requested``), a finished one's result is dropped. The answer is the job's last status; from
    then on the job is a 404 for its key too."""
    from arq.constants import abort_jobs_ss
    from arq.utils import timestamp_ms

    ns, ttl = settings.cache_namespace, settings.jobs_result_ttl_s
    async with _redis(request) as redis:
        rec = await _record(redis, request, job_id)
        if await transition(redis, ns, job_id, ("queued",), "cancelled", ttl, cancel=1, finished=time.time()):
            await redis.srem(active_key(ns, rec["owner"]), job_id)
        else:  # running: the worker's progress hook reads the flag after the chunk in progress
            await transition(redis, ns, job_id, ("running",), "running", ttl, cancel=1)
        await redis.zadd(abort_jobs_ss, {job_id: timestamp_ms()})  # arq's abort: a queued job is never started
        rec = await _record(redis, request, job_id)
        # the record stays (hidden) until it expires: the worker still reports the scan's end in it
        async with redis.pipeline(transaction=True) as pipe:
            pipe.hset(record_key(ns, job_id), "deleted", 1)
            pipe.delete(result_key(ns, job_id), input_key(ns, job_id))
            await pipe.execute()
    return _status(job_id, rec, ttl, request)
