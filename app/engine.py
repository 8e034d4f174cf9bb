"""The service's core: cache -> single-flight -> micro-batcher -> ``Attributor.attribute_batch``."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

import stride
from app.batcher import MicroBatcher
from app.cache import Breaker, ResultCache, SingleFlight, cache_key
from app.context import arrival_var
from app.schemas import AttributeRequest
from app.settings import Settings
from stride.query import Attributor
from stride.result import Attribution, ModelRef, Query, StoreRef

log = logging.getLogger("stride.app")
# the cached answer's layout: bump when it changes, so a Redis shared with an older release never
# serves answers of the old shape (2: model name instead of path, tokens, scored_text, warnings)
PAYLOAD_FORMAT = 2


class Engine:
    def __init__(self, attributor: Attributor, settings: Settings):
        self.attributor, self.settings = attributor, settings
        manifest = attributor.store.manifest
        # a name and a digest identify the model; the server's filesystem layout is nobody's business
        self.model_ref = ModelRef(name=Path(manifest["model"]["path"]).name, sha256=manifest["model"]["sha256"])
        self.store_ref = StoreRef(version=attributor.store.version, num_examples=attributor.num_examples,
                                  num_subsets=int(manifest["shapes"]["num_subsets"]))
        self._refs = b'{"model":%s,"store":%s,' % (self.model_ref.model_dump_json().encode(),
                                                    self.store_ref.model_dump_json().encode())
        # everything besides the request that can change an answer
        self.fingerprint = {"model_sha256": self.model_ref.sha256, "store_version": self.store_ref.version,
                            "solver": attributor.solver.to_dict(), "code_version": stride.__version__,
                            "payload": PAYLOAD_FORMAT}
        self.threads = model_threads(settings.torch_threads, attributor.lm.device)
        init = None if self.threads is None else (lambda: torch.set_num_threads(self.threads))
        self.batcher = MicroBatcher(attributor.attribute_batch, max_batch=settings.batch_max_size,
                                    max_wait_ms=settings.batch_max_wait_ms, queue_max=settings.queue_max,
                                    initializer=init, max_queue_wait_s=settings.max_queue_wait_s)
        self.cache: ResultCache | None = None
        if settings.redis_url:
            self.cache = ResultCache(settings.redis_url, ttl_s=settings.cache_ttl_s,
                                     timeout_ms=settings.redis_timeout_ms, namespace=settings.cache_namespace,
                                     breaker=Breaker(settings.breaker_failures, settings.breaker_reset_s))
        self.flight = SingleFlight()
        self.warm = False
        self.leases = 0  # requests holding this engine: a reload stops it once they are done
        if attributor.window < int(attributor.store.config.max_length):
            log.warning("the store's max_length %d exceeds the model's %d positions: queries get %d tokens",
                        attributor.store.config.max_length, attributor.window, attributor.window)

    @contextlib.contextmanager
    def lease(self) -> Iterator[Engine]:
        self.leases += 1
        try:
            yield self
        finally:
            self.leases -= 1

    async def start(self) -> None:
        self.batcher.start()
        if self.cache is None:
            log.info("no STRIDE_REDIS_URL: result cache disabled")
        elif not await self.cache.ping():
            log.warning("redis does not answer at start-up; serving uncached until it does")
        if self.settings.warmup:
            await self.warm_up()
        self.warm = True

    async def warm_up(self) -> None:
        """Real queries through the same thread and code path: one so the first user pays no
        compile/alloc (not measured), then one and a quarter batch (the smallest "large" batch), which
        give the load shedding its batch-time estimate at both ends (app.batcher.BatchCost). A quarter
        batch, not a full one: the cost is a line, and every app start and reload pays the warm-up."""
        ids = self.attributor.lm.tokenizer(self.attributor.example(0).text)["input_ids"]
        ids = (ids * 2)[: max(2, min(len(ids), self.attributor.window))]  # fits the window, two tokens at least
        await self.batcher.run_now([Query(prompt_ids=ids)], 1, False)
        short = Query(prompt_ids=ids[:16])  # a question-sized query: a full window would overcharge them
        for n in (1, self.batcher.cost.large):
            await self.batcher.run_now([short] * n, 1, False)

    async def stop(self) -> None:
        await self.batcher.stop()
        if self.cache is not None:
            await self.cache.close()

    def payload(self, a: Attribution) -> bytes:
        """The answer as JSON bytes (without request id and ``cached``): encoded once, cached as is,
        spliced into the response."""
        return self._refs + a.model_dump_json(by_alias=True).encode()[1:]

    def check(self, query: Query) -> None:
        """Tokenise and check a query before it joins a batch: a QueryError answers at once instead
        of breaking a batch into one-by-one calls. Microseconds to a millisecond: tokenisation only."""
        self.attributor.prepare(query)

    async def attribute(self, req: AttributeRequest, timeout: float) -> tuple[bytes, bool]:
        """(payload JSON without request id, cached). Raises the batcher's errors and QueryError."""
        loop = asyncio.get_running_loop()
        arrived = arrival_var.get() or loop.time()
        deadline = arrived + timeout  # from the request's arrival
        key = cache_key(self.settings.cache_namespace, req.normalised(), self.fingerprint)
        if self.cache is not None:
            hit = await self.cache.get(key)
            if hit is not None:
                return hit, True

        async def compute() -> bytes:
            now = loop.time()
            a = await self.batcher.submit(req.query(), req.top_k, req.include_text, max(deadline - now, 1e-3),
                                          waited=now - arrived)
            value = self.payload(a)
            if self.cache is not None:
                await self.cache.set(key, value)
            return value

        value, _joined = await self.flight.do(key, compute)
        return value, False


def dumps(obj: Any) -> bytes:
    """Compact JSON, as FastAPI's JSONResponse writes it (NaN refused)."""
    return json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()


def model_threads(setting: int, device: torch.device) -> int | None:
    """Intra-op threads for the model thread: the setting on CPU; None (leave torch's own) otherwise.

    Not one core less for the event loop: measured side by side on the shared 2-core CPU, the loop
    costs 1-3 ms per request to the model's 4-14, and one model thread halved the served rate."""
    if device.type != "cpu" or not setting:
        return None
    return setting
