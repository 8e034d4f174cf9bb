"""Hot reload: a new store version loaded beside the served one, warmed, then swapped in atomically.

The swap is one assignment (``app.state.engine``) on the event loop: a request that already holds
the old engine (``Engine.lease``, taken by the ``ready_engine`` dependency) finishes on it, every
later request gets the new one, and the old engine stops once no request holds it. A store that
fails verification (a file's sha256, the model's weights, shapes) or its warm-up query is refused:
the old one keeps serving, and the refusal is logged and counted (``stride_store_reloads_total``).

Triggers: ``POST /v1/admin/reload`` (``app/admin.py``) and, with ``STRIDE_RELOAD_POLL_S`` > 0, a
watcher that reads the store path's manifest (follow a ``current`` symlink, or a store replaced in
place by ``stride update --out``) and reloads when its version changes. Cache keys carry the store
version (``Engine.fingerprint``), so no answer computed on one version is served for another.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI

from app import metrics
from app.engine import Engine
from app.settings import Settings
from stride.query import Attributor
from stride.store import StoreError, load_store, read_manifest

log = logging.getLogger("stride.app.reload")


class ReloadRefused(Exception):
    """The new store cannot be served (corrupt, another model, failed warm-up); the old one still is."""


class ReloadBusy(Exception):
    """Another reload is in progress."""


@dataclass
class Reloaded:
    status: str  # "reloaded" or "unchanged"
    version: str
    previous_version: str
    generation: int
    seconds: float


def manifest_version(manifest: dict) -> str:
    """A manifest's store version, as ``Store.version`` computes it, without loading the store."""
    return manifest.get("version") or manifest["files"]["operators.safetensors"][:16]


def load_beside(path: Path, served: Attributor, settings: Settings) -> Attributor:
    """The new store's attributor, every file verified whatever ``STRIDE_VERIFY_STORE`` says. It
    shares the served model when the store names the same weights and length (an update keeps
    both): no second copy of the model in memory; otherwise its own model is loaded and checked."""
    store = load_store(path, verify=True)
    same = (store.manifest["model"]["sha256"] == served.store.manifest["model"]["sha256"]
            and store.config.max_length == served.store.config.max_length)
    if not same:
        return Attributor.from_store(path, device=settings.device, model=settings.model, solver=served.solver)
    if served.lm.hidden_size != store.operators.A.shape[2]:
        raise StoreError(f"{path}: operators are for hidden size {store.operators.A.shape[2]}, the model has "
                         f"{served.lm.hidden_size}")
    return Attributor(store, served.lm, served.solver)


class Reloader:
    def __init__(self, app: FastAPI, settings: Settings):
        self.app, self.settings = app, settings
        self._lock = asyncio.Lock()
        self._retiring: set[asyncio.Task] = set()
        self._watch: asyncio.Task | None = None
        self._refused: str | None = None  # the watcher retries a refused version only once it changes

    def start(self) -> None:
        if self.settings.reload_poll_s > 0 and self.settings.store is not None:
            self._watch = asyncio.create_task(self._watch_loop())

    async def stop(self) -> None:
        """Stop watching and let every retiring engine finish its requests and stop."""
        if self._watch is not None:
            self._watch.cancel()
            await asyncio.gather(self._watch, return_exceptions=True)
        await asyncio.gather(*self._retiring, return_exceptions=True)

    async def reload(self, store: Path | None = None) -> Reloaded:
        """Serve ``store`` (default: the configured path, its symlink resolved again) if its version differs."""
        if self._lock.locked():
            raise ReloadBusy("a reload is already in progress")
        async with self._lock:
            t0 = time.perf_counter()
            old: Engine = self.app.state.engine
            previous = old.store_ref.version
            if store is None and self.settings.store is None:
                raise self._refuse(Path("."), StoreError("no store to reload: STRIDE_STORE is unset and the request "
                                                         "names none (send {\"store\": PATH})"))
            path = Path(store or self.settings.store)
            try:
                version = manifest_version(read_manifest(path))
            except (StoreError, KeyError) as e:
                raise self._refuse(path, e) from None
            if version == previous:
                metrics.STORE_RELOADS.labels("unchanged").inc()
                return Reloaded("unchanged", previous, previous, old.attributor.store.generation, 0.0)
            try:
                attr = await asyncio.to_thread(load_beside, path, old.attributor, self.settings)
            except (StoreError, OSError) as e:
                raise self._refuse(path, e) from None
            engine = Engine(attr, self.settings)
            try:
                await engine.start()  # the warm-up query, on the new engine's own model thread
            except BaseException:
                await engine.stop()
                metrics.STORE_RELOADS.labels("refused").inc()
                log.exception("reload refused: the new store's warm-up failed", extra={"path": str(path)})
                raise
            self.app.state.engine = engine  # the swap: from here on every new request gets the new store
            self._refused = None
            metrics.STORE_RELOADS.labels("ok").inc()
            task = asyncio.create_task(self._retire(old))
            self._retiring.add(task)
            task.add_done_callback(self._retiring.discard)
            seconds = time.perf_counter() - t0
            log.info("store reloaded", extra={"path": str(path), "store": engine.store_ref.version,
                                              "event": f"reload {previous} -> {engine.store_ref.version}",
                                              "duration_ms": round(seconds * 1e3, 1)})
            return Reloaded("reloaded", engine.store_ref.version, previous, attr.store.generation, seconds)

    def _refuse(self, path: Path, error: Exception) -> ReloadRefused:
        metrics.STORE_RELOADS.labels("refused").inc()
        log.warning("reload refused, the served store stays: %s", error, extra={"path": str(path)})
        return ReloadRefused(str(error))

    async def _retire(self, old: Engine) -> None:
        """Stop ``old`` once no request holds it (bounded by the request deadline: none can take longer)."""
        deadline = time.monotonic() + self.settings.request_timeout_s + 5
        while old.leases and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        await old.stop()
        log.info("previous store retired", extra={"store": old.store_ref.version})

    async def _watch_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.reload_poll_s)
            try:
                version = manifest_version(read_manifest(self.settings.store))
            except (StoreError, KeyError, OSError):  # mid-swap or being written: look again next time
                continue
            if version in (self.app.state.engine.store_ref.version, self._refused) or self._lock.locked():
                continue
            with contextlib.suppress(ReloadBusy):
                try:
                    await self.reload()
                except ReloadRefused:
                    self._refused = version
