"""Logging set-up for the service: JSON lines on stderr (the formatter is ``middleware.JsonFormatter``)."""

from __future__ import annotations

import logging
import sys

from app.middleware import JsonFormatter
from app.settings import Settings


def setup_logging(settings: Settings) -> None:
    """JSON lines on stderr, unless the host (pytest, a parent app) configured logging already."""
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(JsonFormatter())
        root.addHandler(handler)
        root.setLevel(settings.log_level.upper())
