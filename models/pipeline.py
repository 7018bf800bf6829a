"""The four things a user does, each one function: ingest, train, generate, augment (= all three).

The CLI (models/cli.py) and the Celery worker (worker/tasks.py) both call these and nothing deeper.
Each is restartable: ``train`` resumes from ``model_dir/last.pt``; ``generate`` keeps the pairs already
on disk and continues the same random stream, so a killed job finishes byte-identical to one that was
never interrupted.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import __version__
from .checkpoint import build_model, load_checkpoint, model_from_checkpoint
from .cohort import CohortSpec
from .config import DHVAEConfig, get_preset
from .errors import CheckpointError, DHVAEError
from .export import (
    NnUNetExporter,
    completed_synthetic_indices,
    sha256_file,
    synthetic_case_id,
    write_json_atomic,
)
from .ingest import IngestResult, ingest
from .preprocess import PreprocessConfig, ResampledCase
from .progress import ProgressFn, Reporter, StopFn
from .sampler import BatchDone, sample_pairs
from .train import fit

log = logging.getLogger(__name__)

JOURNAL = ".generation.json"


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# --- train ----------------------------------------------------------------------------------------


def make_config(
    preset: str, *, steps: int, seed: int, image_size: int, overrides: dict[str, Any] | None = None
) -> DHVAEConfig:
    """A preset with the run's steps, seed and slice size, plus dotted ``overrides``."""
    cfg = get_preset(preset).replace(
        **{"train.steps": steps, "train.seed": seed, "network.image_size": image_size, **(overrides or {})}
    )
    n_down = len(cfg.network.channel_mult) - 1
    if cfg.network.image_size % 2**n_down:
        raise DHVAEError(
            f"slice size {cfg.network.image_size} is not divisible by {2**n_down} (the network downsamples)"
        )
    return cfg


def attach_perceptual(model: torch.nn.Module, cfg: DHVAEConfig, device: torch.device | str) -> None:
    """Give the model its frozen LPIPS-VGG16 when the config asks for it (raises WeightsMissing)."""
    if getattr(model, "needs_perceptual", False):
        from .perceptual import LPIPS

        net = LPIPS(input_range=cfg.loss.perceptual_input_range, channels_last=cfg.train.channels_last)
        model.set_perceptual(net.to(device))


def train(
    data: Path | IngestResult,
    *,
    model_dir: Path,
    preset: str = "small",
    steps: int = 1000,
    seed: int = 0,
    base_checkpoint: Path | None = None,
    cache_dir: Path | None = None,
    overrides: dict[str, Any] | None = None,
    progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
    device: torch.device | str | None = None,
) -> Path:
    """Train (or fine-tune from ``base_checkpoint``) a model on a cohort; returns ``model_dir/model.pt``.

    ``data`` is a cohort folder or the result of :func:`ingest`. A previous run killed in the same
    ``model_dir`` is resumed from ``last.pt``; a finished one is returned as is.
    """
    device = device or default_device()
    ing = data if isinstance(data, IngestResult) else ingest(Path(data), cache_dir=cache_dir)
    slices = ing.slices
    if len(slices.case_ids) == 0:
        raise DHVAEError("the cohort has no training slice over the tumour-area floor")
    cfg = make_config(preset, steps=steps, seed=seed, image_size=slices.slices.shape[-1], overrides=overrides)
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    final, last = model_dir / "model.pt", model_dir / "last.pt"
    if final.exists() and load_checkpoint(final)["config_obj"] == cfg:
        return final

    torch.manual_seed(seed)
    model = build_model(cfg)
    if base_checkpoint is not None and not last.exists():
        _load_base(model, cfg, Path(base_checkpoint))
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
    tmp = model_dir / ".model.pt.partial"
    shutil.copyfile(last, tmp)
    os.replace(tmp, final)
    write_json_atomic(
        model_dir / "model.json",
        {
            "config": cfg.to_dict(),
            "channel": ing.channel,
            "base_checkpoint": str(base_checkpoint) if base_checkpoint else None,
            "training_slices": len(slices.case_ids),
            "cases": sorted(set(slices.case_ids)),
            "final_metrics": result.metrics,
            "code_version": __version__,
        },
    )
    return final


def _load_base(model: torch.nn.Module, cfg: DHVAEConfig, path: Path) -> None:
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


def _journal(out_dir: Path, settings: dict[str, Any]) -> dict[str, Any]:
    """The generation journal: settings + accepted count before each candidate batch.

    A folder holding a generation with other settings is refused rather than silently mixed.
    """
    path = out_dir / JOURNAL
    if path.exists():
        journal = json.loads(path.read_text())
        if journal["settings"] != settings:
            raise DHVAEError(
                f"{out_dir} already holds synthetic pairs generated with other settings "
                f"({journal['settings']}); use a new output folder"
            )
        return journal
    return {"settings": settings, "batches": {"0": 0}, "passed": {"0": 0}, "draws": 0}


