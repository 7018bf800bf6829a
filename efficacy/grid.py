"""Does augmenting a cohort help, and with how many pairs? The efficacy protocol of issue 4.

One function, :func:`evaluate_cohort` (which runs :func:`run_efficacy` and writes the report), used by
the benchmark on the shared BraTS cases (bench/efficacy/run.py) and by the service's evaluation jobs
(worker/tasks.py) on a user's cohort:

1. split the cohort's PATIENTS into train and test (:func:`efficacy.segmenter.patient_split`); nothing of
   a test patient ever reaches a generator, not even the slice-balancing cap (re-balanced on the
   training patients alone);
2. fit each generator on the training patients' balanced tumour slices (the same slices for all) and
   draw ``max(n_synthetic)`` pairs; smaller N use a prefix of the same draw. "traditional" draws flips
   and rotations of those slices; "none" draws nothing;
3. for every (method, protocol, N, seed) train the downstream 2D U-Net on every tumour slice of the
   training patients plus the first N synthetic pairs, and test it on the test patients' volumes
   (:func:`efficacy.segmenter.run_downstream`): soft Dice on tumour slices (the paper's metric), 3D
   Dice and HD95 per patient;
4. summarise over seeds (mean, std, 95 % t-interval), measure each generator's pairs against the test
   patients' slices (PSNR, SSIM, LPIPS, Frechet VGG16 distance, mask-area JS, memorisation), and make
   the table and the figure (Dice against N per method, one panel per protocol, as the paper's figure).

Training length (issue 4): with "fixed_epochs" (the paper's) adding N slices also adds optimiser
steps; with "step_matched" every run of the grid, real-only included, gets the step budget of the
largest run (:func:`efficacy.segmenter.step_matched_steps`). Judge augmentation on "step_matched".

Every finished cell is appended to ``work_dir/rows.jsonl`` and the synthetic pairs of each generator are
kept in ``work_dir/<method>/`` (:func:`pairs_path`), so a killed run started again with the same
arguments continues where it stopped and ends with the same rows.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from imaging.errors import DHVAEError, LowAcceptance, WeightsMissing
from imaging.files import atomic_file, write_json_atomic, write_npy_atomic
from imaging.ingest import IngestResult
from imaging.preprocess import ResampledCase, restrict_to_cases
from imaging.progress import ProgressFn, Reporter, StopFn
from models.config import SamplingConfig
from models.registry import DONOR_INSERTS, GENERATORS, get_generator
from pipeline import pipeline

from .quality import default_perceptual_net, quality_metrics
from .report import METRICS, build_report, cell_key, json_safe, plot_report, report_markdown
from .segmenter import (
    PROTOCOLS,
    PatientSplit,
    SegmenterConfig,
    patient_split,
    run_downstream,
    step_matched_steps,
    training_steps,
)

log = logging.getLogger(__name__)

METHODS = ("none", *GENERATORS)  # "none": the real-only reference every curve starts from


@dataclass(frozen=True)
class EfficacyConfig:
    """The grid and the settings of one efficacy run.

    ``methods`` always gets "none" (N = 0, the reference every curve starts from); ``n_synthetic`` are
    the N > 0 to add. ``generator_steps`` / ``preset`` train every model-based generator alike;
    ``generator_overrides`` are dotted config overrides applied to all of them (e.g. ``loss.alpha``).
    """

    methods: tuple[str, ...] = METHODS
    n_synthetic: tuple[int, ...] = (250, 500, 1000, 2000)
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    protocols: tuple[str, ...] = PROTOCOLS
    preset: str = "small"
    generator_steps: int = 600
    generator_seed: int = 0
    sample_seed: int = 1
    generator_overrides: dict[str, Any] = field(default_factory=dict)
    # method -> checkpoint of an already trained generator to sample from instead of training one.
    # The caller vouches that it never saw a test patient (the service checks the model's cohort).
    pretrained: dict[str, str] = field(default_factory=dict)
    segmenter: SegmenterConfig = field(default_factory=SegmenterConfig)
    quality: bool = True  # quality metrics of each generator's pairs (VGG16-based ones need the weights)

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise DHVAEError(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
        bad = [p for p in self.protocols if p not in PROTOCOLS]
        if bad:
            raise DHVAEError(f"unknown protocol(s) {bad}; choose from {', '.join(PROTOCOLS)}")
        if not self.seeds or any(n < 1 for n in self.n_synthetic):
            raise DHVAEError("an efficacy run needs at least one seed, and every N must be >= 1")
        if "none" not in self.methods:
            object.__setattr__(self, "methods", ("none", *self.methods))

    @property
    def generators(self) -> tuple[str, ...]:
        return tuple(m for m in self.methods if m != "none")

    @property
    def n_max(self) -> int:
        return max(self.n_synthetic, default=0) if self.generators else 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class EfficacyData:
    """A cohort split by patient into what the generators and U-Nets learn from and what they are tested on."""

    split: PatientSplit
    channel: str
    generator_slices: IngestResult  # balanced tumour slices of the training patients (the generators' data)
    real_train: np.ndarray  # (N, 2, H, W): every tumour slice of the training patients (U-Net data)
    test_cases: list[ResampledCase]  # the test patients' volumes
    heldout: np.ndarray  # (M, 2, H, W): the test patients' balanced tumour slices (quality reference)

    def summary(self) -> dict[str, Any]:
        return {
            "channel": self.channel,
            "train_patients": list(self.split.train),
            "test_patients": list(self.split.test),
            "generator_slices": len(self.generator_slices.slices.case_ids),
            "unet_real_slices": int(len(self.real_train)),
            "test_tumour_slices": int(sum(int((c.mask.sum((0, 1)) > 0).sum()) for c in self.test_cases)),
            "heldout_slices": int(len(self.heldout)),
        }


def tumour_slices(cases: Sequence[ResampledCase]) -> np.ndarray:
    """Every axial slice with any tumour of ``cases``, as ``(N, 2, H, W)`` [image, mask] float32."""
    out = [
        np.stack([c.image[:, :, k], c.mask[:, :, k].astype(np.float32)])
        for c in cases
        for k in np.flatnonzero(c.mask.sum((0, 1)) > 0)
    ]
    if not out:
        raise DHVAEError("the training patients have no tumour slice")
    return np.stack(out).astype(np.float32)


def split_cohort(
    ing: IngestResult,
    *,
    seed: int = 0,
    test_fraction: float | None = None,
    train_ids: Sequence[str] | None = None,
    test_ids: Sequence[str] | None = None,
) -> EfficacyData:
    """Split an ingested cohort by patient: seeded by ``test_fraction``, or given as explicit id lists."""
    ids = [c.case_id for c in ing.slices.cases]
    if train_ids is not None or test_ids is not None:
        train_ids, test_ids = list(train_ids or []), list(test_ids or [])
        unknown = sorted(set(train_ids + test_ids) - set(ids))
        if unknown or not train_ids or not test_ids or set(train_ids) & set(test_ids):
            raise DHVAEError(
                f"explicit split must name disjoint, non-empty sets of the cohort's patients (unknown: {unknown})"
            )
        split = PatientSplit(tuple(sorted(train_ids)), tuple(sorted(test_ids)))
    else:
        split = patient_split(ids, seed=seed, test_fraction=0.3 if test_fraction is None else test_fraction)
    train_cases = [c for c in ing.slices.cases if c.case_id in split.train]
    test_cases = [c for c in ing.slices.cases if c.case_id in split.test]
    gen = restrict_to_cases(ing.slices, split.train)
    try:
        heldout = restrict_to_cases(ing.slices, split.test).slices
    except DHVAEError:  # test patients whose tumours are all under the floor: no quality reference
        heldout = np.zeros((0, *ing.slices.slices.shape[1:]), np.float32)
    summary = {**ing.summary, "cases": list(split.train), "training_slices": len(gen.case_ids)}
    return EfficacyData(
        split=split,
        channel=ing.channel,
        generator_slices=IngestResult(gen, ing.channel, summary),
        real_train=tumour_slices(train_cases),
        test_cases=test_cases,
        heldout=heldout,
    )


# --- generators -----------------------------------------------------------------------------------


def pairs_path(work_dir: Path, method: str, version: int | None = None) -> Path:
    """Where a work folder keeps ``method``'s drawn pairs. A drawing recipe past its first version (the
    insertion's, ``models.insert.INSERT_VERSION``) has it in the file name, so a folder never serves
    pairs drawn by another version. ``version`` defaults to the recipe's: the generator's, or a donor
    insertion's (``models.registry.DONOR_INSERTS``: its twin's)."""
    if version is None:
        version = DONOR_INSERTS[method].version if method in DONOR_INSERTS else get_generator(method).version
    return work_dir / method / ("pairs.npy" if version == 1 else f"pairs-v{version}.npy")


def synthetic_pairs(
    method: str,
    data: EfficacyData,
    cfg: EfficacyConfig,
    work_dir: Path,
    *,
    progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
    device: torch.device | str = "cpu",
) -> np.ndarray:
    """``cfg.n_max`` pairs ``(n, 2, H, W)`` of one generator fitted on the training patients; cached."""
    from models.checkpoint import model_from_checkpoint
    from models.sampler import sample_array

    out = pairs_path(work_dir, method)
    if out.is_file():
        pairs = np.load(out, allow_pickle=False)
        if len(pairs) == cfg.n_max:
            return pairs
    out.parent.mkdir(parents=True, exist_ok=True)
    real = data.generator_slices.slices.slices
    entry = get_generator(method)
    if not entry.trained:  # nothing to train: pairs drawn from the training patients' slices
        pairs = np.stack(list(entry.draw(data.generator_slices.slices, cfg.n_max, cfg.sample_seed)))
    else:
        if method in cfg.pretrained:
            ckpt = Path(cfg.pretrained[method])
        else:
            spec = pipeline.TrainSpec(
                model=method,
                preset=cfg.preset,
                steps=cfg.generator_steps,
                seed=cfg.generator_seed,
                overrides=cfg.generator_overrides,
            )
            ckpt = pipeline.train(
                data.generator_slices,
                spec,
                model_dir=work_dir / method / "model",
                progress=progress,
                should_stop=should_stop,
                device=device,
            )
        model, payload = model_from_checkpoint(ckpt)
        size = payload["config_obj"].network.image_size
        if size != real.shape[-1]:
            raise DHVAEError(
                f"the {method} model makes {size} px slices; the cohort's are {real.shape[-1]} px"
            )
        # ``sampling.*`` overrides reach a pretrained checkpoint too (e.g. another rejection floor);
        # for a model trained here they are already in its config.
        resample = {k: v for k, v in cfg.generator_overrides.items() if k.startswith("sampling.")}
        sampling: SamplingConfig = payload["config_obj"].replace(**resample).sampling
        pairs = sample_array(
            model.to(device), cfg.n_max, seed=cfg.sample_seed, cfg=sampling, image_size=size, device=device
        )
    write_npy_atomic(out, pairs)
    return pairs


# --- the grid -------------------------------------------------------------------------------------


def cells(cfg: EfficacyConfig) -> list[dict[str, Any]]:
    """Every (method, protocol, n_synthetic, seed) to run: "none" at N = 0, each generator at each N.

    Seed-major order: a run stopped part-way has whole curves (every method, N and protocol) for the
    seeds it finished.
    """
    out = []
    for seed in cfg.seeds:
        for protocol in cfg.protocols:
            for method in cfg.methods:
                for n in (0,) if method == "none" else cfg.n_synthetic:
                    out.append({"method": method, "protocol": protocol, "n_synthetic": n, "seed": seed})
    return out


def _run_key(row: dict[str, Any]) -> tuple:
    """What determines a trained U-Net: the data (method, N), the seed and the number of steps."""
    return (row["method"], row["n_synthetic"], row["seed"], row["steps"])


def read_rows(path: Path) -> list[dict[str, Any]]:
    """Rows of a previous run; a line cut off by a kill is dropped (its cell runs again)."""
    rows = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                log.warning("%s: dropping a partial line", path)
    return rows


def claim_work_dir(
    work_dir: Path, settings: dict[str, Any], what: str, shared: Callable[[dict[str, Any]], Any] = lambda s: s
) -> None:
    """Create ``work_dir`` and record ``settings`` in its ``settings.json``; DHVAEError if the folder
    already holds a run whose ``shared(settings)`` differ (a resumed run must be the same run)."""
    work_dir.mkdir(parents=True, exist_ok=True)
    settings_path = work_dir / "settings.json"
    if settings_path.is_file() and shared(json.loads(settings_path.read_text())) != shared(settings):
        raise DHVAEError(f"{work_dir} holds {what} with other settings; use another work directory")
    with atomic_file(settings_path, "w") as f:
        f.write(json.dumps(settings, indent=2))


def run_efficacy(
    data: EfficacyData,
    cfg: EfficacyConfig,
    work_dir: Path,
    *,
    progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
    device: torch.device | str = "cpu",
    report_only: bool = False,
) -> dict[str, Any]:
    """Run (or finish) the whole grid and return the report (:func:`build_report`).

    ``report_only``: run nothing more; report the cells finished so far (``complete`` says whether
    that is all of them).
    """
    work_dir = Path(work_dir)

    # Everything but the list of methods must match the run already in the folder: each method's
    # pairs and U-Nets depend on the shared settings alone, so a run can be extended by more methods
    # (or reported on fewer) without redoing the ones it has.
    def shared(s: dict[str, Any]) -> dict[str, Any]:
        return {**s, "config": {k: v for k, v in s["config"].items() if k != "methods"}}

    settings = json.loads(json.dumps({"config": cfg.to_dict(), "data": data.summary()}))
    claim_work_dir(work_dir, settings, "a run", shared)

    pairs: dict[str, np.ndarray] = {}
    failed: dict[str, str] = {}
    for method in cfg.generators:
        if report_only and not pairs_path(work_dir, method).is_file():
            continue
        log.info("efficacy: generator %s", method)
        try:
            pairs[method] = synthetic_pairs(
                method, data, cfg, work_dir, progress=progress, should_stop=should_stop, device=device
            )
        except LowAcceptance as e:  # a generator that cannot reach the area floor is a result, not a crash
            log.warning("efficacy: %s produced too few pairs: %s", method, e)
            failed[method] = str(e)

    # the pairs' quality before the U-Nets: the grid's runs are the job's last and longest stage
    quality = _quality(pairs, data, cfg, work_dir, progress) if cfg.quality else {}
    budget = step_matched_steps(len(data.real_train), cfg.n_max, cfg.segmenter)
    rows_path = work_dir / "rows.jsonl"
    rows = read_rows(rows_path)
    grid = cells(cfg)
    done = {cell_key(r) for r in rows} & {cell_key(c) for c in grid}  # other methods' rows stay, uncounted
    todo = [] if report_only else [c for c in grid if cell_key(c) not in done and c["method"] not in failed]
    # One U-Net per (method, N, seed, steps): at the largest N both protocols train the very same one
    # (same slices, seed and step count), so the second protocol takes the first one's result.
    trained = {_run_key(r): r for r in rows if all(m in r for m in METRICS)}
    # The total is the grid's from the start (what the API announced): a generator that produced no
    # pairs has its cells counted as settled, not dropped from the total.
    settled = len(done) + sum(1 for c in grid if c["method"] in failed and cell_key(c) not in done)
    reporter = Reporter("evaluate", settled + len(todo), "runs", progress, should_stop, start=settled)
    reporter.report(settled)
    with open(rows_path, "a") as sink:
        for cell in todo:
            reporter.check_cancelled()
            n = cell["n_synthetic"]
            steps = training_steps(len(data.real_train) + n, cfg.segmenter, cell["protocol"], budget)
            result = trained.get((cell["method"], n, cell["seed"], steps))
            if result is None:
                result = run_downstream(
                    data.real_train,
                    pairs[cell["method"]][:n] if n else None,
                    data.test_cases,
                    seed=cell["seed"],
                    cfg=cfg.segmenter,
                    protocol=cell["protocol"],
                    steps=budget if cell["protocol"] == "step_matched" else None,
                    device=device,
                )
            row = {**cell, **{k: result[k] for k in (*METRICS, "steps", "n_real", "hd95_unit")}}
            row["per_case"] = result["per_case"]
            trained[_run_key(row)] = row
            rows.append(row)
            sink.write(json.dumps(row) + "\n")
            sink.flush()
            settled += 1
            reporter.report(settled, dice_slice=row["dice_slice"])
            log.info("efficacy: %s", {k: row[k] for k in (*cell, "dice_slice", "dice_3d")})

    expected = [c for c in grid if c["method"] not in failed]
    return build_report(
        rows, expected, cfg.to_dict(), data.summary(), quality, step_budget=budget, failed=failed
    )


def _quality(
    pairs: dict[str, np.ndarray],
    data: EfficacyData,
    cfg: EfficacyConfig,
    work_dir: Path,
    progress: ProgressFn | None = None,
) -> dict[str, Any]:
    """Quality metrics of each generator's pairs against the test patients' slices (cached as JSON);
    a stage of its own in the progress (minutes with the VGG16 metrics on a CPU)."""
    path = work_dir / "quality.json"
    cached = json.loads(path.read_text()) if path.is_file() else {}
    if not len(data.heldout):
        return {"note": "the test patients have no slice over the area floor: no quality reference"}
    net = None
    try:
        net = default_perceptual_net()
    except WeightsMissing:
        log.warning("VGG16 weights missing: LPIPS and the Frechet VGG16 distance are skipped")
    refs = {"real_train": data.generator_slices.slices.slices}
    sets = {**pairs, **refs}
    reporter = Reporter("quality", len(sets), "sets", progress, None)
    for i, (name, synth) in enumerate(sets.items()):
        reporter.report(i)
        if name in cached:
            continue
        train = None if name == "real_train" else data.generator_slices.slices.slices
        q = quality_metrics(
            synth[: max(len(data.heldout) * 4, 500)],
            data.heldout,
            train,
            net=net,
            include_vgg=net is not None,
            train_case_ids=data.generator_slices.slices.case_ids if train is not None else None,
        )
        cached[name] = q
        with atomic_file(path, "w") as f:
            f.write(json.dumps(cached, indent=2, default=float))
    reporter.report(len(sets))
    return cached


def evaluate_cohort(
    data: EfficacyData,
    cfg: EfficacyConfig,
    out_dir: Path,
    *,
    work_dir: Path | None = None,
    stem: str = "report",
    title: str = "Does augmentation help?",
    paper: bool = False,
    details: dict[str, Any] | None = None,
    progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
    device: torch.device | str | None = None,
    report_only: bool = False,
) -> dict[str, Any]:
    """The one implementation of an evaluation: run (or finish) the grid on a split cohort and write
    ``out_dir/<stem>.json`` (strict JSON), ``<stem>.md`` (the table and verdicts) and ``<stem>.png``
    (Dice against N). The service's evaluation task and ``bench/efficacy/run.py`` both call it.

    ``work_dir`` (default ``out_dir/work``) keeps the resumable rows and pairs; ``details`` (the
    command, the machine, ...) are added to the report before it is written, with the wall time of
    this call; ``paper`` adds the paper's BraTS figures to the Markdown.
    """
    t0 = time.perf_counter()
    device = device or pipeline.default_device()
    work_dir = Path(work_dir) if work_dir is not None else Path(out_dir) / "work"
    report = run_efficacy(
        data,
        cfg,
        work_dir,
        progress=progress,
        should_stop=should_stop,
        device=device,
        report_only=report_only,
    )
    report.update(details or {})
    report["wall_minutes_this_invocation"] = round((time.perf_counter() - t0) / 60, 1)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plot_report(report, out_dir / f"{stem}.png")
    md = report_markdown(report, paper=paper, title=title)
    if "command" in report:
        md += f"\nCommand: `{report['command']}`. Plot: `{stem}.png`. Raw rows: `{stem}.json`.\n"
    with atomic_file(out_dir / f"{stem}.md", "w") as f:
        f.write(md)
    write_json_atomic(out_dir / f"{stem}.json", json_safe(report))
    return report
