"""Pure-ASGI middleware: request ids + access log + metrics, in-flight limit, body size and read
timeout, API-key auth.

Pure ASGI (not ``BaseHTTPMiddleware``) so streaming, cancellation and contextvars behave, and so
errors raised here are problem documents carrying the request id like any other.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
import time
import uuid
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app import metrics
from app.batcher import Overloaded
from app.context import arrival_var, request_id_var
from app.errors import problem_body, problem_for

log = logging.getLogger("stride.app.access")
_SAFE_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
# /docs and /redoc under the same rule: open, like the /openapi.json they render
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json", "/ui"})
# the dashboard's static files (app/ui.py serves only the names it ships): the page asks for the key;
# the docs pages' scripts and styles (app/docs.py)
OPEN_PREFIXES = ("/ui/", "/docs/static/")
# never shed by the in-flight limit: an orchestrator must see the probes and metrics under overload
UNLIMITED_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})


def is_open(path: str, open_paths: frozenset[str] = OPEN_PATHS) -> bool:
    """Whether ``path`` is served without a key (the OpenAPI security declaration uses the same rule)."""
    return path in open_paths or path.startswith(OPEN_PREFIXES)


async def send_problem(send: Send, status: int, detail: str, path: str,
                       headers: dict[str, str] | None = None, slug: str | None = None) -> None:
    body = json.dumps(problem_body(status, detail, path, slug)).encode()
    raw = [(b"content-type", b"application/problem+json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


def _header(scope: Scope, name: bytes) -> str | None:
    for k, v in scope.get("headers", ()):
        if k == name:
            return v.decode("latin-1")
    return None


class RequestContext:
    """Echo a sane ``X-Request-ID`` or make one; time, count and log every request; 500 on a bug."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = _header(scope, b"x-request-id")
        rid = given if given and _SAFE_ID.match(given) else uuid.uuid4().hex
        token = request_id_var.set(rid)
        arrived = arrival_var.set(asyncio.get_running_loop().time())  # the deadline counts from here
        status, started = 500, False
        t0 = time.perf_counter()

        async def send_wrapper(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                started, status = True, message["status"]
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", rid.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        except Exception:
            log.exception("unhandled error", extra={"request_id": rid})
            if not started:
                await send_problem(send_wrapper, 500, "internal error; quote the request id when reporting it",
                                   scope["path"])
        finally:
            elapsed = time.perf_counter() - t0
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            metrics.REQUESTS.labels(scope["method"], route, str(status)).inc()
            metrics.LATENCY.labels(scope["method"], route).observe(elapsed)
            log.info("request", extra={"request_id": rid, "method": scope["method"], "route": route,
                                       "status": status, "duration_ms": round(elapsed * 1e3, 2)})
            request_id_var.reset(token)
            arrival_var.reset(arrived)


class InflightLimit:
    """503 + Retry-After for a request beyond ``max_inflight`` in progress: a bound on the memory and
    event-loop time that a flood of connections can take, before any body is read. Probes and
    /metrics are never refused (an orchestrator must see an overloaded pod as alive)."""

    def __init__(self, app: ASGIApp, max_inflight: int, retry_after_s: int):
        self.app, self.max_inflight, self.retry_after = app, max_inflight, str(retry_after_s)
        self.inflight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in UNLIMITED_PATHS:
            await self.app(scope, receive, send)
            return
        if self.inflight >= self.max_inflight:
            metrics.REJECTED.labels("inflight").inc()
            await send_problem(send, 503, f"overloaded: {self.max_inflight} requests are already in progress",
                               scope["path"], {"Retry-After": self.retry_after})
            return
        self.inflight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.inflight -= 1


class LoopLag:
    """How late the event loop runs a timer due every ``every`` s: the time a request arriving now
    waits behind the work already on the loop. Read live (a tick overdue counts from its due time),
    so it can never stay high once the loop has drained."""

    def __init__(self, every: float = 0.02):
        self.every, self.lag, self._due = every, 0.0, 0.0
        self._loop: asyncio.AbstractEventLoop | None = None

    def now(self) -> float:
        loop = asyncio.get_running_loop()
        if loop is not self._loop:  # first call, or an app served again on another loop (tests do)
            self._loop, self.lag, self._due = loop, 0.0, loop.time() + self.every
            loop.call_at(self._due, self._tick, loop)
        return max(self.lag, loop.time() - self._due)

    def _tick(self, loop: asyncio.AbstractEventLoop) -> None:
        if loop is not self._loop:
            return  # a stale chain from a loop no longer served
        self.lag = max(0.0, loop.time() - self._due)
        self._due = loop.time() + self.every
        loop.call_at(self._due, self._tick, loop)


class Admission:
    """503 + Retry-After for a request to ``paths`` (the ones that wait for the model) when the event
    loop's backlog plus the model work of the requests already admitted (at the batcher's measured
    batch cost) is over ``max_queue_wait_s``, decided before the body is read.

    Measured at 512 clients (bench/results/load.md): refused only at the batcher, after parsing,
    validation, tokenisation and a Redis lookup, a shed request cost the event loop about as much
    as an answer (refusals took 0.4-0.8 s, p50) and the answered rate fell from 107 to 31-55 req/s.
    Counting requests from the door, not from the batcher's queue, matters: a burst all passes a
    door that only looks at the queue before any of it reaches the queue. A cached answer is refused
    too while this holds: telling it apart needs the body."""

    def __init__(self, app: ASGIApp, paths: frozenset[str], retry_after_s: int):
        self.app, self.paths, self.retry_after = app, paths, retry_after_s
        self.lag = LoopLag()
        self.admitted = 0  # past the door, not yet answered

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        engine = getattr(scope["app"].state, "engine", None) if scope["type"] == "http" else None
        if engine is None or scope["path"] not in self.paths or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        batcher = engine.batcher
        lag, ahead = self.lag.now(), batcher.cost.seconds(self.admitted)
        if lag + ahead > batcher.max_queue_wait:
            metrics.REJECTED.labels("door").inc()
            p = problem_for(Overloaded(f"the requests ahead would take about {lag + ahead:.2f} s "
                                       f"({self.admitted} admitted, the event loop {lag:.2f} s behind); "
                                       f"{batcher.max_queue_wait:.2f} s allowed", lag + ahead), self.retry_after)
            await send_problem(send, p.status, p.detail, scope["path"], p.headers, p.slug)
            return
        self.admitted += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.admitted -= 1


class BodyLimit:
    """413 for a body over ``max_bytes``, declared or streamed, and 408 for one not received within
    ``timeout_s`` (a body shorter than its Content-Length used to hold its connection open for
    good), both before any handler runs: the whole body is read here, then replayed to the app."""

    def __init__(self, app: ASGIApp, max_bytes: int, timeout_s: float = 10.0):
        self.app, self.max_bytes, self.timeout = app, max_bytes, timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        detail = f"request body over {self.max_bytes} bytes"
        declared = _header(scope, b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await send_problem(send, 413, detail, scope["path"])
            return
        chunks: list[bytes] = []
        size, more = 0, True
        deadline = asyncio.get_running_loop().time() + self.timeout
        while more:
            try:
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                # Connection: close, so the server drops the rest of a body that may never come
                await send_problem(send, 408, f"the request body was not received within {self.timeout:g} s "
                                   f"({size} bytes arrived{'' if declared is None else ' of ' + declared})",
                                   scope["path"], {"Connection": "close"})
                return
            if message["type"] == "http.disconnect":
                return  # the client left: nobody to answer
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await send_problem(send, 413, detail, scope["path"])
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
        replay: list[Message] = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replay_receive() -> Message:
            return replay.pop() if replay else await receive()

        await self.app(scope, replay_receive, send)


class ApiKeyAuth:
    """``Authorization: Bearer KEY`` or ``X-API-Key: KEY`` against every configured key, constant time."""

    def __init__(self, app: ASGIApp, keys: list[str], open_paths: frozenset[str] = OPEN_PATHS):
        self.app = app
        self.keys = [k.encode() for k in keys]
        self.open_paths = open_paths

    def _ok(self, given: str | None) -> bool:
        if given is None:
            return False
        g = given.encode()
        ok = False
        for k in self.keys:  # no early exit: time does not depend on which key matched
            ok |= hmac.compare_digest(g, k)
        return ok

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.keys or is_open(scope["path"], self.open_paths):
            await self.app(scope, receive, send)
            return
        given = _header(scope, b"x-api-key")
        auth = _header(scope, b"authorization")
        if given is None and auth and auth[:7].lower() == "bearer ":
            given = auth[7:].strip()
        if not self._ok(given):
            await send_problem(send, 401, "missing or invalid API key", scope["path"],
                               {"WWW-Authenticate": 'Bearer realm="stride"'})
            return
        scope.setdefault("state", {})["api_key"] = given  # whose request: background jobs belong to a key
        await self.app(scope, receive, send)


class JsonFormatter(logging.Formatter):
    """One JSON object per line. Only fields passed explicitly via ``extra`` are added."""

    converter = time.gmtime
    FIELDS = ("request_id", "method", "route", "status", "duration_ms", "batch_size", "cached",
              "prompt_chars", "prompt", "path", "store", "device", "event")

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname, "logger": record.name, "msg": record.getMessage(),
        }
        if out["msg"] != "request" and request_id_var.get() and not hasattr(record, "request_id"):
            out["request_id"] = request_id_var.get()
        for f in self.FIELDS:
            if hasattr(record, f):
                out[f] = getattr(record, f)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)