def generate(
    checkpoint: Path,
    *,
    out_dir: Path,
    n_pairs: int,
    seed: int = 0,
    slices_per_volume: int = 1,
    min_mask_area: int | None = None,
    real_cases: list[ResampledCase] | None = None,
    manifest_extras: dict[str, Any] | None = None,
    progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
    device: torch.device | str | None = None,
) -> GenerateResult:
    """Write ``n_pairs`` synthetic image/mask volumes (``slices_per_volume`` slices each) to ``out_dir``.

    Output: nnU-Net v2 raw layout, plus ``real_cases`` if given, ``dataset.json`` and ``manifest.json``.
    """
    if n_pairs < 1 or slices_per_volume < 1:
        raise DHVAEError("n_pairs and slices_per_volume must be at least 1")
    device = device or default_device()
    model, payload = model_from_checkpoint(Path(checkpoint), map_location=device)
    cfg: DHVAEConfig = payload["config_obj"]
    sampling = cfg.sampling if min_mask_area is None else _with_floor(cfg, min_mask_area)
    size = cfg.network.image_size
    extra = payload.get("extra", {})
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    exporter = NnUNetExporter(
        out_dir,
        str(extra.get("channel", "image")).upper(),
        grid=extra.get("grid_affine", np.eye(4)),
        slice_shape=(size, size),
    )
    for case in real_cases or []:
        exporter.add_real_case(case)

    settings = {
        "checkpoint_sha256": sha256_file(Path(checkpoint)),
        "seed": seed,
        "n_pairs": n_pairs,
        "slices_per_volume": slices_per_volume,
        "sampling": {**vars(sampling)},
    }
    journal = _journal(out_dir, settings)
    done = _complete_prefix(out_dir, n_pairs)
    first = done * slices_per_volume  # index of the first pair (slice) still to write
    batches = {int(b): a for b, a in journal["batches"].items()}
    start_batch = max(b for b, a in batches.items() if a <= first)
    reporter = Reporter("generate", n_pairs, "pairs", progress, should_stop, start=done)
    reporter.report(done)

    model.to(device)
    total = n_pairs * slices_per_volume
    writer = None
    try:
        for item in sample_pairs(
            model,
            total,
            seed=seed,
            cfg=sampling,
            image_size=size,
            start_batch=start_batch,
            accepted_before=batches[start_batch],
            passed_before=journal["passed"][str(start_batch)],
            device=device,
        ):
            if isinstance(item, BatchDone):
                journal["batches"][str(item.batch + 1)] = item.accepted_total
                journal["passed"][str(item.batch + 1)] = item.passed_total
                journal["draws"] = max(journal["draws"], item.draws_total)
                write_json_atomic(out_dir / JOURNAL, journal)
                continue
            if item.index < first:
                continue  # written before an interruption
            volume, k = divmod(item.index, slices_per_volume)
            if k == 0:
                reporter.check_cancelled()
                writer = exporter.open_synthetic(volume, slices_per_volume)
            writer.write(item.image, item.mask)
            if k == slices_per_volume - 1:
                writer.close()
                writer = None
                reporter.report(volume + 1)
    finally:
        if writer is not None:
            writer.abort()

    draws = journal["draws"]
    passed = journal["passed"][str(max(int(b) for b in journal["passed"]))]
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
                "seed": seed,
                "n_pairs": n_pairs,
                "slices_per_volume": slices_per_volume,
                "min_mask_area": sampling.area_floor(size),
                "draws": draws,
                "acceptance": round(passed / draws, 6) if draws else None,
            },
            **(manifest_extras or {}),
        }
    )
    return GenerateResult(out_dir, n_pairs, slices_per_volume, draws, passed / draws if draws else 0.0, done)


def _with_floor(cfg: DHVAEConfig, area: int):
    if area < 0:
        raise DHVAEError("min_mask_area must be >= 0")
    return cfg.replace(**{"sampling.min_mask_area": area}).sampling


def _complete_prefix(out_dir: Path, n_pairs: int) -> int:
    """Number of synthetic volumes 0..V-1 complete on disk; anything after a gap or past n is removed
    (a volume after a gap cannot exist in a sequential run, so it is not trusted)."""
    complete = completed_synthetic_indices(out_dir)
    v = 0
    while v < len(complete) and complete[v] == v and v < n_pairs:
        v += 1
    for stray in complete[v:]:
        case = synthetic_case_id(stray)
        for sub, name in (("imagesTr", f"{case}_0000.nii.gz"), ("labelsTr", f"{case}.nii.gz")):
            (out_dir / sub / name).unlink(missing_ok=True)
    return v


