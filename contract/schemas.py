"""Request and response bodies of the REST API (v1) and the payloads of the Celery tasks.

Field names listed in the service issue are a contract; extra fields are additions for users.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Preset = Literal["tiny", "small", "paper"]
# The generator a training or augmentation fits: the dHVAE, or a baseline of the paper in the same
# pipeline (models/dhvae.py variants, models/lsgan.py). "traditional" augmentation is CLI-only for now.
Generator = Literal["dhvae", "hvae", "vae", "lsgan"]
ID_PATTERN = r"^[a-z]{3}_[0-9a-f]{32}$"
SEED_MAX = 2**32 - 1


class JobState(StrEnum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"


TERMINAL_STATES = frozenset({JobState.succeeded, JobState.failed, JobState.cancelled})


class JobKind(StrEnum):
    training = "training"
    generation = "generation"
    augmentation = "augmentation"
    model_import = "model_import"


class ModelStatus(StrEnum):
    training = "training"  # also "importing": weights not usable yet
    ready = "ready"
    failed = "failed"
    cancelled = "cancelled"


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ---------------------------------------------------------------------------------------------- errors
class ProblemOut(BaseModel):
    file: str
    problem: str


class ErrorOut(BaseModel):
    detail: str
    problems: list[ProblemOut] = Field(default_factory=list)


# ---------------------------------------------------------------------------------------------- cohorts
class CohortOut(BaseModel):
    id: str
    cases: list[str] = Field(description="Case identifiers found in the upload.")
    channels: list[str] = Field(description="Image channels the cohort provides.")
    channel: str | None = Field(None, description="The channel the model is trained on.")
    tumour_slices: int = Field(description="Axial slices with tumour after resampling (before balancing).")
    training_slices: int | None = Field(None, description="Slices kept for training after balancing.")
    warnings: list[str]
    layout: str | None = Field(None, description="nnunet | msd | folders")
    size_bytes: int = Field(0, description="Uncompressed size of the stored cohort files.")
    created_at: datetime


class CohortList(BaseModel):
    items: list[CohortOut]


# ---------------------------------------------------------------------------------------------- requests
class TrainingRequest(_Body):
    cohort_id: str = Field(pattern=ID_PATTERN)
    model: Generator = "dhvae"
    preset: Preset = "tiny"
    steps: int = Field(ge=1)
    seed: int = Field(0, ge=0, le=SEED_MAX)
    base_model_id: str | None = Field(None, pattern=ID_PATTERN, description="Fine-tune this model.")


class GenerationRequest(_Body):
    model_id: str = Field(pattern=ID_PATTERN)
    n_pairs: int = Field(ge=1)
    seed: int = Field(0, ge=0, le=SEED_MAX)
    slices_per_volume: int = Field(1, ge=1, le=1024)
    min_mask_area: int | None = Field(None, ge=0, description="Pixels; default: the engine's floor.")


class AugmentationRequest(_Body):
    cohort_id: str = Field(pattern=ID_PATTERN)
    n_pairs: int = Field(ge=1)
    model: Generator = "dhvae"
    preset: Preset = "tiny"
    steps: int = Field(ge=1)
    seed: int = Field(0, ge=0, le=SEED_MAX)
    base_model_id: str | None = Field(None, pattern=ID_PATTERN, description="Fine-tune this model.")
    slices_per_volume: int = Field(1, ge=1, le=1024)
    min_mask_area: int | None = Field(None, ge=0)


class JobAccepted(BaseModel):
    job_id: str
    model_id: str | None = None
    links: dict[str, str] = Field(default_factory=dict)


# ---------------------------------------------------------------------------------------------- jobs
class JobProgress(BaseModel):
    done: int = 0
    total: int = 0
    unit: str = ""
    eta_s: float | None = None
    stage: str = ""
    metrics: dict[str, float] = Field(default_factory=dict)


class JobError(BaseModel):
    type: str
    message: str
    problems: list[ProblemOut] = Field(default_factory=list)


class JobOut(BaseModel):
    id: str
    kind: JobKind
    state: JobState
    progress: JobProgress
    error: JobError | None = None
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    links: dict[str, str] = Field(default_factory=dict)
    cohort_id: str | None = None
    model_id: str | None = None
    cancel_requested: bool = False
    attempts: int = Field(0, description="Deliveries so far (more than 1 after a worker was lost).")
    request: dict = Field(default_factory=dict)


class JobList(BaseModel):
    items: list[JobOut]


# ---------------------------------------------------------------------------------------------- models
class ModelOut(BaseModel):
    id: str
    status: ModelStatus
    source: Literal["training", "import"]
    job_id: str | None = None
    cohort_id: str | None = None
    base_model_id: str | None = None
    model: str | None = Field(None, description="Generator: dhvae, hvae, vae or lsgan.")
    preset: str | None = None
    steps: int | None = None
    seed: int | None = None
    created_at: datetime
    config: dict = Field(default_factory=dict, description="Model config (from the checkpoint).")
    summary: dict = Field(default_factory=dict, description="Training summary (losses, steps, duration).")


class ModelList(BaseModel):
    items: list[ModelOut]


# ---------------------------------------------------------------------------------------------- tasks
class TaskPayload(_Body):
    """What every task message carries: the job it belongs to and whose it is."""

    job_id: str
    tenant: str


class TrainTask(TaskPayload):
    cohort_id: str
    model_id: str
    model: Generator = "dhvae"
    preset: Preset
    steps: int
    seed: int
    base_model_id: str | None = None


class GenerateTask(TaskPayload):
    model_id: str
    n_pairs: int
    seed: int
    slices_per_volume: int = 1
    min_mask_area: int | None = None


class AugmentTask(TaskPayload):
    cohort_id: str
    model_id: str
    n_pairs: int
    model: Generator = "dhvae"
    preset: Preset
    steps: int
    seed: int
    base_model_id: str | None = None
    slices_per_volume: int = 1
    min_mask_area: int | None = None


class ImportTask(TaskPayload):
    model_id: str
    upload: str = Field(description="Staged checkpoint file name, relative to the tenant's staging area.")
