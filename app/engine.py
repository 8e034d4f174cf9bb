"""The service's core: cache -> single-flight -> micro-batcher -> ``Attributor.attribute_batch``."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import torch

import stride
from app.batcher import MicroBatcher
from app.cache import Breaker, ResultCache, SingleFlight, cache_key
from app.schemas import AttributeRequest
from app.settings import Settings
from stride.config import Attribution, Query, Scored
from stride.query import Attributor

log = logging.getLogger("stride.app")
DIAGNOSTICS = ("nonzeros", "iterations", "gap", "converged", "lambda", "intercept")


class Engine:
    def __init__(self, attributor: Attributor, settings: Settings):
        self.attributor, self.settings = attributor, settings
        manifest = attributor.store.manifest
        self.model_ref = {"path": manifest["model"]["path"], "sha256": manifest["model"]["sha256"]}
        self.store_ref = {"version": attributor.store.version, "num_examples": attributor.num_examples,
                          "num_subsets": int(manifest["shapes"]["num_subsets"])}
        # everything besides the request that can change an answer
        self.fingerprint = {"model_sha256": self.model_ref["sha256"], "store_version": self.store_ref["version"],
                            "solver": attributor.solver.to_dict(), "code_version": stride.__version__}
        self.threads = model_threads(settings.torch_threads, attributor.lm.device)
        init = None if self.threads is None else (lambda: torch.set_num_threads(self.threads))
        self.batcher = MicroBatcher(attributor.attribute_batch, max_batch=settings.batch_max_size,
                                    max_wait_ms=settings.batch_max_wait_ms, queue_max=settings.queue_max,
                                    initializer=init)
        self.cache: ResultCache | None = None
        if settings.redis_url:
            self.cache = ResultCache(settings.redis_url, ttl_s=settings.cache_ttl_s,
                                     timeout_ms=settings.redis_timeout_ms, namespace=settings.cache_namespace,
                                     breaker=Breaker(settings.breaker_failures, settings.breaker_reset_s))
        self.flight = SingleFlight()
        self.warm = False
        self._clamp_context(attributor)

    @staticmethod
    def _clamp_context(attributor: Attributor) -> None:
        """Keep queries inside the model's position window (stride truncates to the store's
        max_length, which can exceed it: the demo model has 64 positions, the store 256). Past it
        the forward pass fails, on CUDA with a device-side assert that poisons the whole process."""
        cfg = attributor.lm.model.config
        window = getattr(cfg, "n_positions", None) or getattr(cfg, "max_position_embeddings", None)
        if window and attributor.lm.max_length > int(window):
            log.warning("store max_length %d exceeds the model's %d positions; truncating queries to %d",
                        attributor.lm.max_length, window, window)
            attributor.lm.max_length = int(window)

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
        """One real query through the same thread and code path, so the first user pays no compile/alloc."""
        ex = self.attributor.example(0)
        await self.batcher.run_now([Query(ex.text[:200])], 1, False)

    async def stop(self) -> None:
        await self.batcher.stop()
        if self.cache is not None:
            await self.cache.close()

    def payload(self, a: Attribution) -> bytes:
        """The answer as JSON bytes (without request id and ``cached``): encoded once, cached as is,
        spliced into the response. Built field by field: ``dataclasses.asdict`` deep-copies."""
        d = a.diagnostics
        return dumps({
            "model": self.model_ref, "store": self.store_ref, "loss": a.loss,
            "proponents": _rows(a.proponents), "opponents": _rows(a.opponents),
            "diagnostics": {k: d[k] for k in DIAGNOSTICS if k in d}, "timing_ms": a.timing_ms,
        })

    async def attribute(self, req: AttributeRequest, timeout: float) -> tuple[bytes, bool]:
        """(payload JSON without request id, cached). Raises the batcher's errors and ValueError."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        key = cache_key(self.settings.cache_namespace, req.normalised(), self.fingerprint)
        if self.cache is not None:
            hit = await self.cache.get(key)
            if hit is not None:
                return hit, True

        async def compute() -> bytes:
            query = Query(req.prompt, req.completion or None)
            a = await self.batcher.submit(query, req.top_k, req.include_text, max(deadline - loop.time(), 1e-3))
            value = self.payload(a)
            if self.cache is not None:
                await self.cache.set(key, value)
            return value

        value, _joined = await self.flight.do(key, compute)
        return value, False


def dumps(obj: Any) -> bytes:
    """Compact JSON, as FastAPI's JSONResponse writes it (NaN refused)."""
    return json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()


def _rows(rows: list[Scored]) -> list[dict[str, Any]]:
    return [{"rank": r.rank, "index": r.index, "id": r.id, "score": r.score, "text": r.text} for r in rows]


def model_threads(setting: int, device: torch.device) -> int | None:
    """Intra-op threads for the model thread: the setting on CPU; None (leave torch's own) otherwise.

    Not one core less for the event loop: measured side by side on the shared 2-core CPU, the loop
    costs 1-3 ms per request to the model's 4-14, and one model thread halved the served rate."""
    if device.type != "cpu" or not setting:
        return None
    return setting
