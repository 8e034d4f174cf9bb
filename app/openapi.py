"""The API contract as a file: ``python -m app.openapi > docs/openapi.json`` regenerates the committed
snapshot, and ``tests/test_openapi.py`` fails when the served schema differs from it, so a change
to the API is a visible diff in review rather than a surprise to a client."""

from __future__ import annotations

import json
import sys
from typing import Any

from app.main import create_app
from app.settings import Settings


def served_schema() -> dict[str, Any]:
    """The OpenAPI document of an app with default settings (no store needed: nothing is loaded),
    keyless whatever the environment says (keys add security schemes to the document)."""
    return create_app(settings()).openapi()


def settings() -> Settings:
    return Settings(_env_file=None, api_keys="")


def render(schema: dict[str, Any]) -> str:
    return json.dumps(schema, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


if __name__ == "__main__":
    sys.stdout.write(render(served_schema()))
