"""Micro-batching: concurrent queries share one forward pass, one measurement and one Lasso solve.

A single worker task drains a bounded queue: up to ``max_batch`` queries go to
``Attributor.attribute_batch`` on a one-thread executor (the event loop keeps answering ``/healthz``
meanwhile), and queries that arrive during a batch form the next one. The first query waits at most
``max_wait_ms`` for company, and only while the batch holds fewer queries than were in flight at once
since the last batch started (clients just answered are likely to come back): a lone client never
waits, a crowd fills its batches.

Overload is refused early rather than served late: a query is shed at once (503 + Retry-After) when
the queue is full or when the batches ahead of it are predicted (from recent batch times) to take
longer than ``max_queue_wait_s`` or than its own deadline; a query whose deadline (counted from the
request's arrival) passes, or would pass before its batch could finish, is dropped before any model
work is spent on it (504).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from app import metrics
from stride.result import Attribution, Query, QueryError

log = logging.getLogger("stride.app")
RunBatch = Callable[[list[Query], int, bool], list[Attribution]]


class Overloaded(Exception):
    """The queue is full; the client should retry later."""


class DeadlineExceeded(Exception):
    """The query was not answered before its deadline."""


class Stopped(Exception):
    """The service is shutting down."""


@dataclass(eq=False)
class Job:
    query: Query
    top_k: int
    include_text: bool
    deadline: float  # loop.time()
    future: asyncio.Future[Attribution]
    abandoned: bool = field(default=False)


class MicroBatcher:
    def __init__(self, run: RunBatch, *, max_batch: int, max_wait_ms: float, queue_max: int,
                 initializer: Callable[[], object] | None = None, max_queue_wait_s: float = math.inf):
        self._run = run
        self.max_batch, self.max_wait, self.max_queue_wait = max_batch, max_wait_ms / 1e3, max_queue_wait_s
        self.batch_s: float | None = None  # moving average of a batch's model time; None until one ran
        self._busy = False  # a batch is on the model thread
        self._inflight = 0  # submitted, not yet answered
        self._peak = 0  # most in flight at once since the last batch started: what the next one waits for
        self._queue: asyncio.Queue[Job] = asyncio.Queue(maxsize=queue_max)
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="stride-model",
                                            initializer=initializer)
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="stride-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        while not self._queue.empty():
            job = self._queue.get_nowait()
            if not job.future.done():
                job.future.set_exception(Stopped("the service is shutting down"))
        self._executor.shutdown(wait=True)

    async def run_now(self, queries: list[Query], top_k: int, include_text: bool) -> list[Attribution]:
        """Bypass the queue (warm-up); still off the event loop, on the model thread. Its time seeds
        the batch-time average the shedding predicts with."""
        loop = asyncio.get_running_loop()
        t0 = time.perf_counter()
        out = await loop.run_in_executor(self._executor, self._run, queries, top_k, include_text)
        self._observe(time.perf_counter() - t0)
        return out

    def _observe(self, seconds: float) -> None:
        self.batch_s = seconds if self.batch_s is None else 0.8 * self.batch_s + 0.2 * seconds

    def predicted_wait(self) -> float:
        """Seconds until a query submitted now would be answered: the batches queued ahead of it, its
        own, and the one running (0 until a batch time has been measured)."""
        if self.batch_s is None:
            return 0.0
        return (math.ceil((self._queue.qsize() + 1) / self.max_batch) + self._busy) * self.batch_s

    async def submit(self, query: Query, top_k: int, include_text: bool, timeout: float) -> Attribution:
        loop = asyncio.get_running_loop()
        if self._task is None or self._task.done():
            raise Stopped("the batcher is not running")
        wait = self.predicted_wait()
        if wait > min(self.max_queue_wait, timeout):
            metrics.REJECTED.labels("shed").inc()
            raise Overloaded(f"the queries ahead would take about {wait:.2f} s, over the "
                             f"{min(self.max_queue_wait, timeout):.2f} s allowed") from None
        job = Job(query, top_k, include_text, loop.time() + timeout, loop.create_future())
        try:
            self._queue.put_nowait(job)
        except asyncio.QueueFull:
            metrics.REJECTED.labels("queue_full").inc()
            raise Overloaded(f"{self._queue.maxsize} queries are already waiting") from None
        metrics.QUEUE_DEPTH.set(self._queue.qsize())
        self._inflight += 1
        self._peak = max(self._peak, self._inflight)
        self._wakeup.set()
        try:
            return await asyncio.wait_for(asyncio.shield(job.future), timeout)
        except TimeoutError:
            job.abandoned = True
            metrics.REJECTED.labels("deadline").inc()
            raise DeadlineExceeded(f"no answer within {timeout:g} s") from None
        finally:
            self._inflight -= 1

    async def _collect(self) -> list[Job]:
        batch = [await self._queue.get()]
        loop = asyncio.get_running_loop()
        end = loop.time() + self.max_wait
        want = min(self.max_batch, max(1, self._peak))
        while len(batch) < self.max_batch:
            while len(batch) < self.max_batch and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            remaining = end - loop.time()
            if len(batch) >= want or remaining <= 0:
                break
            self._wakeup.clear()
            try:  # an Event wait is safe to time out; a Queue.get might lose an item
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except TimeoutError:
                pass
        metrics.QUEUE_DEPTH.set(self._queue.qsize())
        self._peak = self._inflight
        return batch

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._collect()
            live = self._drop_late(batch, loop.time())
            if not live:
                continue
            top_k = max(j.top_k for j in live)
            text = any(j.include_text for j in live)
            t0 = time.perf_counter()
            self._busy = True
            try:
                results = await loop.run_in_executor(self._executor, self._compute, [j.query for j in live],
                                                     top_k, text)
            except Exception as e:  # the engine itself failed: every query in the batch fails
                log.exception("batch failed", extra={"batch_size": len(live)})
                results = [e] * len(live)
            finally:
                self._busy = False
            elapsed = time.perf_counter() - t0
            self._observe(elapsed)
            metrics.BATCH_SIZE.observe(len(live))
            metrics.BATCH_SECONDS.observe(elapsed)
            for job, res in zip(live, results, strict=True):
                if job.future.done() or job.abandoned:
                    continue
                if isinstance(res, Exception):
                    job.future.set_exception(res)
                else:
                    job.future.set_result(_trim(res, job.top_k, job.include_text))

    def _drop_late(self, batch: list[Job], now: float) -> list[Job]:
        """The jobs still worth computing: not abandoned, and able to finish before their deadline
        at the current batch time. The others are answered 504 now, before any model work."""
        finish = now + (self.batch_s or 0.0)
        live = []
        for j in batch:
            if j.abandoned or j.future.done():
                continue
            if j.deadline <= finish:
                metrics.REJECTED.labels("expired").inc()
                j.future.set_exception(DeadlineExceeded(
                    "the deadline passes before this query could be computed; it was dropped unanswered"))
                continue
            live.append(j)
        return live

    def _compute(self, queries: list[Query], top_k: int, text: bool) -> list[Attribution | Exception]:
        """One batched call; if one query is unanswerable (QueryError), answer the rest one by one."""
        try:
            out: list[Attribution | Exception] = list(self._run(queries, top_k, text))
        except QueryError as e:
            if len(queries) == 1:
                return [e]
            out = []
            for q in queries:
                try:
                    out.append(self._run([q], top_k, text)[0])
                except QueryError as e1:
                    out.append(e1)
        for a in out:
            if isinstance(a, Attribution):
                metrics.SOLVER_ITERATIONS.observe(a.diagnostics.iterations)
                break
        return out


def _trim(a: Attribution, top_k: int, include_text: bool) -> Attribution:
    """Fit a result computed for the batch's largest top_k (and text) to one query's request."""
    def cut(rows: list) -> list:
        rows = rows[:top_k]
        return rows if include_text else [r.model_copy(update={"text": None}) for r in rows]

    return a.model_copy(update={"proponents": cut(a.proponents), "opponents": cut(a.opponents)})
