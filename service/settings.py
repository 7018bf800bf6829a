"""API settings: environment variables with the ``DHVAE_`` prefix (all listed in ``.env.example``)."""

from __future__ import annotations

from functools import lru_cache

from pydantic import Field

from runtime.settings import CommonSettings


class Settings(CommonSettings):
    host: str = Field("127.0.0.1", description="Address uvicorn binds (`make run`).")
    port: int = Field(8000, description="Port uvicorn listens on (`make run`).")
    api_keys: str = Field(
        "",
        description="Comma-separated `tenant:key` pairs; `tenant:sha256:<hex>` gives a key by its hash.",
    )
    max_upload_bytes: int = Field(2 << 30, description="Largest request body (cohort zip or checkpoint).")
    max_uncompressed_bytes: int = Field(8 << 30, description="Largest total size a cohort zip extracts to.")
    max_compression_ratio: float = Field(
        1000.0, description="Largest per-entry compression ratio (entries over 1 MiB)."
    )
    max_archive_ratio: float = Field(
        200.0, description="Largest compression ratio of a whole cohort zip past 64 MiB (a real one: ~27)."
    )
    max_archive_files: int = Field(20_000, description="Most entries a cohort zip may hold.")
    tenant_quota_bytes: int = Field(
        100 << 30,
        description="Most bytes one tenant may store (cohorts, models, outputs, caches); 507 past it.",
    )
    max_steps: int = Field(1_000_000, description="Largest `steps` a training may ask for.")
    max_pairs: int = Field(100_000, description="Largest `n_pairs` a generation may ask for.")
    max_evaluation_runs: int = Field(
        400, description="Most U-Net trainings one evaluation may ask for (its grid: N x seeds x protocols)."
    )
    max_json_bytes: int = Field(1 << 20, description="Largest JSON request body (413 past it).")
    body_timeout_s: float = Field(
        30.0, gt=0, description="Longest pause while a request body is read (408 past it)."
    )
    drain_bytes: int = Field(
        64 << 20,
        description="Unread body bytes drained before an early 401/413, so that the client can read it.",
    )
    validation_slots: int = Field(
        2, ge=1, description="Uploads validated at once over all tenants (one at a time per tenant)."
    )
    validation_deadline_s: float = Field(
        600.0, gt=0, description="Longest extraction + validation of one upload (422 past it)."
    )
    max_active_jobs: int = Field(
        8, ge=1, description="Most queued or running jobs one tenant may have (429 with Retry-After past it)."
    )
    idempotency_ttl_s: int = Field(24 * 3600, description="How long an Idempotency-Key is remembered.")
    import_wait_s: float = Field(
        60.0, description="POST /v1/models waits this long for a worker to validate the checkpoint, then 202."
    )
    download_poll_s: float = Field(
        0.5, description="How often a download of a running job looks for new pairs."
    )
    ready_timeout_s: float = Field(1.0, description="How long /health/ready waits for a worker to answer.")


@lru_cache
def get_settings() -> Settings:
    return Settings()
