"""The current request id, visible to handlers, log records and error bodies alike, and the
request's arrival time, from which its deadline counts (queueing and body reading included)."""

from __future__ import annotations

from contextvars import ContextVar

request_id_var: ContextVar[str | None] = ContextVar("stride_request_id", default=None)
arrival_var: ContextVar[float | None] = ContextVar("stride_arrival", default=None)  # loop.time()
