"""Does augmenting a cohort help, and with how many pairs? The efficacy protocol of issue 4.

One function, :func:`run_efficacy`, used by the benchmark on the shared BraTS cases
(bench/efficacy/run.py) and by the service's evaluation jobs (worker/tasks.py) on a user's cohort:

1. split the cohort's PATIENTS into train and test (:func:`models.evaluation.patient_split`); nothing of
   a test patient ever reaches a generator, not even the slice-balancing cap (re-balanced on the
   training patients alone);
2. fit each generator on the training patients' balanced tumour slices (the same slices for all) and
   draw ``max(n_synthetic)`` pairs; smaller N use a prefix of the same draw. "traditional" draws flips
   and rotations of those slices; "none" draws nothing;
3. for every (method, protocol, N, seed) train the downstream 2D U-Net on every tumour slice of the
   training patients plus the first N synthetic pairs, and test it on the test patients' volumes
   (:func:`models.evaluation.run_downstream`): soft Dice on tumour slices (the paper's metric), 3D
   Dice and HD95 per patient;
4. summarise over seeds (mean, std, 95 % t-interval), measure each generator's pairs against the test
   patients' slices (PSNR, SSIM, LPIPS, Frechet VGG16 distance, mask-area JS, memorisation), and make
   the table and the figure (Dice against N per method, one panel per protocol, as the paper's figure).

Training length (issue 4): with "fixed_epochs" (the paper's) adding N slices also adds optimiser
steps; with "step_matched" every run of the grid, real-only included, gets the step budget of the
largest run (:func:`models.evaluation.step_matched_steps`). Judge augmentation on "step_matched".

Every finished cell is appended to ``work_dir/rows.jsonl`` and the synthetic pairs of each generator are
kept in ``work_dir/<method>/pairs.npy``, so a killed run started again with the same arguments continues
where it stopped and ends with the same rows.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import SamplingConfig
from .errors import DHVAEError, LowAcceptance, WeightsMissing
from .evaluation import (
    PROTOCOLS,
    PatientSplit,
    SegmenterConfig,
    default_perceptual_net,
    patient_split,
    quality_metrics,
    run_downstream,
    step_matched_steps,
    summarize,
    training_steps,
)
from .ingest import IngestResult
from .preprocess import ResampledCase, restrict_to_cases
from .progress import ProgressFn, Reporter, StopFn

log = logging.getLogger(__name__)

GENERATORS = ("traditional", "vae", "hvae", "lsgan", "dhvae")  # "none" is the real-only reference
METHODS = ("none", *GENERATORS)
METRICS = ("dice_slice", "dice_pooled", "dice_3d", "hd95")

# The paper's Dice (%) against synthetic slices added, BraTS FLAIR (method.md, the Dice-evolution figure).
PAPER_BRATS = {
    "lsgan": {0: 66.3, 500: 70.3, 1000: 72.0, 1500: 69.7, 2000: 67.6},
    "vae": {0: 66.3, 500: 74.0, 1000: 77.3, 1500: 75.2, 2000: 70.4},
    "hvae": {0: 66.3, 500: 74.9, 1000: 76.0, 1500: 77.8, 2000: 76.3},
    "dhvae": {0: 66.3, 500: 76.3, 1000: 78.9, 1500: 81.9, 2000: 84.4},
}


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


def _save_npy_atomic(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "wb") as f:
        np.save(f, array, allow_pickle=False)
    os.replace(tmp, path)


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
    from . import pipeline
    from .checkpoint import model_from_checkpoint
    from .sampler import Pair, sample_pairs
    from .traditional import augment_pairs

    out = work_dir / method / "pairs.npy"
    if out.is_file():
        pairs = np.load(out, allow_pickle=False)
        if len(pairs) == cfg.n_max:
            return pairs
    out.parent.mkdir(parents=True, exist_ok=True)
    real = data.generator_slices.slices.slices
    if method == "traditional":
        pairs = augment_pairs(real, cfg.n_max, seed=cfg.sample_seed)
    else:
        if method in cfg.pretrained:
            ckpt = Path(cfg.pretrained[method])
        else:
            ckpt = pipeline.train(
                data.generator_slices,
                model_dir=work_dir / method / "model",
                preset=cfg.preset,
                steps=cfg.generator_steps,
                seed=cfg.generator_seed,
                overrides={"model": method, **cfg.generator_overrides},
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
        items = sample_pairs(
            model.to(device), cfg.n_max, seed=cfg.sample_seed, cfg=sampling, image_size=size, device=device
        )
        pairs = np.stack(
            [np.stack([p.image, p.mask.astype(np.float32)]) for p in items if isinstance(p, Pair)]
        ).astype(np.float32)
    _save_npy_atomic(out, pairs)
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


def _key(row: dict[str, Any]) -> tuple:
    return (row["method"], row["protocol"], row["n_synthetic"], row["seed"])


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
    work_dir.mkdir(parents=True, exist_ok=True)

    # Everything but the list of methods must match the run already in the folder: each method's
    # pairs and U-Nets depend on the shared settings alone, so a run can be extended by more methods
    # (or reported on fewer) without redoing the ones it has.
    def shared(s: dict[str, Any]) -> dict[str, Any]:
        return {**s, "config": {k: v for k, v in s["config"].items() if k != "methods"}}

    settings = json.loads(json.dumps({"config": cfg.to_dict(), "data": data.summary()}))
    settings_path = work_dir / "settings.json"
    if settings_path.is_file() and shared(json.loads(settings_path.read_text())) != shared(settings):
        raise DHVAEError(f"{work_dir} holds a run with other settings; use another work directory")
    settings_path.write_text(json.dumps(settings, indent=2))

    pairs: dict[str, np.ndarray] = {}
    failed: dict[str, str] = {}
    for method in cfg.generators:
        if report_only and not (work_dir / method / "pairs.npy").is_file():
            continue
        log.info("efficacy: generator %s", method)
        try:
            pairs[method] = synthetic_pairs(
                method, data, cfg, work_dir, progress=progress, should_stop=should_stop, device=device
            )
        except LowAcceptance as e:  # a generator that cannot reach the area floor is a result, not a crash
            log.warning("efficacy: %s produced too few pairs: %s", method, e)
            failed[method] = str(e)

    budget = step_matched_steps(len(data.real_train), cfg.n_max, cfg.segmenter)
    rows_path = work_dir / "rows.jsonl"
    rows = read_rows(rows_path)
    grid = cells(cfg)
    done = {_key(r) for r in rows} & {_key(c) for c in grid}  # other methods' rows stay, uncounted
    todo = [] if report_only else [c for c in grid if _key(c) not in done and c["method"] not in failed]
    # One U-Net per (method, N, seed, steps): at the largest N both protocols train the very same one
    # (same slices, seed and step count), so the second protocol takes the first one's result.
    trained = {_run_key(r): r for r in rows if all(m in r for m in METRICS)}
    reporter = Reporter("evaluate", len(done) + len(todo), "runs", progress, should_stop, start=len(done))
    reporter.report(len(done))
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
            done.add(_key(row))
            reporter.report(len(done), dice_slice=row["dice_slice"])
            log.info("efficacy: %s", {k: row[k] for k in (*cell, "dice_slice", "dice_3d")})

    quality = _quality(pairs, data, cfg, work_dir) if cfg.quality else {}
    return build_report(rows, cfg, data.summary(), quality, step_budget=budget, failed=failed)


def _quality(
    pairs: dict[str, np.ndarray], data: EfficacyData, cfg: EfficacyConfig, work_dir: Path
) -> dict[str, Any]:
    """Quality metrics of each generator's pairs against the test patients' slices (cached as JSON)."""
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
    for name, synth in {**pairs, **refs}.items():
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
        path.write_text(json.dumps(cached, indent=2, default=float))
    return cached


# --- report ---------------------------------------------------------------------------------------


def build_report(
    rows: list[dict[str, Any]],
    cfg: EfficacyConfig,
    data_summary: dict[str, Any],
    quality: dict[str, Any],
    *,
    step_budget: int,
    failed: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Rows, their summary over seeds, and each generator's best N, per protocol. ``failed``: generators
    that could not produce their pairs (method -> reason); their cells are not expected."""
    failed = failed or {}
    wanted = {_key(c) for c in cells(cfg) if c["method"] not in failed}
    rows = sorted((r for r in rows if _key(r) in wanted), key=_key)
    summary = []
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["protocol"], r["method"], r["n_synthetic"]), []).append(r)
    for (protocol, method, n), rs in sorted(groups.items()):
        entry = {"protocol": protocol, "method": method, "n_synthetic": n, "n_seeds": len(rs)}
        for m in METRICS:
            values = [r[m] for r in rs if m in r]  # rows.jsonl of older runs lack dice_pooled
            entry[m] = summarize(values) if values else {"mean": math.nan, "std": math.nan, "n": 0}
        summary.append(entry)
    return {
        "rows": [{k: v for k, v in r.items() if k != "per_case"} for r in rows],
        "per_case": [
            {**{k: r[k] for k in ("method", "protocol", "n_synthetic", "seed")}, "cases": r["per_case"]}
            for r in rows
        ],
        "summary": summary,
        "verdict": verdicts(summary),
        "config": cfg.to_dict(),
        "data": data_summary,
        "step_budget": step_budget,
        "quality": quality,
        "complete": len(rows) == len(wanted),
        "failed_generators": failed,
    }


