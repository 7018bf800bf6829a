"""The four things a user does, each one function: ingest, train, generate, augment (= all three).

The CLI (pipeline/cli.py), the Celery worker (worker/tasks.py) and the efficacy grid call these and
nothing deeper. What a training or a generation is asked for travels as one value, a :class:`TrainSpec`
or a :class:`SampleSpec`, validated here once at the engine's entry; their field names are the request
fields of ``contract/schemas.py``, so a request becomes a spec with :func:`spec_from`.

Each is restartable: ``train`` resumes from ``model_dir/last.pt``; ``generate`` keeps the pairs already
on disk and continues the same random stream (imaging/journal.py), so a killed job finishes
byte-identical to one that was never interrupted.
"""

from __future__ import annotations

import itertools
import logging
import shutil
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from imaging import __version__
from imaging.cohort import CohortSpec
from imaging.errors import CheckpointError, DHVAEError
from imaging.export import MAX_SYNTHETIC, REAL_CASES, NnUNetExporter
from imaging.files import atomic_file, sha256_file, write_json_atomic
from imaging.ingest import IngestResult, ingest
from imaging.journal import Journal, complete_prefix
from imaging.preprocess import ResampledCase, zero_background
from imaging.progress import ProgressFn, Reporter, StopFn
from models.checkpoint import load_checkpoint, model_from_checkpoint
from models.config import PRESETS, DHVAEConfig, SamplingConfig, get_preset
from models.dhvae import DHVAE
from models.registry import (
    DEFAULT,
    DONOR_INSERTS,
    TRAINED,
    DonorInsert,
    build_model,
    get_generator,
    trained_generator,
)
from models.sampler import BatchDone, sample_array, sample_pairs
from models.train import Trainable, fit

log = logging.getLogger(__name__)

__all__ = ["ingest", "train", "generate", "augment", "TrainSpec", "SampleSpec", "spec_from"]

Spec = TypeVar("Spec", "TrainSpec", "SampleSpec")


@dataclass(frozen=True)
class TrainSpec:
    """A training: which generator (:mod:`models.registry`; a donor insertion trains its donor), preset,
    steps and seed, an optional base checkpoint to fine-tune from, and dotted config overrides
    (``{"loss.alpha": 0.01}``)."""

    model: str = DEFAULT
    preset: str = "small"
    steps: int = 1000
    seed: int = 0
    base_checkpoint: Path | None = None
    overrides: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        trained_generator(self.model)  # a DHVAEError naming the choices
        if self.preset not in PRESETS:
            raise DHVAEError(f"unknown preset {self.preset!r}; choose one of {', '.join(PRESETS)}")
        if self.steps < 1 or self.seed < 0:
            raise DHVAEError(f"steps must be at least 1 and seed at least 0 (got {self.steps}, {self.seed})")


@dataclass(frozen=True)
class SampleSpec:
    """A generation: ``n_pairs`` synthetic volumes of ``slices_per_volume`` slices each, drawn with
    ``seed``; ``min_mask_area`` (pixels) overrides the model's rejection floor. ``zero_background``
    (our deviation, on by default; the paper says nothing of it): each synthetic image is set to 0
    outside its brain (:func:`imaging.preprocess.zero_background`), the real cases' convention."""

    n_pairs: int
    seed: int = 0
    slices_per_volume: int = 1
    min_mask_area: int | None = None
    zero_background: bool = True
    real_cases: str = (
        "resampled"  # an augmentation's real cases: "resampled" or "uploaded" (export.REAL_CASES)
    )

    def __post_init__(self) -> None:
        if not 1 <= self.n_pairs <= MAX_SYNTHETIC or self.slices_per_volume < 1:
            raise DHVAEError(
                f"n_pairs must be in [1, {MAX_SYNTHETIC}] and slices_per_volume at least 1 "
                f"(got {self.n_pairs}, {self.slices_per_volume})"
            )
        if self.seed < 0 or (self.min_mask_area is not None and self.min_mask_area < 0):
            raise DHVAEError("seed and min_mask_area must be >= 0")
        if self.real_cases not in REAL_CASES:
            raise DHVAEError(f"real_cases must be one of {', '.join(REAL_CASES)}, got {self.real_cases!r}")


