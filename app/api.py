"""The routes: ``/v1`` (attribution, corpus, info) and the service probes. Thin: validate, check
limits, hand the query to the engine. Readiness comes in as a dependency and every typed error the
engine raises is mapped to a problem document centrally (``app/errors.py``)."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

import stride
from app import metrics
from app.context import request_id_var
from app.deps import AppSettings, ReadyEngine, json_body
from app.engine import Engine, dumps
from app.errors import Problem, problem_for
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
from stride.result import QueryError

log = logging.getLogger("stride.app")
API_VERSION = "1"
PROBLEM_TEXT = {
    400: "The body cannot be read as JSON text (e.g. bytes that are not UTF-8).",
    401: "Missing or wrong API key.", 404: "No such example.",
    413: "Body, prompt or batch over the limits, or tokens to score that do not fit the model's window.",
    408: "The body was not received within STRIDE_BODY_TIMEOUT_S (the connection is closed).",
    415: "The body is not declared as application/json.",
    422: "Invalid fields, or a query the model cannot score: one token and no completion, token ids past the "
         "vocabulary, a chat conversation for a model without a chat template, a span over no token.",
    503: "Queue full, not ready or draining (Retry-After).", 504: "Deadline passed before an answer.",
}


def problem_docs(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {c: {"model": ProblemDoc, "description": PROBLEM_TEXT[c], "content": {"application/problem+json": {}}}
            for c in codes}


v1 = APIRouter(prefix="/v1")
QUEUED_PATHS = frozenset({"/v1/attribute", "/v1/attribute/batch"})  # what waits for the model (shed at the door)
probes = APIRouter(tags=["service"])


def check_limits(q: AttributeRequest, settings: Settings, where: str = "body") -> None:
    if q.top_k > settings.max_top_k:
        raise Problem(422, f"top_k is capped at {settings.max_top_k}",
                      extra={"errors": [{"loc": [where, "top_k"], "msg": f"at most {settings.max_top_k}",
                                         "type": "less_than_equal"}]})
    texts = [("prompt", q.prompt), ("completion", q.completion)]
    texts += [(f"messages[{j}].content", m.content) for j, m in enumerate(q.messages or [])]
    for name, text in texts:
        if text is not None and len(text) > settings.max_prompt_chars:
            raise Problem(413, f"{name} is over {settings.max_prompt_chars} characters", slug="too-large")


async def answer(engine: Engine, q: AttributeRequest, settings: Settings) -> bytes:
    """The answer's JSON object (request id first, ``cached`` last), spliced around the payload
    bytes the engine encoded once: no re-validation or re-encoding of the result per request."""
    payload, cached = await engine.attribute(q, settings.request_timeout_s)
    extra: dict[str, Any] = {"prompt_chars": q.chars(), "cached": cached}
    if settings.log_prompts:
        extra["prompt"] = q.prompt
    log.info("attribute", extra=extra)
    return b"".join((b'{"request_id":', dumps(request_id_var.get()), b",", payload[1:-1],
                     b',"cached":true}' if cached else b',"cached":false}'))


@v1.post("/attribute", response_model=AttributeResponse, tags=["attribution"], dependencies=[Depends(json_body)],
         responses=problem_docs(400, 401, 408, 413, 415, 422, 503, 504))
async def attribute(body: AttributeRequest, engine: ReadyEngine, settings: AppSettings) -> Response:
    """Rank the training examples that most lowered (proponents) and raised (opponents) the loss of
    a completion: given as text, as a chat conversation or as token ids, optionally one span of it."""
    check_limits(body, settings)
    engine.check(body)
    return Response(await answer(engine, body, settings), media_type="application/json")


@v1.post("/attribute/batch", response_model=BatchResponse, tags=["attribution"], dependencies=[Depends(json_body)],
         responses=problem_docs(400, 401, 408, 413, 415, 422, 503, 504))
async def attribute_batch(body: BatchRequest, engine: ReadyEngine, settings: AppSettings) -> Response:
    """Several queries, answered in order; they share batches with every other request in flight.
    A query that cannot be answered fails the whole request, naming its index, before any is computed."""
    if len(body.queries) > settings.max_batch_queries:
        raise Problem(413, f"at most {settings.max_batch_queries} queries per batch", slug="too-large")
    for i, q in enumerate(body.queries):
        try:
            check_limits(q, settings, f"queries.{i}")
            engine.check(q)
        except (Problem, QueryError) as e:
            raise _at(i, e, settings) from None
    results = await asyncio.gather(*(answer(engine, q, settings) for q in body.queries), return_exceptions=True)
    for i, r in enumerate(results):
        if isinstance(r, BaseException):
            raise _at(i, r, settings) if isinstance(r, Exception) else r
    content = b"".join((b'{"request_id":', dumps(request_id_var.get()), b',"results":[',
                        b",".join(results), b"]}"))  # type: ignore[arg-type]
    return Response(content, media_type="application/json")


def _at(i: int, exc: Exception, settings: Settings) -> Exception:
    """The problem for query ``i`` of a batch, its detail prefixed with the index; other errors as they are."""
    p = problem_for(exc, settings.retry_after_s)
    if p is None:
        return exc
    p.detail = f"queries[{i}]: {p.detail}"
    return p


@v1.get("/examples/{example_id}", response_model=ExampleResponse, tags=["corpus"],
        responses=problem_docs(401, 404, 503))
async def example(example_id: str, engine: ReadyEngine) -> dict[str, Any]:
    """A training example by its corpus id or, when no id matches, by its index: plain ASCII digits
    in canonical form only (``42``; not ``042``, ``4_2``, `` 42`` or other scripts' digits)."""
    try:
        ex = engine.attributor.example(example_id)
    except KeyError:
        if not (example_id.isascii() and example_id.isdigit() and str(int(example_id)) == example_id):
            raise Problem(404, f"no training example with id {example_id!r}") from None
        try:
            ex = engine.attributor.example(int(example_id))
        except KeyError:
            raise Problem(404, f"no training example with id or index {example_id!r}") from None
    return {"request_id": request_id_var.get(), "index": ex.index, "id": ex.id, "text": ex.text,
            "num_chars": len(ex.text), "store_version": engine.store_ref.version}


@v1.get("/info", response_model=InfoResponse, tags=["service"], responses=problem_docs(401, 503))
async def info(engine: ReadyEngine, settings: AppSettings) -> dict[str, Any]:
    """What is served and under which limits: enough to reproduce or cache-key an answer."""
    mf = engine.attributor.store.manifest
    cfg = mf.get("config", {})
    cache = engine.cache
    return {
        "version": {"stride": stride.__version__, "api": API_VERSION},
        "model": engine.model_ref.model_dump(),
        "device": str(engine.attributor.lm.device),
        "store": {**engine.store_ref.model_dump(), "format_version": mf.get("format_version"),
                  "code_version": mf.get("code_version"), "created": mf.get("created"),
                  "corpus_sha256": mf.get("corpus", {}).get("sha256"), "shapes": mf.get("shapes", {}),
                  "layer": cfg.get("layer"), "fit": cfg.get("fit"), "max_length": cfg.get("max_length"),
                  "window": engine.attributor.window},
        "solver": engine.attributor.solver.to_dict(),
        "limits": {k: getattr(settings, k) for k in (
            "max_top_k", "max_batch_queries", "max_prompt_chars", "max_body_bytes", "batch_max_size",
            "batch_max_wait_ms", "queue_max", "request_timeout_s")},
        "cache": {"enabled": cache is not None, "ttl_s": settings.cache_ttl_s if cache else None,
                  "breaker_open": cache.breaker.open if cache else None},
        "auth": bool(settings.keys()),
    }


@probes.get("/healthz", response_model=Health)
async def healthz() -> dict[str, Any]:
    """The process answers (liveness). Never touches the model, the store or Redis."""
    return {"status": "ok"}


@probes.get("/readyz", response_model=Health, responses=problem_docs(503))
async def readyz(engine: ReadyEngine) -> Any:
    """Model and store loaded and warmed up (readiness). Redis is reported but never required."""
    cache = "disabled" if engine.cache is None else await engine.cache.status()
    return JSONResponse({"status": "ready", "checks": {"model": True, "store": True, "warm": True,
                                                       "cache": cache}})


@probes.get("/metrics", response_class=Response,
            responses={200: {"description": "Prometheus text format.", "content": {CONTENT_TYPE_LATEST: {}}}})
async def prometheus() -> Response:
    """Prometheus text format."""
    return Response(generate_latest(metrics.REGISTRY), media_type=CONTENT_TYPE_LATEST)
