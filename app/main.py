"""The ASGI app: ``uvicorn app.main:app`` (settings from ``STRIDE_*``) or ``create_app(settings)``.

Routes are thin: validate, check limits, hand the query to the :class:`~app.engine.Engine`, and map
its exceptions to problem documents. The model and store load once, in the lifespan, off the loop.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

import stride
from app import errors, metrics
from app.batcher import DeadlineExceeded, Overloaded, Stopped
from app.context import request_id_var
from app.engine import Engine, dumps
from app.errors import Problem
from app.middleware import OPEN_PATHS, ApiKeyAuth, BodyLimit, JsonFormatter, RequestContext
from app.schemas import (
    AttributeRequest,
    AttributeResponse,
    BatchRequest,
    BatchResponse,
    ExampleResponse,
    Health,
    InfoResponse,
    ProblemDoc,
)
from app.settings import Settings
from stride.query import Attributor

log = logging.getLogger("stride.app")
API_VERSION = "1"


def _problem_docs(*codes: int) -> dict[int | str, dict[str, Any]]:
    text = {401: "Missing or wrong API key.", 404: "No such example.", 413: "Body, prompt or batch over the limits.",
            422: "Invalid fields, or a query with no token to score.", 503: "Queue full or not ready (Retry-After).",
            504: "Deadline passed before an answer."}
    return {c: {"model": ProblemDoc, "description": text[c], "content": {"application/problem+json": {}}}
            for c in codes}


def setup_logging(settings: Settings) -> None:
    """JSON lines on stderr, unless the host (pytest, a parent app) configured logging already."""
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(JsonFormatter())
        root.addHandler(handler)
        root.setLevel(settings.log_level.upper())


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
        metrics.READY.set(1)
        log.info("ready", extra={"store": str(attr.store.path), "device": str(attr.lm.device)})
        try:
            yield
        finally:
            app.state.draining = True
            metrics.READY.set(0)
            await engine.stop()

    app = FastAPI(
        title="STRIDE attribution service", version=stride.__version__, lifespan=lifespan,
        description="Which training examples made this model produce this output? One forward pass and one "
                    "sparse solve per query, micro-batched. Errors are RFC 9457 `application/problem+json`. "
                    "When `STRIDE_API_KEYS` is set, send `Authorization: Bearer KEY` or `X-API-Key: KEY`.",
    )
    app.state.settings, app.state.engine, app.state.draining = settings, None, False
    errors.install(app)
    # added innermost first: RequestContext wraps everything, so even a 401 or 413 has a request id,
    # and the key is checked before any body is buffered
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(ApiKeyAuth, keys=settings.keys(),
                       open_paths=OPEN_PATHS if settings.metrics_need_key else OPEN_PATHS | {"/metrics"})
    app.add_middleware(RequestContext)

    def engine_of(request: Request) -> Engine:
        engine: Engine | None = request.app.state.engine
        if engine is None or not engine.warm or request.app.state.draining:
            raise Problem(503, "not ready", headers={"Retry-After": str(settings.retry_after_s)})
        return engine

    def check_limits(q: AttributeRequest, where: str = "body") -> None:
        if q.top_k > settings.max_top_k:
            raise Problem(422, f"top_k is capped at {settings.max_top_k}",
                          extra={"errors": [{"loc": [where, "top_k"], "msg": f"at most {settings.max_top_k}",
                                             "type": "less_than_equal"}]})
        for name in ("prompt", "completion"):
            text = getattr(q, name)
            if text is not None and len(text) > settings.max_prompt_chars:
                raise Problem(413, f"{name} is over {settings.max_prompt_chars} characters", slug="too-large")

    async def answer(engine: Engine, q: AttributeRequest) -> bytes:
        """The answer's JSON object (request id first, ``cached`` last), spliced around the payload
        bytes the engine encoded once: no re-validation or re-encoding of the result per request."""
        try:
            payload, cached = await engine.attribute(q, settings.request_timeout_s)
        except Overloaded as e:
            raise Problem(503, f"overloaded: {e}", headers={"Retry-After": str(settings.retry_after_s)},
                          slug="overloaded") from None
        except DeadlineExceeded as e:
            raise Problem(504, str(e)) from None
        except Stopped as e:
            raise Problem(503, str(e), headers={"Retry-After": str(settings.retry_after_s)}) from None
        except ValueError as e:  # the only ValueError attribute_batch raises is about the query itself
            raise Problem(422, str(e), slug="unscorable-query") from None
        extra: dict[str, Any] = {"prompt_chars": len(q.prompt), "cached": cached}
        if settings.log_prompts:
            extra["prompt"] = q.prompt
        log.info("attribute", extra=extra)
        return b"".join((b'{"request_id":', dumps(request_id_var.get()), b",", payload[1:-1],
                         b',"cached":true}' if cached else b',"cached":false}'))

    @app.post("/v1/attribute", response_model=AttributeResponse, tags=["attribution"],
              responses=_problem_docs(401, 413, 422, 503, 504))
    async def attribute(body: AttributeRequest, request: Request) -> Response:
        """Rank the training examples that most lowered (proponents) and raised (opponents) the loss."""
        engine = engine_of(request)
        check_limits(body)
        return Response(await answer(engine, body), media_type="application/json")

    @app.post("/v1/attribute/batch", response_model=BatchResponse, tags=["attribution"],
              responses=_problem_docs(401, 413, 422, 503, 504))
    async def attribute_batch(body: BatchRequest, request: Request) -> Response:
        """Several queries, answered in order; they share batches with every other request in flight."""
        engine = engine_of(request)
        if len(body.queries) > settings.max_batch_queries:
            raise Problem(413, f"at most {settings.max_batch_queries} queries per batch", slug="too-large")
        for i, q in enumerate(body.queries):
            check_limits(q, f"queries.{i}")
        results = await asyncio.gather(*(answer(engine, q) for q in body.queries), return_exceptions=True)
        for i, r in enumerate(results):
            if isinstance(r, Problem):
                r.detail = f"queries[{i}]: {r.detail}"
                raise r
            if isinstance(r, BaseException):
                raise r
        content = b"".join((b'{"request_id":', dumps(request_id_var.get()), b',"results":[',
                            b",".join(results), b"]}"))  # type: ignore[arg-type]
        return Response(content, media_type="application/json")

    @app.get("/v1/examples/{example_id}", response_model=ExampleResponse, tags=["corpus"],
             responses=_problem_docs(401, 404))
    async def example(example_id: str, request: Request) -> dict[str, Any]:
        """A training example by its corpus id (or, when no id matches, by its integer index)."""
        engine = engine_of(request)
        try:
            ex = engine.attributor.example(example_id)
        except KeyError:
            try:
                ex = engine.attributor.example(int(example_id))
            except (KeyError, ValueError):
                raise Problem(404, f"no training example with id or index {example_id!r}") from None
        return {"request_id": request_id_var.get(), "index": ex.index, "id": ex.id, "text": ex.text,
                "num_chars": len(ex.text), "store_version": engine.store_ref["version"]}

    @app.get("/v1/info", response_model=InfoResponse, tags=["service"], responses=_problem_docs(401, 503))
    async def info(request: Request) -> dict[str, Any]:
        """What is served and under which limits: enough to reproduce or cache-key an answer."""
        engine = engine_of(request)
        mf = engine.attributor.store.manifest
        cfg = mf.get("config", {})
        cache = engine.cache
        return {
            "version": {"stride": stride.__version__, "api": API_VERSION},
            "model": engine.model_ref,
            "device": str(engine.attributor.lm.device),
            "store": {**engine.store_ref, "format_version": mf.get("format_version"),
                      "code_version": mf.get("code_version"), "created": mf.get("created"),
                      "corpus_sha256": mf.get("corpus", {}).get("sha256"), "shapes": mf.get("shapes", {}),
                      "layer": cfg.get("layer"), "fit": cfg.get("fit"), "max_length": cfg.get("max_length")},
            "solver": engine.attributor.solver.to_dict(),
            "limits": {k: getattr(settings, k) for k in (
                "max_top_k", "max_batch_queries", "max_prompt_chars", "max_body_bytes", "batch_max_size",
                "batch_max_wait_ms", "queue_max", "request_timeout_s")},
            "cache": {"enabled": cache is not None, "ttl_s": settings.cache_ttl_s if cache else None,
                      "breaker_open": cache.breaker.open if cache else None},
            "auth": bool(settings.keys()),
        }

    @app.get("/healthz", response_model=Health, tags=["service"])
    async def healthz() -> dict[str, Any]:
        """The process answers (liveness). Never touches the model, the store or Redis."""
        return {"status": "ok"}

    @app.get("/readyz", response_model=Health, tags=["service"], responses=_problem_docs(503))
    async def readyz(request: Request) -> Any:
        """Model and store loaded and warmed up (readiness). Redis is reported but never required."""
        engine: Engine | None = request.app.state.engine
        if engine is None or not engine.warm or request.app.state.draining:
            state = "draining" if request.app.state.draining else "starting"
            raise Problem(503, state, headers={"Retry-After": str(settings.retry_after_s)})
        cache = "disabled" if engine.cache is None else ("breaker-open" if engine.cache.breaker.open else "ok")
        return JSONResponse({"status": "ready", "checks": {"model": True, "store": True, "warm": True,
                                                           "cache": cache}})

    @app.get("/metrics", tags=["service"], include_in_schema=True)
    async def prometheus() -> Response:
        """Prometheus text format."""
        return Response(generate_latest(metrics.REGISTRY), media_type=CONTENT_TYPE_LATEST)

    return app


app = create_app()
