"""Route dependencies: the ready engine (readiness as a dependency, not an ``if`` in every route),
the settings, and the JSON content-type rule."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Request

from app.engine import Engine
from app.errors import NotReady, Problem
from app.settings import Settings


def settings_of(request: Request) -> Settings:
    return request.app.state.settings


async def ready_engine(request: Request) -> AsyncIterator[Engine]:
    """The engine once the model and store are loaded and warmed up; NotReady (503) before and while draining.
    Leased for the whole request: a hot reload retires the previous engine only once nobody holds it."""
    engine: Engine | None = request.app.state.engine
    if request.app.state.draining:
        raise NotReady("draining")
    if engine is None or not engine.warm:
        raise NotReady("starting")
    with engine.lease():
        yield engine


def json_body(request: Request) -> None:
    """415 for a body declared as anything but JSON (a form post, text/plain): it would otherwise be
    read as JSON anyway, or fail as a 422 that blames the fields. No content type is read as JSON."""
    declared = request.headers.get("content-type")
    if declared is None:
        return
    media = declared.split(";", 1)[0].strip().lower()
    if media != "application/json" and not (media.startswith("application/") and media.endswith("+json")):
        raise Problem(415, f"the body must be application/json, not {media or 'an empty content type'!r}")


ReadyEngine = Annotated[Engine, Depends(ready_engine)]
AppSettings = Annotated[Settings, Depends(settings_of)]
