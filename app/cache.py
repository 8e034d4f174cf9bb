"""Redis result cache with a circuit breaker, and in-process single-flight.

The cache is an optimisation, never a dependency: every Redis call has a hard time budget, any
failure counts as a miss, and after ``failures`` consecutive failures the breaker skips Redis for
``reset_s`` seconds so a dead Redis costs no latency at all. One probe call then decides.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from redis.retry import Retry

from app import metrics

log = logging.getLogger("stride.app")
T = TypeVar("T")


def cache_key(namespace: str, request: dict[str, Any], fingerprint: dict[str, Any]) -> str:
    """sha256 of the normalised request and everything that can change an answer."""
    blob = json.dumps({"request": request, "fingerprint": fingerprint}, sort_keys=True, separators=(",", ":"),
                      ensure_ascii=False)
    return f"{namespace}:attr:{hashlib.sha256(blob.encode()).hexdigest()}"


class Breaker:
    """Closed -> open after ``failures`` consecutive errors; after ``reset_s``, one probe is let through."""

    def __init__(self, failures: int, reset_s: float, clock: Callable[[], float] = time.monotonic):
        self.failures, self.reset_s, self.clock = failures, reset_s, clock
        self._count, self._opened_at = 0, 0.0

    @property
    def open(self) -> bool:
        return self._count >= self.failures

    def allow(self) -> bool:
        if not self.open:
            return True
        if self.clock() - self._opened_at >= self.reset_s:
            self._opened_at = self.clock()  # half-open: this caller probes, the others keep skipping
            return True
        return False

    def success(self) -> None:
        if self.open:
            log.info("redis is back; cache breaker closed")
        self._count = 0
        metrics.BREAKER_OPEN.set(0)

    def failure(self, error: BaseException) -> None:
        self._count += 1
        if self._count == self.failures:
            self._opened_at = self.clock()
            metrics.BREAKER_OPEN.set(1)
            log.warning("redis failing (%s: %s); cache breaker open for %.0f s",
                        type(error).__name__, error, self.reset_s)


class ResultCache:
    def __init__(self, url: str, *, ttl_s: int, timeout_ms: int, breaker: Breaker, namespace: str = "stride"):
        self.ttl_s, self.timeout, self.breaker, self.namespace = ttl_s, timeout_ms / 1e3, breaker, namespace
        self._redis = aioredis.Redis.from_url(
            url, socket_timeout=self.timeout, socket_connect_timeout=self.timeout,
            retry=Retry(NoBackoff(), 0), health_check_interval=0,
        )

    async def _call(self, op: Awaitable[T]) -> T:
        return await asyncio.wait_for(op, self.timeout)

    async def get(self, key: str) -> bytes | None:
        """The cached JSON object, as stored (checked to parse, returned unparsed)."""
        if not self.breaker.allow():
            metrics.CACHE.labels("skipped").inc()
            return None
        try:
            raw = await self._call(self._redis.get(key))
        except (RedisError, OSError, TimeoutError) as e:
            self.breaker.failure(e)
            metrics.CACHE.labels("error").inc()
            return None
        self.breaker.success()
        if raw is None:
            metrics.CACHE.labels("miss").inc()
            return None
        try:
            if not isinstance(json.loads(raw), dict):
                raise ValueError("not a JSON object")
        except ValueError:
            metrics.CACHE.labels("error").inc()
            return None
        metrics.CACHE.labels("hit").inc()
        return bytes(raw)

    async def set(self, key: str, value: bytes) -> None:
        """``value``: a JSON object, encoded."""
        if not self.breaker.allow():
            return
        try:
            await self._call(self._redis.set(key, value, ex=self.ttl_s))
        except (RedisError, OSError, TimeoutError) as e:
            self.breaker.failure(e)
            metrics.CACHE_WRITES.labels("error").inc()
            return
        self.breaker.success()
        metrics.CACHE_WRITES.labels("ok").inc()

    async def ping(self) -> bool:
        try:
            return bool(await self._call(self._redis.ping()))
        except (RedisError, OSError, TimeoutError):
            return False

    async def status(self) -> str:
        """What readiness reports: ``ok`` only when Redis answers a ping now (within the call budget),
        ``unreachable`` when it does not, ``breaker-open`` while Redis is being skipped."""
        if self.breaker.open:
            return "breaker-open"
        return "ok" if await self.ping() else "unreachable"

    async def close(self) -> None:
        try:
            await self._redis.aclose()
        except (RedisError, OSError):
            pass


class SingleFlight:
    """Identical concurrent requests share one computation (per process)."""

    def __init__(self) -> None:
        self._inflight: dict[str, asyncio.Future[Any]] = {}

    async def do(self, key: str, fn: Callable[[], Awaitable[T]]) -> tuple[T, bool]:
        """Returns (value, joined): joined is True when another request computed it."""
        fut = self._inflight.get(key)
        if fut is not None:
            metrics.SINGLE_FLIGHT.inc()
            return await asyncio.shield(fut), True
        fut = asyncio.get_running_loop().create_future()
        fut.add_done_callback(lambda f: f.cancelled() or f.exception())  # mark the error retrieved
        self._inflight[key] = fut
        try:
            value = await fn()
        except BaseException as e:
            if isinstance(e, asyncio.CancelledError):
                fut.cancel()
            else:
                fut.set_exception(e)
            raise
        finally:
            self._inflight.pop(key, None)
        fut.set_result(value)
        return value, False
