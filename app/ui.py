"""The browser dashboard: ``GET /ui`` and its static assets, shipped in the package (no build step).

The page talks to the public API only (``/v1/*``, ``/readyz``), so whatever it shows can be
reproduced with curl. Its files are read once at import and served from memory with a strict
Content-Security-Policy: same-origin scripts, styles and fetches only, no inline code, no framing.
They are open paths (``app.middleware.OPEN_PREFIXES``): the page itself asks for the API key.
"""

from __future__ import annotations

import hashlib
import mimetypes
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import Response

from app.errors import Problem

STATIC = Path(__file__).with_name("ui") / "static"
PREFIX = "/ui"
CSP = "; ".join((
    "default-src 'none'",
    "script-src 'self'",
    "style-src 'self'",
    "connect-src 'self'",
    "img-src 'self' data:",
    "base-uri 'none'",
    "form-action 'none'",
    "frame-ancestors 'none'",
))
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    # revalidate every load (a 304 when unchanged), so a new version of the page is never half-cached
    "Cache-Control": "no-cache",
}
TYPES = {".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml", ".html": "text/html"}


class Asset:
    def __init__(self, path: Path):
        self.body = path.read_bytes()
        self.etag = '"' + hashlib.sha256(self.body).hexdigest()[:32] + '"'
        kind = TYPES.get(path.suffix) or mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        self.media_type = kind + ("; charset=utf-8" if kind.startswith("text/") else "")


def _load() -> dict[str, Asset]:
    return {p.name: Asset(p) for p in sorted(STATIC.iterdir()) if p.is_file() and not p.name.startswith(".")}


ASSETS = _load()
router = APIRouter(include_in_schema=False)


def _serve(asset: Asset, request: Request) -> Response:
    headers = {**HEADERS, "ETag": asset.etag}
    if request.headers.get("if-none-match") == asset.etag:
        return Response(status_code=304, headers=headers)
    return Response(asset.body, media_type=asset.media_type, headers=headers)


@router.get(PREFIX)
async def page(request: Request) -> Response:
    """The dashboard. Its relative links (``ui/app.js``, ``v1/...``) also work behind a path prefix."""
    return _serve(ASSETS["index.html"], request)


@router.get(PREFIX + "/{name}")
async def asset(name: str, request: Request) -> Response:
    """Only the files shipped in ``app/ui/static``: a name is looked up, never joined to a path."""
    found = ASSETS.get(name)
    if found is None or name == "index.html":
        raise Problem(404, f"no dashboard asset {name!r}")
    return _serve(found, request)
