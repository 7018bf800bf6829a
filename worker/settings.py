"""Worker settings: environment variables with the ``DHVAE_`` prefix (all listed in ``.env.example``)."""

from __future__ import annotations

from functools import lru_cache

from pydantic import Field

from runtime.settings import CommonSettings


class WorkerSettings(CommonSettings):
    torch_threads: int | None = Field(
        None, ge=1, description="torch.set_num_threads in the worker process (unset: torch's default)."
    )
    progress_interval_s: float = Field(
        0.25, description="Least time between two progress writes to Redis (stage changes always go)."
    )
    janitor_interval_s: float = Field(
        60.0,
        description="How often a worker re-queues jobs whose worker died (no lease) instead of waiting "
        "for the visibility timeout. 0 turns it off.",
    )


@lru_cache
def get_settings() -> WorkerSettings:
    return WorkerSettings()
