"""Micro-batching: concurrent queries share one forward pass, one measurement and one Lasso solve.

A single worker task drains a bounded queue: up to ``max_batch`` queries go to
``Attributor.attribute_batch`` on a one-thread executor (the event loop keeps answering ``/healthz``
meanwhile), and queries that arrive during a batch form the next one. The first query waits at most
``max_wait_ms`` for company, and only while the batch holds fewer queries than were in flight at once
since the last batch started (clients just answered are likely to come back): a lone client never
waits, a crowd fills its batches.

Overload is refused early rather than served late: a query is shed at once (503 + Retry-After) when
the queue is full, or when the time it has already waited since its request arrived (the event
loop's own backlog: parsing, validation and tokenisation of the requests ahead of it) plus the model
work ahead of it (the rest of the running batch and the queued queries, at the measured batch cost,
``BatchCost``) is over ``max_queue_wait_s``, or would not leave its own batch time before its
deadline. Most refusals happen earlier, at the door (``app.middleware.Admission``), with the same
allowance and before the body is read. With nothing ahead a query is never shed, so a stale or inflated estimate
cannot lock the service out (a first batch that compiled the solver used to make every later
request look 40 s late, and none ran to correct it). A query whose deadline (counted from the
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
    """The queue is full or too slow; the client should retry later, when the ``ahead_s`` seconds of
    model work ahead of it are done."""

    def __init__(self, message: str, ahead_s: float = 0.0):
        super().__init__(message)
        self.ahead_s = ahead_s


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


class BatchCost:
    """Model seconds of a batch of n queries, about ``fixed + n * per_query``: moving averages of small
    batches' (1-2 queries) and large batches' (a quarter of the largest or more) measured times, the
    line through them giving both terms. The warm-up measures both ends, so a burst after a calm
    spell is not charged as lone queries (measured on the demo: 1 query 15-30 ms, 32 queries 250-300 ms,
    so per-query charging at the lone rate shed a third of a 32-query burst). With one end known,
    every query is charged that end's time per query (conservative); with none, nothing."""

    def __init__(self, max_batch: int):
        self.max_batch, self.large = max_batch, max(3, max_batch // 4)
        self.small: tuple[float, float] | None = None  # (mean queries, mean seconds) of small batches
        self.big: tuple[float, float] | None = None  # the same of large ones
        self._first = True  # the first computation is not measured (see observe)

    def observe(self, seconds: float, n: int) -> None:
        """One batch's time; never the model thread's first computation (the warm-up, or the first
        batch without one), which pays the solver's compilation and first allocations: tens of times
        a batch's time, and an estimate that made every deadline look missed."""
        if self._first:
            self._first = False
            return
        if n <= 2:
            self.small = _ewma(self.small, (n, seconds))
        elif n >= self.large:
            self.big = _ewma(self.big, (n, seconds))

    def terms(self) -> tuple[float, float] | None:
        """(fixed, per_query) seconds, or None before any measurement."""
        if self.small and self.big and self.big[0] > self.small[0]:
            per = max(0.0, (self.big[1] - self.small[1]) / (self.big[0] - self.small[0]))
            return max(0.0, self.small[1] - per * self.small[0]), per
        end = self.small or self.big
        return None if end is None else (0.0, end[1] / end[0])

    def seconds(self, k: int) -> float:
        """Model seconds for ``k`` queries in full batches (0 before any measurement)."""
        terms = self.terms()
        if terms is None or k <= 0:
            return 0.0
        return math.ceil(k / self.max_batch) * terms[0] + k * terms[1]


def _ewma(old: tuple[float, float] | None, new: tuple[float, float]) -> tuple[float, float]:
    return new if old is None else (0.8 * old[0] + 0.2 * new[0], 0.8 * old[1] + 0.2 * new[1])


class MicroBatcher:
    def __init__(self, run: RunBatch, *, max_batch: int, max_wait_ms: float, queue_max: int,
                 initializer: Callable[[], object] | None = None, max_queue_wait_s: float = math.inf):
        self._run = run
        self.max_batch, self.max_wait, self.max_queue_wait = max_batch, max_wait_ms / 1e3, max_queue_wait_s
        self.cost = BatchCost(max_batch)
        self._busy = 0  # queries in the batch on the model thread (0: idle)
        self._started = 0.0  # loop time that batch started
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
        """Bypass the queue (warm-up); still off the event loop, on the model thread."""
        loop = asyncio.get_running_loop()
        t0 = time.perf_counter()
        out = await loop.run_in_executor(self._executor, self._run, queries, top_k, include_text)
        self.cost.observe(time.perf_counter() - t0, len(queries))
        return out

    def work_ahead(self) -> float:
        """Seconds of model work ahead of a query submitted now: the rest of the running batch and the
        queued queries (0 until a batch has been measured)."""
        ahead = self.cost.seconds(self._queue.qsize())
        if self._busy:
            running = self.cost.seconds(self._busy) - (asyncio.get_running_loop().time() - self._started)
            ahead += max(0.0, running)
        return ahead

    def admit(self, waited: float, timeout: float) -> None:
        """Raise Overloaded unless a query that has waited ``waited`` s since its arrival and has
        ``timeout`` s left to its deadline may join the queue: it is refused when model work is
        ahead of it and that work plus ``waited`` is over ``max_queue_wait_s``, or that work plus its
        own batch would pass its deadline. With nothing ahead it is always admitted."""
        ahead = self.work_ahead()
        if ahead <= 0:
            return
        own = self.cost.seconds(min(self._queue.qsize() + 1, self.max_batch))  # its own batch's time
        if ahead + waited > self.max_queue_wait or ahead + own > timeout:
            metrics.REJECTED.labels("shed").inc()
            raise Overloaded(f"the queries ahead would take about {ahead:.2f} s after {waited:.2f} s waited; "
                             f"{self.max_queue_wait:.2f} s allowed and {timeout:.2f} s to the deadline", ahead)

    async def submit(self, query: Query, top_k: int, include_text: bool, timeout: float,
                     waited: float = 0.0) -> Attribution:
        """``timeout``: seconds left to the request's deadline; ``waited``: seconds since it arrived."""
        loop = asyncio.get_running_loop()
        if self._task is None or self._task.done():
            raise Stopped("the batcher is not running")
        self.admit(waited, timeout)
        job = Job(query, top_k, include_text, loop.time() + timeout, loop.create_future())
        try:
            self._queue.put_nowait(job)
        except asyncio.QueueFull:
            metrics.REJECTED.labels("queue_full").inc()
            raise Overloaded(f"{self._queue.maxsize} queries are already waiting", self.work_ahead()) from None
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
            self._busy, self._started = len(live), loop.time()
            try:
                results = await loop.run_in_executor(self._executor, self._compute, [j.query for j in live],
                                                     top_k, text)
            except Exception as e:  # the engine itself failed: every query in the batch fails
                log.exception("batch failed", extra={"batch_size": len(live)})
                results = [e] * len(live)
            finally:
                self._busy = 0
            elapsed = time.perf_counter() - t0
            self.cost.observe(elapsed, len(live))
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
        finish = now + self.cost.seconds(len(batch))
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
