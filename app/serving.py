"""Running the service under uvicorn (``stride serve``): settings and store checked before anything
loads, JSON lines from the first log record on, keep-alive and shutdown from the settings, and a
problem document even for a request uvicorn refuses before the app sees it."""

from __future__ import annotations

import json
import logging
import logging.config
import uuid
from typing import Any

from pydantic import ValidationError
from uvicorn.protocols.http.h11_impl import H11Protocol

from app.errors import PROBLEM, problem_body
from app.settings import Settings
from stride.query import serving_model
from stride.store import load_store


class ConfigError(Exception):
    """A setting that cannot work, found before the model loads."""


def preflight(settings: Settings) -> None:
    """Fail before the model loads, naming the setting or file, what would otherwise fail after it
    (or as a traceback in the lifespan): the store (its manifest and, with ``verify_store``, every
    file's sha256: the lifespan reads it again, 0.45 s of hashing at n = 10^7), the model directory and
    its weights' sha256.
    ``Settings()`` itself has already checked the Redis URL. Raises ConfigError or StoreError."""
    if settings.store is None:
        raise ConfigError("STRIDE_STORE is not set (or run `stride serve --store DIR`)")
    if not settings.store.is_dir():
        raise ConfigError(f"STRIDE_STORE={settings.store}: no such directory")
    store = load_store(settings.store, verify=settings.verify_store)  # StoreError naming the file and the field
    if settings.model is not None and not (settings.model / "config.json").is_file():
        raise ConfigError(f"STRIDE_MODEL={settings.model}: no config.json there (a Hugging Face model directory)")
    # the weights the store was built from (a mismatch used to surface as a traceback from the
    # lifespan); memoised, so the app's own check as it loads costs nothing more
    serving_model(store, settings.model, settings.verify_store)


def log_config(level: str) -> dict[str, Any]:
    """uvicorn's own loggers and everyone else's through the service's JSON formatter."""
    handler = {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stderr"}
    return {
        "version": 1, "disable_existing_loggers": False,
        "formatters": {"json": {"()": "app.middleware.JsonFormatter"}},
        "handlers": {"stderr": handler},
        "root": {"handlers": ["stderr"], "level": level.upper()},
        "loggers": {name: {"handlers": [], "propagate": True} for name in ("uvicorn", "uvicorn.error")},
    }


def quiet_libraries() -> None:
    """No progress bars on stderr (transformers' "Loading weights" bar is not a log line), and
    transformers' and Python's warnings as JSON log records instead of their own plain text."""
    import transformers.utils.logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.disable_default_handler()
    hf_logging.enable_propagation()
    logging.captureWarnings(True)


class ProblemH11Protocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol, but a request it cannot parse (a malformed Content-Length, a bad
    request line) is answered with a problem document instead of uvicorn's text/plain."""

    def send_400_response(self, msg: str) -> None:
        import h11

        body = problem_body(400, f"malformed HTTP request: {msg}")
        body["request_id"] = uuid.uuid4().hex
        data = json.dumps(body).encode()
        headers = [(b"content-type", PROBLEM.encode()), (b"content-length", str(len(data)).encode()),
                   (b"connection", b"close")]
        for event in (h11.Response(status_code=400, headers=headers, reason=b"Bad Request"), h11.Data(data=data),
                      h11.EndOfMessage()):
            self.transport.write(self.conn.send(event))
        self.transport.close()


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    """One process, one model copy: concurrency comes from the micro-batcher, not from workers."""
    return {"http": ProblemH11Protocol, "timeout_keep_alive": settings.keepalive_s,
            "timeout_graceful_shutdown": settings.graceful_shutdown_s, "log_config": log_config(settings.log_level),
            "access_log": False}  # the app logs every request itself (middleware.RequestContext)


def prepare() -> dict[str, Any]:
    """Settings from the environment, checked (ConfigError, StoreError), libraries quietened: the
    options for ``uvicorn.run("app.main:app", ...)``."""
    try:
        settings = Settings()
    except ValidationError as e:
        raise ConfigError(str(e)) from None
    preflight(settings)
    quiet_libraries()
    return uvicorn_options(settings)
