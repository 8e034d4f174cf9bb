"""Service settings, read from ``STRIDE_*`` environment variables (or a ``.env`` file)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="STRIDE_", env_file=".env", extra="ignore")

    store: Path | None = Field(None, description="Operator store directory (required to serve).")
    model: Path | None = Field(None, description="Model directory, if it moved since the build.")
    device: str | None = Field(None, description="cpu, cuda, cuda:1 ...; default cuda when present.")
    verify_store: bool = Field(True, description="Check every store file's sha256 at start-up.")
    warmup: bool = Field(True, description="Run one query before reporting ready.")

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
    request_timeout_s: float = Field(30.0, gt=0, description="Deadline per request; past it, 504.")
    retry_after_s: int = Field(1, ge=1)

    log_level: str = "INFO"
    log_prompts: bool = Field(False, description="Log prompt text (off: logs carry no user text).")

    def keys(self) -> list[str]:
        return [k.strip() for k in self.api_keys.split(",") if k.strip()]