def spec_from(cls: type[Spec], values: Mapping[str, Any], **extra: Any) -> Spec:
    """A spec from a request's fields (or the CLI's arguments): every field of ``cls`` found in
    ``values`` (None leaves the default), plus ``extra``."""
    known = {f.name for f in fields(cls)}
    picked = {k: v for k, v in values.items() if k in known and v is not None}
    return cls(**{**picked, **extra})


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# --- train ----------------------------------------------------------------------------------------


def make_config(spec: TrainSpec, image_size: int) -> DHVAEConfig:
    """The spec's preset with its generator, steps, seed and the slice size, plus its dotted overrides."""
    run = {
        "model": trained_generator(spec.model) or spec.model,
        "train.steps": spec.steps,
        "train.seed": spec.seed,
    }
    cfg = get_preset(spec.preset).replace(**{**run, "network.image_size": image_size, **spec.overrides})
    if cfg.model not in TRAINED:
        raise DHVAEError(f"generator {cfg.model!r} trains nothing; choose one of {', '.join(TRAINED)}")
    n_down = len(cfg.network.channel_mult) - 1
    if cfg.network.image_size % 2**n_down:
        raise DHVAEError(
            f"slice size {cfg.network.image_size} is not divisible by {2**n_down} (the network downsamples)"
        )
    return cfg


def attach_perceptual(model: Trainable, cfg: DHVAEConfig, device: torch.device | str) -> None:
    """Give the model its frozen LPIPS-VGG16 when the config asks for it (raises WeightsMissing)."""
    if isinstance(model, DHVAE) and model.needs_perceptual:
        from models.perceptual import LPIPS

        net = LPIPS(input_range=cfg.loss.perceptual_input_range, channels_last=cfg.train.channels_last)
        model.set_perceptual(net.to(device))


def train(
    data: Path | IngestResult,
    spec: TrainSpec,
    *,
    model_dir: Path,
    cache_dir: Path | None = None,
    progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
    device: torch.device | str | None = None,
) -> Path:
    """Train (or fine-tune from ``spec.base_checkpoint``) a model on a cohort; returns ``model_dir/model.pt``.

    ``data`` is a cohort folder or the result of :func:`ingest`. A previous run killed in the same
    ``model_dir`` is resumed from ``last.pt``; a finished one is returned as is.
    """
    device = device or default_device()
    ing = (
        data if isinstance(data, IngestResult) else ingest(Path(data), cache_dir=cache_dir, progress=progress)
    )
    slices = ing.slices
    if len(slices.case_ids) == 0:
        raise DHVAEError("the cohort has no training slice over the tumour-area floor")
    cfg = make_config(spec, image_size=slices.slices.shape[-1])
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    final, last = model_dir / "model.pt", model_dir / "last.pt"
    if final.exists() and load_checkpoint(final)["config_obj"] == cfg:
        return final

    torch.manual_seed(spec.seed)
    model = build_model(cfg)
    if spec.base_checkpoint is not None and not last.exists():
        _load_base(model, cfg, Path(spec.base_checkpoint))
    attach_perceptual(model, cfg, device)
    grid = slices.cases[0].affine if slices.cases else np.eye(4)
    extra = {"grid_affine": np.asarray(grid, dtype=np.float64).tolist(), "channel": ing.channel}
    result = fit(
        model,
        torch.from_numpy(slices.slices),
        cfg,
        checkpoint=last,
        progress=progress,
        should_stop=should_stop,
        device=device,
        extra=extra,
    )
    with open(last, "rb") as src, atomic_file(final) as dst:
        shutil.copyfileobj(src, dst)
    write_json_atomic(
        model_dir / "model.json",
        {
            "config": cfg.to_dict(),
            "channel": ing.channel,
            "base_checkpoint": str(spec.base_checkpoint) if spec.base_checkpoint else None,
            "training_slices": len(slices.case_ids),
            "cases": sorted(set(slices.case_ids)),
            "final_metrics": result.metrics,
            "code_version": __version__,
        },
    )
    return final


def _load_base(model: Trainable, cfg: DHVAEConfig, path: Path) -> None:
    """Fine-tuning: start from a base model's weights; its network must be the one ``cfg`` builds."""
    payload = load_checkpoint(path)
    base_cfg: DHVAEConfig = payload["config_obj"]
    if (base_cfg.model, base_cfg.network, base_cfg.discriminator) != (
        cfg.model,
        cfg.network,
        cfg.discriminator,
    ):
        raise CheckpointError(
            f"{path.name}: base model is a {base_cfg.model!r}/{base_cfg.preset!r} network, but preset "
            f"{cfg.preset!r} at {cfg.network.image_size} px builds a different one; fine-tune with the same preset"
        )
    model.load_state_dict(payload["model"], strict=True)