def verdicts(summary: list[dict[str, Any]], metric: str = "dice_slice") -> dict[str, Any]:
    """Per protocol: the real-only Dice, each method's best N and its gain, and whether that difference,
    either way, is larger than the seed spread (the 95 % intervals of best-N and real-only do not
    overlap): a gain beyond it helps, a loss beyond it harms."""
    out: dict[str, Any] = {}
    for protocol in sorted({s["protocol"] for s in summary}):
        ours = [s for s in summary if s["protocol"] == protocol]
        base = next((s for s in ours if s["method"] == "none"), None)
        if base is None:
            continue
        per_method = {}
        for method in sorted({s["method"] for s in ours} - {"none"}):
            best = max((s for s in ours if s["method"] == method), key=lambda s: s[metric]["mean"])
            gain = best[metric]["mean"] - base[metric]["mean"]
            lo, hi = best[metric]["ci_low"], best[metric]["ci_high"]
            separated = lo > base[metric]["ci_high"] or hi < base[metric]["ci_low"]
            per_method[method] = {
                "best_n": best["n_synthetic"],
                "best": best[metric]["mean"],
                "gain": gain,
                "beyond_seed_spread": bool(separated) if not math.isnan(lo) else None,
            }
        out[protocol] = {"metric": metric, "none": base[metric]["mean"], "methods": per_method}
    return out


