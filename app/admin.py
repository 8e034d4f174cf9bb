"""Admin routes (``/v1/admin``): their own keys (``STRIDE_ADMIN_KEYS``), never a query key.

The API-key middleware lets these paths through (``PATHS``) and the ``admin_key`` dependency checks
them instead: 401 without a key or with an unknown one, 403 for a query key (authenticated, not
allowed) and while no admin key is configured (the routes are then off).
"""

from __future__ import annotations

import hmac
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, Field

from app.api import problem_docs
from app.errors import Problem
from app.reload import ReloadBusy, Reloader, ReloadRefused

PATHS = frozenset({"/v1/admin/reload"})
router = APIRouter(prefix="/v1/admin", tags=["admin"])


def _keys(raw: str) -> list[bytes]:
    return [k.strip().encode() for k in raw.split(",") if k.strip()]


def _matches(given: bytes, keys: list[bytes]) -> bool:
    ok = False
    for k in keys:  # no early exit: time does not depend on which key matched
        ok |= hmac.compare_digest(given, k)
    return ok


def admin_key(request: Request) -> None:
    settings = request.app.state.settings
    admin = _keys(settings.admin_keys)
    if not admin:
        raise Problem(403, "admin routes are off: set STRIDE_ADMIN_KEYS", slug="forbidden")
    auth = request.headers.get("authorization", "")
    given = request.headers.get("x-api-key") or (auth[7:].strip() if auth[:7].lower() == "bearer " else None)
    if given is None:
        raise Problem(401, "missing admin key", headers={"WWW-Authenticate": 'Bearer realm="stride-admin"'})
    if _matches(given.encode(), admin):
        return
    if _matches(given.encode(), _keys(settings.api_keys)):
        raise Problem(403, "a query key cannot use admin routes; send an admin key (STRIDE_ADMIN_KEYS)",
                      slug="forbidden")
    raise Problem(401, "invalid admin key", headers={"WWW-Authenticate": 'Bearer realm="stride-admin"'})


class ReloadRequest(BaseModel):
    store: str | None = Field(None, description="Store directory to serve (default: the configured STRIDE_STORE, "
                                                "a symlink resolved again).")


class ReloadResponse(BaseModel):
    status: str = Field(..., description="reloaded, or unchanged when the store's version is the one served.")
    version: str = Field(..., description="Store version now served (answers and cache keys carry it).")
    previous_version: str
    generation: int = Field(..., description="0 for a build, +1 for each `stride update` since.")
    seconds: float = Field(..., description="Load, verification and warm-up time.")


DOCS = {**problem_docs(400, 401, 408, 415, 503), 403: {"description": "A query key, or admin routes off."},
        409: {"description": "Another reload is in progress."},
        422: {"description": "The store failed verification; the previous one is still served."}}


@router.post("/reload", response_model=ReloadResponse, dependencies=[Depends(admin_key)], responses=DOCS)
async def reload(request: Request, body: ReloadRequest | None = None) -> dict[str, Any]:
    """Load the store beside the served one, verify and warm it, then swap: requests in flight finish on
    the old store, new ones get the new one."""
    reloader: Reloader | None = getattr(request.app.state, "reloader", None)
    if reloader is None or request.app.state.engine is None:
        raise Problem(503, "not ready", headers={"Retry-After": str(request.app.state.settings.retry_after_s)})
    try:
        done = await reloader.reload(Path(body.store) if body and body.store else None)
    except ReloadBusy as e:
        raise Problem(409, str(e), slug="reload-in-progress") from None
    except ReloadRefused as e:
        raise Problem(422, f"store refused, the previous version is still served: {e}", slug="store-refused") \
            from None
    return done.__dict__
