"""The ASGI app: ``uvicorn app.main:app`` (settings from ``STRIDE_*``) or ``create_app(settings)``.

``create_app`` only assembles: lifespan (load the model and store once, off the loop), error
handlers (``app/errors.py``), middleware (``app/middleware.py``) and routers (``app/api.py``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

import stride
from app import api, docs, errors, jobs, metrics, ui
from app.admin import PATHS as ADMIN_PATHS
from app.admin import router as admin_router
from app.engine import Engine
from app.logs import setup_logging
from app.middleware import OPEN_PATHS, Admission, ApiKeyAuth, BodyLimit, InflightLimit, RequestContext
from app.reload import Reloader
from app.settings import Settings
from stride.query import Attributor

log = logging.getLogger("stride.app")


def load_attributor(settings: Settings) -> Attributor:
    if settings.store is None:
        raise RuntimeError("set STRIDE_STORE (or run `stride serve --store DIR`)")
    return Attributor.from_store(settings.store, device=settings.device, model=settings.model,
                                 verify=settings.verify_store)


def create_app(settings: Settings | None = None, attributor: Attributor | None = None) -> FastAPI:
    """``attributor`` lets tests and embedders share one loaded model across apps."""
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        setup_logging(settings)
        attr = attributor or await asyncio.to_thread(load_attributor, settings)
        engine = Engine(attr, settings)
        await engine.start()
        app.state.engine, app.state.draining = engine, False
        app.state.reloader = reloader = Reloader(app, settings)  # POST /v1/admin/reload, the store watcher
        reloader.start()
        metrics.READY.set(1)
        log.info("ready", extra={"store": str(attr.store.path), "device": str(attr.lm.device)})
        try:
            yield
        finally:
            app.state.draining = True
            metrics.READY.set(0)
            await reloader.stop()  # stops watching; engines retired by a reload finish first
            await app.state.engine.stop()  # the one serving now, after any reload
            await jobs.close(app)

    app = FastAPI(
        title="STRIDE attribution service", version=stride.__version__, lifespan=lifespan,
        docs_url=None, redoc_url=None,  # app/docs.py serves both, with local assets
        description="Which training examples made this model produce this output? One forward pass and one "
                    "sparse solve per query, micro-batched. Errors are RFC 9457 `application/problem+json`. "
                    "When `STRIDE_API_KEYS` is set, send `Authorization: Bearer KEY` or `X-API-Key: KEY`.",
    )
    app.state.settings, app.state.engine, app.state.draining = settings, None, False
    errors.install(app, settings.retry_after_s)
    # added innermost first: RequestContext wraps everything, so even a 401 or 413 has a request id,
    # and the key is checked before any body is buffered
    open_paths = OPEN_PATHS if settings.metrics_need_key else OPEN_PATHS | {"/metrics"}
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes, timeout_s=settings.body_timeout_s)
    app.add_middleware(Admission, paths=api.QUEUED_PATHS, retry_after_s=settings.retry_after_s)  # sheds unread
    # admin routes check their own keys (app/admin.py): a query key gets 403 there
    app.add_middleware(ApiKeyAuth, keys=settings.keys(), open_paths=open_paths | ADMIN_PATHS)
    app.add_middleware(InflightLimit, max_inflight=settings.max_inflight, retry_after_s=settings.retry_after_s)
    app.add_middleware(RequestContext)

    # routers: one line each (the dashboard's, admin's ... go here too)
    app.include_router(api.v1)
    app.include_router(jobs.router)
    app.include_router(api.probes)
    app.include_router(ui.router)
    app.include_router(admin_router)
    docs.install(app, keyed=bool(settings.keys()), open_paths=open_paths)
    return app


app = create_app()
