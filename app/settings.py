"""Service settings, read from ``STRIDE_*`` environment variables (or a ``.env`` file)."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

REDIS_SCHEMES = ("redis", "rediss", "unix")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="STRIDE_", env_file=".env", extra="ignore")

    store: Path | None = Field(None, description="Operator store directory (required to serve).")
    model: Path | None = Field(None, description="Model directory, if it moved since the build.")
    device: str | None = Field(None, description="cpu, cuda, cuda:1 ...; default cuda when present.")
    verify_store: bool = Field(True, description="Check every store file's sha256 at start-up.")
    warmup: bool = Field(True, description="Run one query before reporting ready.")
    reload_poll_s: float = Field(0.0, ge=0, description="Watch the store path every this many seconds (a `current` "
                                 "symlink flipped, a store replaced in place) and reload when its version changes; "
                                 "0: only POST /v1/admin/reload.")
    admin_keys: str = Field("", description="Comma-separated keys for /v1/admin (hot reload); never query keys, "
                            "which get 403 there. Empty: admin routes off.")

    redis_url: str | None = Field(None, description="redis://host:port/db; unset disables the cache.")
    cache_namespace: str = Field("stride", description="Key prefix, so deployments can share a Redis.")
    cache_ttl_s: int = Field(7 * 24 * 3600, ge=1)
    redis_timeout_ms: int = Field(100, ge=1, description="Per-call budget; a slow Redis counts as down.")
    breaker_failures: int = Field(3, ge=1, description="Consecutive Redis failures that open the breaker.")
    breaker_reset_s: float = Field(30.0, gt=0, description="How long an open breaker skips Redis.")

    api_keys: str = Field("", description="Comma-separated keys; empty disables auth.")
    metrics_need_key: bool = Field(False, description="Ask for a key on /metrics too (most scrapers send none).")

    max_top_k: int = Field(100, ge=1)
    max_batch_queries: int = Field(64, ge=1, description="Queries in one POST /v1/attribute/batch.")
    max_prompt_chars: int = Field(20_000, ge=1, description="Per prompt and per completion.")
    max_body_bytes: int = Field(1_000_000, ge=1024)

    batch_max_size: int = Field(32, ge=1, description="Queries coalesced into one forward pass and solve.")
    batch_max_wait_ms: float = Field(5.0, ge=0, description="How long the first query waits for company.")
    queue_max: int = Field(256, ge=1, description="Queued queries beyond which requests get 503.")
    torch_threads: int = Field(0, ge=0, description="Intra-op threads of the model thread on CPU (process-wide); "
                               "0 leaves torch's default, one per core.")
    request_timeout_s: float = Field(30.0, gt=0, description="Deadline per request from its arrival, queueing "
                                     "included; past it, 504.")
    retry_after_s: int = Field(1, ge=1)
    max_queue_wait_s: float = Field(1.0, gt=0, description="Shed a request (503 + Retry-After, before its body is "
                                    "read) when the event loop's backlog plus the model work of the requests "
                                    "already admitted would take longer than this: answered latency stays near "
                                    "this plus one batch however many clients come (bench/results/load.md).")
    max_inflight: int = Field(512, ge=1, description="HTTP requests in progress (probes and /metrics excepted) "
                              "beyond which new ones get 503 + Retry-After.")
    body_timeout_s: float = Field(10.0, gt=0, description="Time to receive a whole request body; a slower or "
                                  "short body gets 408 and its connection closed.")
    keepalive_s: float = Field(75.0, gt=0, description="Idle keep-alive connections close after this; longer "
                               "than clients' pool expiry (httpx 5 s, aiohttp 15 s) so a reused connection is not "
                               "closed under a request in flight.")
    graceful_shutdown_s: float = Field(30.0, gt=0, description="On SIGTERM, how long in-flight requests may finish.")

    log_level: str = "INFO"
    log_prompts: bool = Field(False, description="Log prompt text (off: logs carry no user text).")

    # background scan jobs (/v1/jobs, `stride worker-jobs`): need redis_url
    jobs_dir: Path = Field(Path("stride-jobs"), description="Worker side: one directory per job (its input and "
                           "the scan's resumable state); removed once the job's record expires.")
    jobs_result_ttl_s: int = Field(24 * 3600, ge=1, description="A job's record and result are forgotten this long "
                                   "after their last write.")
    jobs_result_rows: int = Field(1000, ge=1, description="Ranked rows of a scan kept in Redis for GET .../result "
                                  "(the whole examples.jsonl stays in the job's directory).")
    jobs_max_per_key: int = Field(2, ge=1, description="Jobs one API key may have queued or running; beyond, 429 "
                                  "+ Retry-After.")
    jobs_max_queries: int = Field(10_000, ge=1, description="Queries in one scan job (413 beyond).")
    jobs_retry_after_s: int = Field(30, ge=1, description="Retry-After of a 429 (too many jobs) or a Redis outage.")
    jobs_timeout_s: int = Field(24 * 3600, ge=1, description="Longest a scan job may run (arq's lock on it; a "
                                "worker killed outright stops its heartbeat, and its job is queued again "
                                "15 s later; a SIGTERM re-queues it at once).")
    jobs_chunk: int = Field(32, ge=1, description="Queries per scan chunk: the granularity of progress, "
                            "cancellation and resume.")

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, url: str | None) -> str | None:
        """Checked when the settings are read, before any model loads (a typo used to surface 40 s later)."""
        if not url:
            return None
        parts = urlsplit(url)
        if parts.scheme not in REDIS_SCHEMES:
            raise ValueError(f"{url!r}: the scheme must be one of {', '.join(REDIS_SCHEMES)} (redis://host:port/db)")
        try:
            _ = parts.port  # parsed lazily: raises on a port that is no number or out of range
        except ValueError as e:
            raise ValueError(f"{url!r}: {e}") from None
        db = parts.path.strip("/")
        if parts.scheme != "unix" and not parts.hostname:
            raise ValueError(f"{url!r}: no host (redis://host:port/db)")
        if parts.scheme != "unix" and db and not db.isdigit():
            raise ValueError(f"{url!r}: the database must be a number, not {db!r}")
        return url

    def keys(self) -> list[str]:
        return [k.strip() for k in self.api_keys.split(",") if k.strip()]
