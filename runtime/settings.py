"""Settings the API and the workers share (environment variables with the ``DHVAE_`` prefix).

Every variable is listed, with its default, in ``.env.example``.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class CommonSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DHVAE_", env_file=None, extra="ignore")

    data_dir: Path = Field(
        Path("data"), description="Root of cohorts, models and outputs, one folder per tenant."
    )
    redis_url: str | None = Field(
        None, description="Broker and job records. Unset: `make run` starts an embedded redis-server."
    )
    queue: str = Field("dhvae", description="Celery queue the API sends to and the workers consume.")
    visibility_timeout_s: int = Field(
        7 * 24 * 3600,
        description="Redis transport visibility timeout: longer than the longest job, or a running job is "
        "delivered a second time.",
    )
    job_lease_s: float = Field(
        30.0,
        gt=0,
        description="A running job holds a lease renewed every lease/3 s; a redelivered job waits for a dead "
        "worker's lease to expire before it resumes.",
    )
    job_ttl_s: int = Field(30 * 24 * 3600, description="How long finished job records are kept in Redis.")
    log_level: str = Field("INFO", description="Python logging level of the API and the workers.")

    def require_redis_url(self) -> str:
        if not self.redis_url:
            raise RuntimeError(
                "DHVAE_REDIS_URL is not set: point it at a Redis server (e.g. redis://localhost:6379/0), "
                "or start the whole stack with `make run`, which starts an embedded one."
            )
        return self.redis_url
