"""Request and response bodies of the REST API (v1) and the payloads of the Celery tasks.

Field names listed in the service issue are a contract; extra fields are additions for users.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Annotated, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field

# The names below are the wire format's copies of names the engine declares (models/config.py's
# presets, models/registry.py's generators, efficacy/segmenter.py's U-Net widths and protocols):
# this package imports nothing of ours, so tests/test_drift.py checks that the two agree.
Preset = Literal["tiny", "small", "paper"]
# The generator a training or augmentation fits: the trained generators of models/registry.py.
# "traditional" (nothing to train) is CLI-only for now.
Generator = Literal["dhvae", "hvae", "vae", "lsgan", "spade"]
# What an augmentation can use: every generator, those that train nothing (no model is made) included,
# and the donor insertions (models/registry.py's DONOR_INSERTS), which train the generator named here
# (the model the job makes) and paste its tumours into the cohort's slices.
Untrained = Literal["traditional", "insert", "insert_healthy"]
UNTRAINED: tuple[str, ...] = ("traditional", "insert", "insert_healthy")
DONOR_OF: dict[str, str] = {"insert_dhvae": "dhvae", "insert_healthy_dhvae": "dhvae"}
Method = Literal[
    "dhvae",
    "hvae",
    "vae",
    "lsgan",
    "spade",
    "traditional",
    "insert",
    "insert_healthy",
    "insert_dhvae",
    "insert_healthy_dhvae",
]
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
    evaluation = "evaluation"


class ModelStatus(StrEnum):
    training = "training"  # also "importing": weights not usable yet
    ready = "ready"
    failed = "failed"
    cancelled = "cancelled"


class _Body(BaseModel):
    # unknown fields are refused, and so are NaN and infinities (JSON has neither)
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


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


ZERO_BACKGROUND = (
    "Set each synthetic image to 0 outside its brain, the real cases' convention (false: keep the "
    "generator's grey background)."
)


class GenerationRequest(_Body):
    model_id: str = Field(pattern=ID_PATTERN)
    n_pairs: int = Field(ge=1)
    seed: int = Field(0, ge=0, le=SEED_MAX)
    slices_per_volume: int = Field(1, ge=1, le=1024)
    min_mask_area: int | None = Field(None, ge=0, description="Pixels; default: the engine's floor.")
    zero_background: bool = Field(True, description=ZERO_BACKGROUND)


class AugmentationRequest(_Body):
    cohort_id: str = Field(pattern=ID_PATTERN)
    n_pairs: int = Field(ge=1)
    model: Method = Field(
        "dhvae",
        description="The generator; traditional (flips and rotations), insert (real tumours pasted "
        "into other slices) and insert_healthy (into tumour-free slices) train nothing, so the job makes "
        "no model. insert_dhvae and insert_healthy_dhvae train a dHVAE (the job's model) and paste its "
        "tumours where insert and insert_healthy paste real ones; min_mask_area is then the dHVAE's "
        "rejection floor for the tumours it gives, and zero_background does not apply (a pasted pair is 0 "
        "outside its real slice's brain).",
    )
    preset: Preset = "tiny"
    steps: int = Field(ge=1)
    seed: int = Field(0, ge=0, le=SEED_MAX)
    base_model_id: str | None = Field(None, pattern=ID_PATTERN, description="Fine-tune this model.")
    slices_per_volume: int = Field(1, ge=1, le=1024)
    min_mask_area: int | None = Field(None, ge=0)
    zero_background: bool = Field(True, description=ZERO_BACKGROUND)
    real_cases: Literal["resampled", "uploaded"] = Field(
        "resampled",
        description="The real cases in the dataset: resampled to the model's grid and normalised (what the "
        "model saw), or as uploaded (original grid, spacing and intensities; masks by the label rule).",
    )


Baseline = Literal["traditional", "insert", "insert_healthy", "vae", "hvae", "lsgan", "spade"]
# The arms of a cross-validated evaluation: efficacy/crossval.py's ARMS (the drift test checks).
Arm = Literal[
    "real",
    "real_aug",
    "real_fixed_epochs",
    "traditional",
    "insert",
    "insert_online",
    "insert_online_unscaled",
    "insert_online_tumour",
    "insert_online_tumour_dhvae",
    "insert_online_tumour_dhvae_lcc",
    "insert_online_p25",
    "insert_healthy",
    "dhvae",
    "dhvae_pretrain",
    "insert_dhvae",
    "insert_healthy_dhvae",
    "vae",
    "masks_first",
    "insert_filtered",
    "dhvae_filtered",
]  # every generator of the registry but dhvae
Protocol = Literal["fixed_epochs", "step_matched"]
UnetWidths = Literal["paper", "small", "tiny"]


class EvaluationRequest(_Body):
    """Does augmenting this cohort help, and with how many pairs? (issue 4; efficacy/grid.py)

    The cohort is split by patient; a generator is fitted on the training patients only (or
    ``model_id``, which must not have been trained on this cohort), and a 2D U-Net is trained on the
    training patients' slices + N synthetic pairs for each N and seed, then tested on the test patients.
    """

    cohort_id: str = Field(pattern=ID_PATTERN)
    model_id: str | None = Field(
        None, pattern=ID_PATTERN, description="A ready model of yours, trained on another cohort."
    )
    model: Generator = Field("dhvae", description="Generator to fit on the training patients (no model_id).")
    preset: Preset = "tiny"
    steps: int = Field(300, ge=1, description="Generator training steps (no model_id).")
    n_pairs: list[Annotated[int, Field(ge=1)]] = Field(
        [250, 500, 1000], min_length=1, max_length=10, description="The N > 0 to try (N = 0 always runs)."
    )
    seeds: (
        Annotated[int, Field(ge=1, le=20)]
        | Annotated[list[Annotated[int, Field(ge=0, le=SEED_MAX)]], Field(min_length=1, max_length=20)]
    ) = Field(5, description="U-Net seeds: a count n (seeds 0..n-1) or the seeds themselves.")
    test_fraction: float = Field(0.3, gt=0.0, lt=1.0, description="Share of patients held out for testing.")
    split_seed: int = Field(0, ge=0, le=SEED_MAX)
    protocols: list[Protocol] = Field(["fixed_epochs", "step_matched"], min_length=1)
    baselines: list[Baseline] = Field([], description="Other augmentations to compare in the same run.")
    unet: UnetWidths = Field("paper", description="U-Net widths (UNET_WIDTHS).")
    unet_epochs: int = Field(40, ge=1, le=400, description="Epochs of the fixed_epochs protocol (paper: 40).")
    design: Literal["split", "crossval"] = Field(
        "split",
        description="split: one patient split, the method x N x seed grid (test_fraction, n_pairs, "
        "protocols, baselines). crossval: patient-level cross-validation over `folds` folds, the `arms` "
        "against the strong baseline (real slices with online augmentation), a step budget chosen on an "
        "inner validation (`inner_patients` held-out training patients), paired gains with a patient-bootstrap interval, and a recommendation (its arm and N, and whether to keep only the largest 3D connected component of a prediction, chosen on the same held-out training patients).",
    )
    folds: int = Field(3, ge=2, le=10, description="crossval: folds (every patient is tested once).")
    max_steps: int = Field(
        1200,
        ge=10,
        le=20000,
        description="crossval: the longest inner-validation run; the budget is where its validation Dice "
        "stops improving, checked every tenth of it.",
    )
    unet_optimizer: Literal["rmsprop", "adam"] = Field(
        "rmsprop",
        description="crossval: every U-Net's optimiser: rmsprop (the authors', lr 1e-4, momentum 0.999) or "
        "adam (lr 1e-3; chosen on held-out training patients of the shared BraTS cases: "
        "bench/results/inner_probe.md).",
    )
    inner_patients: int = Field(
        2,
        ge=1,
        le=5,
        description="crossval: training patients held out in turn to choose each fold's step budget "
        "(their validation curves averaged; at most all but one of the fold's training patients).",
    )
    arms: list[Arm] = Field(
        ["real", "real_aug", "insert", "insert_online"],
        min_length=1,
        max_length=len(get_args(Arm)),
        description="crossval: the arms (efficacy/crossval.py ARMS); real_aug, the strong baseline, is always run.",
    )

    def seed_list(self) -> list[int]:
        return list(range(self.seeds)) if isinstance(self.seeds, int) else sorted(set(self.seeds))

    def n_runs(self) -> int:
        """U-Nets the evaluation trains. split: (real-only + each generator at each N) x seeds x
        protocols; crossval: (arms, the strong baseline included) x folds x seeds, plus
        ``inner_patients`` inner-validation runs per fold (at most)."""
        if self.design == "crossval":
            arms = set(self.arms) | {"real_aug"}
            return len(arms) * self.folds * len(self.seed_list()) + self.folds * self.inner_patients
        n_generators = 1 + len(set(self.baselines) - {self.model})
        return (1 + n_generators * len(set(self.n_pairs))) * len(self.seed_list()) * len(set(self.protocols))


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
    warnings: list[str] = Field(
        default_factory=list,
        description="What a user should know about the result: e.g. a generator of an evaluation that "
        "produced no pairs, or a split too small for its intervals to mean much.",
    )


class PairOut(BaseModel):
    case: str = Field(description="The pair's case name in the dataset (synth_NNNNN).")
    slices: int
    mask_area_px: int = Field(description="Tumour pixels over all of the pair's slices.")


class PairPage(BaseModel):
    total: int = Field(description="Generated pairs on disk so far.")
    offset: int
    items: list[PairOut]


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
# A task's payload is its request plus what the API resolved: the job, the tenant and the model id it
# reserved. The request classes are the one definition of a job's parameters.
class TaskPayload(_Body):
    """What every task message carries: the job it belongs to and whose it is."""

    job_id: str
    tenant: str


class TrainTask(TaskPayload, TrainingRequest):
    model_id: str


class GenerateTask(TaskPayload, GenerationRequest):
    pass


class AugmentTask(TaskPayload, AugmentationRequest):
    model_id: str | None = None  # None for a generator that trains nothing


class EvaluateTask(TaskPayload, EvaluationRequest):
    """``model`` is the generator to evaluate (the one of ``model_id`` when that is given)."""


class ImportTask(TaskPayload):
    model_id: str
    upload: str = Field(description="Staged checkpoint file name, relative to the tenant's staging area.")