def plot_report(report: dict[str, Any], path: Path, metric: str = "dice_slice") -> None:
    """Dice against N per method, one panel per protocol (the paper's Dice-evolution figure), as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    protocols = sorted({s["protocol"] for s in report["summary"]})
    fig, axes = plt.subplots(
        1, max(1, len(protocols)), figsize=(6 * max(1, len(protocols)), 4.2), squeeze=False
    )
    for ax, protocol in zip(axes[0], protocols, strict=False):
        ours = [s for s in report["summary"] if s["protocol"] == protocol]
        base = next((s for s in ours if s["method"] == "none"), None)
        for method in [m for m in METHODS if m != "none" and any(s["method"] == m for s in ours)]:
            pts = sorted((s for s in ours if s["method"] == method), key=lambda s: s["n_synthetic"])
            if base is not None:
                pts = [base, *pts]
            x = [s["n_synthetic"] for s in pts]
            y = [100 * s[metric]["mean"] for s in pts]
            err = [0 if math.isnan(s[metric]["std"]) else 100 * s[metric]["std"] for s in pts]
            ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=method)
        if base is not None:
            ax.axhline(100 * base[metric]["mean"], color="grey", ls=":", lw=1, label="no augmentation")
        ax.set_title(f"{protocol.replace('_', ' ')}")
        ax.set_xlabel("synthetic slices added (N)")
        ax.set_ylabel(f"{metric.replace('_', ' ')} (%), mean +- std over seeds")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = Path(path).with_name(Path(path).name + ".partial.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def report_markdown(report: dict[str, Any], *, paper: bool = False, title: str = "Efficacy") -> str:
    """The summary table (mean +- std [95 % CI] per cell), the verdicts and, for BraTS, the paper's numbers."""
    d, c = report["data"], report["config"]
    lines = [
        f"# {title}",
        "",
        f"Patients: train {', '.join(d['train_patients'])}; test {', '.join(d['test_patients'])}. "
        f"Generators see {d['generator_slices']} balanced tumour slices of the training patients; the U-Net "
        f"{d['unet_real_slices']} real tumour slices (+ N synthetic); tested on {d['test_tumour_slices']} "
        f"tumour slices of the test patients.",
        f"Generators: preset `{c['preset']}`, {c['generator_steps']} steps, seed {c['generator_seed']}. "
        f"U-Net: {c['segmenter']['epochs']} epochs (fixed_epochs) or {report['step_budget']} steps for every "
        f"run (step_matched), batch {c['segmenter']['batch_size']}, seeds {c['seeds']}."
        + ("" if report["complete"] else " **Partial: not every cell of the grid has run yet.**"),
        "",
        "| protocol | method | N | seeds | dice_slice (%) | dice_pooled (%) | dice_3d (%) | hd95 |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def fmt(s: dict[str, float], scale: float = 100.0) -> str:
        if math.isnan(s["std"]):
            return f"{scale * s['mean']:.1f}"
        return f"{scale * s['mean']:.1f} +- {scale * s['std']:.1f} [{scale * s['ci_low']:.1f}, {scale * s['ci_high']:.1f}]"

    for s in report["summary"]:
        lines.append(
            f"| {s['protocol']} | {s['method']} | {s['n_synthetic']} | {s['n_seeds']} | {fmt(s['dice_slice'])} "
            f"| {fmt(s['dice_pooled'])} | {fmt(s['dice_3d'])} | {fmt(s['hd95'], 1.0)} |"
        )
    lines += ["", "Best N per method (dice_slice), gain over no augmentation:", ""]
    for protocol, v in report["verdict"].items():
        for method, b in v["methods"].items():
            sep = {True: "beyond the seed spread", False: "within the seed spread", None: "one seed"}[
                b["beyond_seed_spread"]
            ]
            lines.append(
                f"- {protocol}, {method}: best N = {b['best_n']}, {100 * b['best']:.1f} % "
                f"({100 * b['gain']:+.1f} points vs {100 * v['none']:.1f} %, {sep})"
            )
    if paper:
        lines += [
            "",
            "The paper's BraTS figures (dice_slice %, 10 training / 30 test patients, fixed epochs):",
            "",
            "| method | " + " | ".join(str(n) for n in PAPER_BRATS["dhvae"]) + " |",
            "|---|" + "---|" * len(PAPER_BRATS["dhvae"]),
        ]
        for method, vals in PAPER_BRATS.items():
            lines.append(f"| {method} | " + " | ".join(f"{v:.1f}" for v in vals.values()) + " |")
    for method, why in report.get("failed_generators", {}).items():
        lines.append(f"- {method}: no pairs ({why})")
    q = report.get("quality") or {}
    if q and "note" not in q:
        keys = ["psnr_db", "ssim", "lpips", "frechet_vgg16", "mask_area_js_bits"]
        lines += [
            "",
            "Quality of each generator's pairs against the test patients' slices (real_train: the training "
            "slices themselves, what a perfect generator would score):",
            "",
            "| generator | " + " | ".join(keys) + " | near-copies |",
            "|---|" + "---|" * (len(keys) + 1),
        ]
        for name, m in q.items():
            cells_ = [f"{m[k]:.3f}" if k in m else "-" for k in keys]
            mem = m.get("memorisation")
            near = f"{mem['fraction_near_copies']:.1%}" if mem else "-"
            lines.append(f"| {name} | " + " | ".join(cells_) + f" | {near} |")
    return "\n".join(lines) + "\n"


def json_safe(obj: Any) -> Any:
    """The report with NaN and infinities as None (null), for strict JSON (a single seed has no std)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    return obj


def segmenter_config(**overrides: Any) -> SegmenterConfig:
    """SegmenterConfig with some fields replaced (tuples from lists, for JSON requests). ``channels``
    without ``strides`` gets one stride-2 downsampling between consecutive widths."""
    fixed = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items() if v is not None}
    if "channels" in fixed and "strides" not in fixed:
        fixed["strides"] = (2,) * (len(fixed["channels"]) - 1)
    return replace(SegmenterConfig(), **fixed)
