"""The current request id, visible to handlers, log records and error bodies alike."""

from __future__ import annotations

from contextvars import ContextVar

request_id_var: ContextVar[str | None] = ContextVar("stride_request_id", default=None)