# --- generate -------------------------------------------------------------------------------------


@dataclass
class GenerateResult:
    out_dir: Path
    n_pairs: int
    slices_per_volume: int
    draws: int
    acceptance: float
    resumed_from: int


def generate(
    checkpoint: Path,
    spec: SampleSpec,
    *,
    out_dir: Path,
    real_cases: Iterable[ResampledCase] | None = None,
    manifest_extras: dict[str, Any] | None = None,
    progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
    device: torch.device | str | None = None,
    label_rule: str = "whole tumour (label > 0)",
) -> GenerateResult:
    """Write ``spec.n_pairs`` synthetic image/mask volumes (``spec.slices_per_volume`` slices each) to
    ``out_dir``: nnU-Net v2 raw layout, plus ``real_cases`` if given, ``dataset.json`` and ``manifest.json``.
    """
    device = device or default_device()
    model, payload = model_from_checkpoint(Path(checkpoint), map_location=device)
    cfg: DHVAEConfig = payload["config_obj"]
    sampling = cfg.sampling if spec.min_mask_area is None else _with_floor(cfg, spec.min_mask_area)
    size = cfg.network.image_size
    extra = payload.get("extra", {})
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    exporter = NnUNetExporter(
        out_dir,
        str(extra.get("channel", "image")).upper(),
        grid=extra.get("grid_affine", np.eye(4)),
        slice_shape=(size, size),
        real_cases_geometry=spec.real_cases,
        label_rule=label_rule,
    )
    for case in real_cases or []:
        exporter.add_real_case(case)

    settings = {
        "checkpoint_sha256": sha256_file(Path(checkpoint)),
        "seed": spec.seed,
        "n_pairs": spec.n_pairs,
        "slices_per_volume": spec.slices_per_volume,
        "sampling": {**vars(sampling)},
        "zero_background": spec.zero_background,
    }
    journal = Journal.open(out_dir, settings)
    done = complete_prefix(out_dir, spec.n_pairs)
    per_volume = spec.slices_per_volume
    first = done * per_volume  # index of the first pair (slice) still to write
    start_batch, accepted_before, passed_before = journal.resume_point(first)
    reporter = Reporter("generate", spec.n_pairs, "pairs", progress, should_stop, start=done)
    reporter.report(done)

    model.to(device)
    writer = None
    try:
        for item in sample_pairs(
            model,
            spec.n_pairs * per_volume,
            seed=spec.seed,
            cfg=sampling,
            image_size=size,
            start_batch=start_batch,
            accepted_before=accepted_before,
            passed_before=passed_before,
            device=device,
        ):
            if isinstance(item, BatchDone):
                journal.record_batch(item.batch, item.accepted_total, item.passed_total, item.draws_total)
                # a generation that rejects most draws still shows that it works, and how well
                written = max(done, min(item.accepted_total // per_volume, spec.n_pairs))
                reporter.report(
                    written,
                    draws=float(item.draws_total),
                    acceptance=item.passed_total / max(item.draws_total, 1),
                )
                continue
            if item.index < first:
                continue  # written before an interruption
            volume, k = divmod(item.index, per_volume)
            if k == 0:
                reporter.check_cancelled()
                writer = exporter.open_synthetic(volume, per_volume)
            assert writer is not None
            writer.write(
                zero_background(item.image, item.mask) if spec.zero_background else item.image, item.mask
            )
            if k == per_volume - 1:
                writer.close()
                writer = None
                reporter.report(volume + 1)
    finally:
        if writer is not None:
            writer.abort()

    draws, passed = journal.draws, journal.passed
    exporter.finalize(
        {
            "generator": {
                "model": cfg.model,
                "preset": cfg.preset,
                "config": cfg.to_dict(),
                "checkpoint_sha256": settings["checkpoint_sha256"],
                "trained_steps": payload["step"],
            },
            "generation": {
                "seed": spec.seed,
                "n_pairs": spec.n_pairs,
                "slices_per_volume": per_volume,
                "min_mask_area": sampling.area_floor(size),
                "zero_background": spec.zero_background,
                "draws": draws,
                "acceptance": round(passed / draws, 6) if draws else None,
            },
            **(manifest_extras or {}),
        }
    )
    return GenerateResult(out_dir, spec.n_pairs, per_volume, draws, passed / draws if draws else 0.0, done)


def _with_floor(cfg: DHVAEConfig, area: int) -> SamplingConfig:
    return cfg.replace(**{"sampling.min_mask_area": area}).sampling


# --- augment --------------------------------------------------------------------------------------


@dataclass
class AugmentResult:
    out_dir: Path
    checkpoint: Path | None  # None for a generator that trains nothing ("traditional", "insert")
    ingest: dict[str, Any]
    generation: GenerateResult


def augment(
    data: Path | IngestResult,
    train_spec: TrainSpec,
    sample_spec: SampleSpec,
    *,
    out_dir: Path,
    model_dir: Path | None = None,
    cache_dir: Path | None = None,
    progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
    device: torch.device | str | None = None,
) -> AugmentResult:
    """Ingest a cohort (a folder, or the result of :func:`ingest`), train (or fine-tune) on it, and
    write the augmented dataset to ``out_dir``.

    ``train_spec.model`` names a generator of :mod:`models.registry`; one that trains nothing
    ("traditional": flips and rotations of the real slices; "insert": real tumours pasted into other
    slices) goes straight to the export. A donor insertion (``models.registry.DONOR_INSERTS``) trains
    its donor generator and pastes that generator's tumours into the cohort's slices
    (:func:`generate_inserted`).
    """
    out_dir = Path(out_dir)
    model_dir = Path(model_dir) if model_dir else out_dir.parent / f".{out_dir.name}.model"
    ing = (
        data if isinstance(data, IngestResult) else ingest(Path(data), cache_dir=cache_dir, progress=progress)
    )
    cohort_info = {
        "cohort": {
            k: ing.summary[k] for k in ("layout", "cases", "channel", "tumour_slices", "training_slices")
        }
    }
    hooks: dict[str, Any] = {"progress": progress, "should_stop": should_stop}
    if trained_generator(train_spec.model) is None:
        gen = generate_untrained(
            ing,
            train_spec.model,
            sample_spec,
            out_dir=out_dir,
            manifest_extras=cohort_info,
            real=real_cases(data, ing, sample_spec),
            **hooks,
        )
        return AugmentResult(out_dir, None, ing.summary, gen)
    ckpt = train(ing, train_spec, model_dir=model_dir, device=device, **hooks)
    if train_spec.model in DONOR_INSERTS:
        gen = generate_inserted(
            ckpt,
            ing,
            DONOR_INSERTS[train_spec.model],
            sample_spec,
            out_dir=out_dir,
            real=real_cases(data, ing, sample_spec),
            manifest_extras=cohort_info,
            device=device,
            **hooks,
        )
        return AugmentResult(out_dir, ckpt, ing.summary, gen)
    gen = generate(
        ckpt,
        sample_spec,
        out_dir=out_dir,
        real_cases=real_cases(data, ing, sample_spec),
        manifest_extras=cohort_info,
        device=device,
        **hooks,
    )
    return AugmentResult(out_dir, ckpt, ing.summary, gen)


def uploaded_cases(cohort_dir: Path, spec: CohortSpec) -> Iterator[ResampledCase]:
    """The cohort's cases as uploaded (original grid, spacing and intensities of ``spec``'s channel;
    the mask by its label rule), one at a time."""
    from imaging.cohort import load_case, read_cohort

    for case in read_cohort(Path(cohort_dir), spec).cases:
        image, mask, affine = load_case(case, spec)
        yield ResampledCase(case.case_id, image, mask, affine)


def real_cases(data: Path | IngestResult, ing: IngestResult, spec: SampleSpec) -> Iterable[ResampledCase]:
    """The real cases an augmentation exports: resampled (what the model saw) or as uploaded."""
    if spec.real_cases == "resampled":
        return ing.slices.cases
    if isinstance(data, IngestResult):
        raise DHVAEError("real_cases='uploaded' needs the cohort folder, not an ingested cohort")
    return uploaded_cases(Path(data), CohortSpec(channel=ing.channel))


def generate_untrained(
    ing: IngestResult,
    model: str,
    spec: SampleSpec,
    *,
    out_dir: Path,
    real: Iterable[ResampledCase] | None = None,
    manifest_extras: dict[str, Any] | None = None,
    progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
) -> GenerateResult:
    """A generator that trains nothing, in the same export: its pairs drawn from the cohort's slices
    (``models.registry`` ``draw``: flips and rotations, or pasted tumours), the real cases, dataset.json
    and manifest.json. Deterministic per seed."""
    entry = get_generator(model)
    pairs = entry.draw(ing.slices, spec.n_pairs * spec.slices_per_volume, spec.seed)
    return _export_drawn(
        ing,
        pairs,
        spec,
        {"model": model, "config": {**vars(entry.config), "version": entry.version}},
        out_dir=out_dir,
        real=real,
        manifest_extras=manifest_extras,
        progress=progress,
        should_stop=should_stop,
    )


def generate_inserted(
    checkpoint: Path,
    ing: IngestResult,
    recipe: DonorInsert,
    spec: SampleSpec,
    *,
    out_dir: Path,
    real: Iterable[ResampledCase] | None = None,
    manifest_extras: dict[str, Any] | None = None,
    progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
    device: torch.device | str | None = None,
) -> GenerateResult:
    """A donor insertion's export: ``recipe.donor_count`` pairs sampled from the generator at
    ``checkpoint`` (with ``spec.seed``, and ``spec.min_mask_area`` as its rejection floor if given), their
    tumours pasted into the cohort's recipient slices (:meth:`models.registry.DonorInsert.pairs`), in
    the export of :func:`generate_untrained`. Deterministic per (checkpoint, seed)."""
    device = device or default_device()
    model, payload = model_from_checkpoint(Path(checkpoint), map_location=device)
    cfg: DHVAEConfig = payload["config_obj"]
    size = cfg.network.image_size
    if ing.slices.slices.shape[-2:] != (size, size):
        raise DHVAEError(
            f"the {cfg.model} model makes {size} px slices; the cohort's are {ing.slices.slices.shape[-1]} px"
        )
    sampling = cfg.sampling if spec.min_mask_area is None else _with_floor(cfg, spec.min_mask_area)
    total = spec.n_pairs * spec.slices_per_volume
    donors = sample_array(
        model.to(device),
        recipe.donor_count(total),
        seed=spec.seed,
        cfg=sampling,
        image_size=size,
        device=device,
    )
    generator = {
        "model": recipe.name,
        "donor": {
            "model": cfg.model,
            "preset": cfg.preset,
            "checkpoint_sha256": sha256_file(Path(checkpoint)),
            "trained_steps": payload["step"],
            "pairs": len(donors),
            "min_mask_area": sampling.area_floor(size),
        },
        "config": {**vars(recipe.config), "version": recipe.version},
    }
    return _export_drawn(
        ing,
        recipe.pairs(donors, ing.slices.cases, total, seed=spec.seed),
        spec,
        generator,
        out_dir=out_dir,
        real=real,
        manifest_extras=manifest_extras,
        progress=progress,
        should_stop=should_stop,
    )


def _export_drawn(
    ing: IngestResult,
    pairs: Iterator[np.ndarray],
    spec: SampleSpec,
    generator: dict[str, Any],
    *,
    out_dir: Path,
    real: Iterable[ResampledCase] | None,
    manifest_extras: dict[str, Any] | None,
    progress: ProgressFn | None,
    should_stop: StopFn | None,
) -> GenerateResult:
    """Write ``spec.n_pairs`` volumes of ``spec.slices_per_volume`` slices from ``pairs`` (``(2, H, W)``
    each, consumed as they are written: memory does not grow with the pairs asked), with the real cases,
    dataset.json and manifest.json (``generator`` its generator's entry)."""
    n_pairs, per_volume = spec.n_pairs, spec.slices_per_volume
    exporter = NnUNetExporter(
        out_dir,
        ing.channel.upper(),
        grid=ing.slices.cases[0].affine,
        slice_shape=ing.slices.slices.shape[-2:],
        real_cases_geometry=spec.real_cases,
    )
    for case in ing.slices.cases if real is None else real:
        exporter.add_real_case(case)
    reporter = Reporter("generate", n_pairs, "pairs", progress, should_stop)
    for v in range(n_pairs):
        reporter.check_cancelled()
        with exporter.open_synthetic(v, per_volume) as writer:
            for pair in itertools.islice(pairs, per_volume):
                writer.write(pair[0], (pair[1] > 0.5).astype(np.uint8))
        reporter.report(v + 1)
    exporter.finalize(
        {
            "generator": generator,
            "generation": {"seed": spec.seed, "n_pairs": n_pairs, "slices_per_volume": per_volume},
            **(manifest_extras or {}),
        }
    )
    return GenerateResult(Path(out_dir), n_pairs, per_volume, n_pairs * per_volume, 1.0, 0)