# --- augment --------------------------------------------------------------------------------------


MODELS = ("dhvae", "hvae", "vae", "lsgan", "traditional")


@dataclass
class AugmentResult:
    out_dir: Path
    checkpoint: Path | None  # None for "traditional"
    ingest: dict[str, Any]
    generation: GenerateResult


def augment(
    cohort_dir: Path,
    *,
    out_dir: Path,
    model_dir: Path | None = None,
    preset: str = "small",
    steps: int = 1000,
    seed: int = 0,
    n_pairs: int = 100,
    slices_per_volume: int = 1,
    min_mask_area: int | None = None,
    base_checkpoint: Path | None = None,
    cache_dir: Path | None = None,
    spec: CohortSpec | None = None,
    prep: PreprocessConfig | None = None,
    overrides: dict[str, Any] | None = None,
    model: str = "dhvae",
    progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
    device: torch.device | str | None = None,
) -> AugmentResult:
    """Ingest a cohort, train (or fine-tune) on it, and write the augmented dataset to ``out_dir``.

    ``model`` is one of :data:`MODELS`: the dHVAE, a baseline generator of the same pipeline, or
    "traditional" (flips and rotations of the real slices; nothing is trained).
    """
    if model not in MODELS:
        raise DHVAEError(f"unknown model {model!r}; choose one of {', '.join(MODELS)}")
    out_dir = Path(out_dir)
    model_dir = Path(model_dir) if model_dir else out_dir.parent / f".{out_dir.name}.model"
    ing = ingest(Path(cohort_dir), cache_dir=cache_dir, spec=spec, prep=prep, progress=progress)
    cohort_info = {
        "cohort": {
            k: ing.summary[k] for k in ("layout", "cases", "channel", "tumour_slices", "training_slices")
        }
    }
    if model == "traditional":
        gen = generate_traditional(
            ing,
            out_dir=out_dir,
            n_pairs=n_pairs,
            seed=seed,
            slices_per_volume=slices_per_volume,
            manifest_extras=cohort_info,
            progress=progress,
            should_stop=should_stop,
        )
        return AugmentResult(out_dir, None, ing.summary, gen)
    ckpt = train(
        ing,
        model_dir=model_dir,
        preset=preset,
        steps=steps,
        seed=seed,
        base_checkpoint=base_checkpoint,
        overrides={"model": model, **(overrides or {})},
        progress=progress,
        should_stop=should_stop,
        device=device,
    )
    gen = generate(
        ckpt,
        out_dir=out_dir,
        n_pairs=n_pairs,
        seed=seed,
        slices_per_volume=slices_per_volume,
        min_mask_area=min_mask_area,
        real_cases=ing.slices.cases,
        manifest_extras=cohort_info,
        progress=progress,
        should_stop=should_stop,
        device=device,
    )
    return AugmentResult(out_dir, ckpt, ing.summary, gen)


def generate_traditional(
    ing: IngestResult,
    *,
    out_dir: Path,
    n_pairs: int,
    seed: int = 0,
    slices_per_volume: int = 1,
    manifest_extras: dict[str, Any] | None = None,
    progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
) -> GenerateResult:
    """The traditional-augmentation baseline in the same export: flips and rotations of real slices
    (models/traditional.py), the real cases, dataset.json and manifest.json. Deterministic per seed."""
    from .traditional import TraditionalAugConfig, augment_pairs

    if n_pairs < 1 or slices_per_volume < 1:
        raise DHVAEError("n_pairs and slices_per_volume must be at least 1")
    slices = ing.slices.slices
    size = slices.shape[-2:]
    aug_cfg = TraditionalAugConfig()
    pairs = augment_pairs(slices, n_pairs * slices_per_volume, seed=seed, cfg=aug_cfg)
    exporter = NnUNetExporter(out_dir, ing.channel.upper(), grid=ing.slices.cases[0].affine, slice_shape=size)
    for case in ing.slices.cases:
        exporter.add_real_case(case)
    reporter = Reporter("generate", n_pairs, "pairs", progress, should_stop)
    for v in range(n_pairs):
        reporter.check_cancelled()
        with exporter.open_synthetic(v, slices_per_volume) as writer:
            for pair in pairs[v * slices_per_volume : (v + 1) * slices_per_volume]:
                writer.write(pair[0], (pair[1] > 0.5).astype(np.uint8))
        reporter.report(v + 1)
    exporter.finalize(
        {
            "generator": {"model": "traditional", "config": vars(aug_cfg)},
            "generation": {"seed": seed, "n_pairs": n_pairs, "slices_per_volume": slices_per_volume},
            **(manifest_extras or {}),
        }
    )
    total = n_pairs * slices_per_volume
    return GenerateResult(Path(out_dir), n_pairs, slices_per_volume, total, 1.0, 0)
