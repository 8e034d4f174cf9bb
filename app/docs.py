"""The API docs: /docs (Swagger UI) and /redoc with their scripts, styles and icon served by the
service itself (fastapi-offline's copies), so they render offline and where egress is closed (they
were blank without the CDN); and the OpenAPI document's security scheme (Swagger's Authorize button),
declared only when keys are configured and only on the routes that ask for one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import fastapi_offline
from fastapi import APIRouter, FastAPI
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse

from app.errors import Problem
from app.middleware import is_open

STATIC = Path(fastapi_offline.__file__).parent / "static"
ASSETS = {"swagger-ui-bundle.js", "swagger-ui.css", "redoc.standalone.js", "favicon.png"}
PREFIX = "/docs/static"  # open without a key (middleware.OPEN_PREFIXES)
SCHEMES = {
    "bearer": {"type": "http", "scheme": "bearer", "description": "`Authorization: Bearer KEY`"},
    "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key", "description": "`X-API-Key: KEY`"},
}


def install(app: FastAPI, keyed: bool, open_paths: frozenset[str]) -> None:
    """Serve the docs pages and assets; with ``keyed``, declare the schemes on every route that
    needs a key (``open_paths``: the same set the auth middleware lets through)."""
    title = app.title
    router = APIRouter(include_in_schema=False)

    @router.get("/docs")
    async def swagger() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url="/openapi.json", title=f"{title} - docs",
                                   swagger_js_url=f"{PREFIX}/swagger-ui-bundle.js",
                                   swagger_css_url=f"{PREFIX}/swagger-ui.css",
                                   swagger_favicon_url=f"{PREFIX}/favicon.png",
                                   swagger_ui_parameters={"persistAuthorization": True})

    @router.get("/redoc")
    async def redoc() -> HTMLResponse:
        return get_redoc_html(openapi_url="/openapi.json", title=f"{title} - ReDoc",
                              redoc_js_url=f"{PREFIX}/redoc.standalone.js", redoc_favicon_url=f"{PREFIX}/favicon.png",
                              with_google_fonts=False)

    @router.get(PREFIX + "/{name}")
    async def asset(name: str) -> FileResponse:
        if name not in ASSETS:  # only the files shipped, never a path
            raise Problem(404, f"no docs asset {name!r}")
        return FileResponse(STATIC / name)

    app.include_router(router)
    if keyed:
        plain = app.openapi

        def openapi() -> dict[str, Any]:
            if app.openapi_schema is None:
                declare_security(plain(), open_paths)
            return app.openapi_schema  # type: ignore[return-value]

        app.openapi = openapi  # type: ignore[method-assign]


def declare_security(schema: dict[str, Any], open_paths: frozenset[str]) -> None:
    """Add the schemes and a ``security`` list (either scheme will do) to each keyed operation."""
    schema.setdefault("components", {})["securitySchemes"] = SCHEMES
    for path, ops in schema.get("paths", {}).items():
        for op in ops.values():
            op["security"] = [] if is_open(path, open_paths) else [{"bearer": []}, {"apiKey": []}]
