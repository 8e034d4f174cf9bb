"""RFC 9457 problem details: every error the service returns is ``application/problem+json``.

Bad input maps to 4xx; only a genuine bug reaches the 500 handler, and it leaks no internals. The
engine's and the library's typed errors are mapped here, in one table (``problem_for``), so routes
raise or propagate them and never translate status codes themselves.
"""

from __future__ import annotations

import logging
import math
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from app.batcher import DeadlineExceeded, Overloaded, Stopped
from app.context import request_id_var
from stride.result import QueryError, QueryTooLong, UnscorableQuery

PROBLEM = "application/problem+json"
log = logging.getLogger("stride.app")

# problem type slugs; "about:blank" would do, but a stable slug lets clients branch on it
SLUGS = {400: "bad-request", 401: "unauthorized", 403: "forbidden", 404: "not-found", 405: "method-not-allowed",
         408: "request-timeout", 409: "conflict", 413: "too-large", 415: "unsupported-media-type",
         422: "invalid-request", 429: "too-many-requests", 503: "unavailable", 504: "deadline-exceeded"}


class Problem(Exception):
    """Raise anywhere in a handler to answer with a problem document."""

    def __init__(self, status: int, detail: str, *, headers: dict[str, str] | None = None,
                 slug: str | None = None, extra: dict[str, Any] | None = None):
        super().__init__(detail)
        self.status, self.detail, self.headers = status, detail, headers or {}
        self.slug, self.extra = slug, extra or {}


class NotReady(Exception):
    """The model is loading or warming up, or the service is draining."""


def problem_for(exc: Exception, retry_after_s: int) -> Problem | None:
    """The problem document for a typed engine or query error; None for anything else (a bug)."""
    retry = {"Retry-After": str(retry_after_s)}
    if isinstance(exc, Problem):
        return exc
    if isinstance(exc, Overloaded):  # come back once the work ahead is done, not into the same queue
        later = {"Retry-After": str(max(retry_after_s, math.ceil(exc.ahead_s)))}
        return Problem(503, f"overloaded: {exc}", headers=later, slug="overloaded")
    if isinstance(exc, NotReady | Stopped):
        return Problem(503, str(exc), headers=retry)
    if isinstance(exc, DeadlineExceeded):
        return Problem(504, str(exc))
    if isinstance(exc, QueryTooLong):
        return Problem(413, str(exc), slug="query-too-long")
    if isinstance(exc, UnscorableQuery):
        return Problem(422, str(exc), slug="unscorable-query")
    if isinstance(exc, QueryError):
        return Problem(422, str(exc), slug="invalid-query")
    return None


ENGINE_ERRORS = (NotReady, Overloaded, Stopped, DeadlineExceeded, QueryError)


def problem_body(status: int, detail: str, instance: str | None = None, slug: str | None = None,
                 **extra: Any) -> dict[str, Any]:
    slug = slug or SLUGS.get(status, "error")
    body: dict[str, Any] = {
        "type": f"urn:stride:problem:{slug}",
        "title": HTTPStatus(status).phrase,
        "status": status,
        "detail": detail,
        "request_id": request_id_var.get(),
    }
    if instance:
        body["instance"] = instance
    body.update(extra)
    return body


def problem_response(status: int, detail: str, instance: str | None = None, *,
                     headers: dict[str, str] | None = None, slug: str | None = None,
                     **extra: Any) -> JSONResponse:
    return JSONResponse(problem_body(status, detail, instance, slug, **extra), status_code=status,
                        headers=headers, media_type=PROBLEM)


def _validation_errors(exc: RequestValidationError) -> list[dict[str, Any]]:
    """Field errors without the offending input: it may be a prompt, which is never echoed."""
    out = []
    for e in exc.errors():
        out.append({"loc": [str(p) for p in e.get("loc", ())], "msg": str(e.get("msg", "")),
                    "type": str(e.get("type", ""))})
    return out


def install(app: FastAPI, retry_after_s: int) -> None:
    @app.exception_handler(Problem)
    async def _problem(request: Request, exc: Problem) -> JSONResponse:
        return problem_response(exc.status, exc.detail, request.url.path, headers=exc.headers,
                                slug=exc.slug, **exc.extra)

    async def _typed(request: Request, exc: Exception) -> JSONResponse:
        p = problem_for(exc, retry_after_s)
        if p is None:  # not one of ours: the request-context middleware answers 500
            raise exc
        return await _problem(request, p)

    for cls in ENGINE_ERRORS:
        app.add_exception_handler(cls, _typed)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = _validation_errors(exc)
        # a body that is not JSON at all is a 422 too (FastAPI reports it as json_invalid)
        return problem_response(422, "the request does not match the schema", request.url.path,
                                errors=errors)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        headers = getattr(exc, "headers", None)
        if exc.status_code == 405:  # Starlette's Allow names only the first route on the path
            headers = {**(headers or {}), "Allow": ", ".join(_allowed(request))}
        return problem_response(exc.status_code, str(exc.detail), request.url.path, headers=headers)


def _allowed(request: Request) -> list[str]:
    """Every method some route serves on this path (GET /v1/jobs/{id} and DELETE are two routes)."""
    methods: set[str] = set()
    for route in request.app.router.routes:
        if route.matches(request.scope)[0] is not Match.NONE:
            methods |= set(getattr(route, "methods", None) or ())
    return sorted(methods)
