"""Why does copy-paste fix one test patient? (issue 11: on pat0006 the strong baseline scores about 52 %
slice Dice and TumorCP's online copy-paste about 79 %, at both seeds; elsewhere they tie)

For one fold and seed of the cross-validation, this trains the U-Nets of the given arms exactly as the grid
does (``crossval.arm_training`` + ``train_segmenter``, the fold's budget from the work folder) and segments
the fold's test patients. The runs are deterministic on one CPU kind, so on the kind of that seed's rows
each U-Net reproduces its committed row (checked: ``reproduces``). Per test patient it reports:

- the tumour's size against the fold's *training* patients' (volume, largest slice area);
- 3D recall and precision, raw and after the largest-component post-processing, and the predicted volume:
  does the baseline miss tumour (recall) or add it (precision)?
- slice Dice split by the slice's tumour area: within the largest training slice's area, or above it
  (sizes the U-Net never saw).

Numbers only: nothing here chooses a setting, so reading the test patients is no tuning. About 8 min per
``real_aug`` U-Net and 12 per copy-paste one on 2 cores.

    OMP_NUM_THREADS=2 .venv/bin/python bench/efficacy/hard_patient.py --fold 2 --seed 0 \\
        --arms real_aug insert_online_tumour --work runs/efficacy_cv_2400 \\
        --committed bench/results/efficacy_cv_2400.json

Results: bench/results/hard_patient.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/: the shared-data helpers
from machine import footer, provenance, write_report  # noqa: E402

from brats import REPO, combined_cohort  # noqa: E402
from efficacy.crossval import (  # noqa: E402
    ARMS,
    CVConfig,
    arm_training,
    cohort_splits,
    fold_data,
    online_donors,
    work_settings,
)
from efficacy.segmenter import (  # noqa: E402
    largest_component,
    ml_per_voxel,
    segment_volume,
    segmenter_config,
    soft_dice,
    train_segmenter,
)
from imaging.cohort import CohortSpec  # noqa: E402
from pipeline import pipeline  # noqa: E402


def overlap(pred: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """3D recall (share of the tumour found) and precision (share of the prediction that is tumour)."""
    hit = float(np.logical_and(pred, truth).sum())
    return {
        "recall": hit / max(float(truth.sum()), 1.0),
        "precision": hit / float(pred.sum()) if pred.any() else float("nan"),
    }


def tumour_sizes(mask: np.ndarray, ml_per_voxel: float) -> dict[str, float]:
    """A case's tumour volume (ml) and its largest axial slice area (pixels of the resampled grid)."""
    return {"volume_ml": float(mask.sum()) * ml_per_voxel, "largest_slice_px": int(mask.sum((0, 1)).max())}


def measure_case(model: Any, case: Any, train_max_px: int, threshold: float) -> dict[str, Any]:
    """One test patient under one U-Net: size, recall / precision (raw and post-processed), predicted
    volume, and slice Dice within / above the training patients' largest slice area."""
    mask = np.asarray(case.mask) > 0
    ml = ml_per_voxel(case)
    prob = segment_volume(model, case.image)
    pred = prob > threshold
    kept = largest_component(pred)
    tumour = np.flatnonzero(mask.any((0, 1)))
    areas = mask.sum((0, 1))[tumour]
    dice = soft_dice(np.moveaxis(prob[..., tumour], -1, 0), np.moveaxis(mask[..., tumour], -1, 0))
    above = areas > train_max_px
    return {
        "case_id": case.case_id,
        **tumour_sizes(mask, ml),
        "predicted_volume_ml": float(pred.sum()) * ml,
        "predicted_volume_lcc_ml": float(kept.sum()) * ml,
        **overlap(pred, mask),
        **{f"{k}_lcc": v for k, v in overlap(kept, mask).items()},
        "dice_slice": float(dice.mean()),
        "slices_within": int((~above).sum()),
        "dice_slice_within": float(dice[~above].mean()) if (~above).any() else float("nan"),
        "slices_above": int(above.sum()),
        "dice_slice_above": float(dice[above].mean()) if above.any() else float("nan"),
    }


def committed_slice_dice(committed: dict[str, Any], fold: int, arm: str, seed: int) -> dict[str, float]:
    """The committed grid's per-patient slice Dice of one run (empty when it has none)."""
    for r in committed.get("rows", []):
        if (r["fold"], r["arm"], r["seed"]) == (fold, arm, seed):
            return {c["case_id"]: c["dice_slice"] for c in r["per_case"]}
    return {}


def markdown(report: dict[str, Any]) -> str:
    """The report's table, one row per (test patient, arm)."""
    t = report["training"]
    lines = [
        "# Why copy-paste fixes one test patient",
        "",
        f"Fold {report['fold']}, seed {report['seed']}: the U-Nets train on {', '.join(t['patients'])} "
        f"(largest tumour {max(t['volume_ml'].values()):.0f} ml; largest tumour slice "
        f"{t['largest_slice_px']} px) for the fold's budget of {report['budget']} steps, and segment the "
        "fold's test patients. 3D metrics on the thresholded prediction; `_lcc` after keeping the largest "
        "3D component.",
        "",
        "| patient | volume (ml) | largest slice (px) | arm | predicted (ml) | recall | precision "
        "| recall, lcc | precision, lcc | slice Dice | slices within / above | Dice within | Dice above "
        "| reproduces |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in report["cases"]:
        lines.append(
            f"| {c['case_id']} | {c['volume_ml']:.0f} | {c['largest_slice_px']} | {c['arm']} "
            f"| {c['predicted_volume_ml']:.0f} | {100 * c['recall']:.1f} | {100 * c['precision']:.1f} "
            f"| {100 * c['recall_lcc']:.1f} | {100 * c['precision_lcc']:.1f} | {100 * c['dice_slice']:.1f} "
            f"| {c['slices_within']} / {c['slices_above']} | {100 * c['dice_slice_within']:.1f} "
            f"| {100 * c['dice_slice_above']:.1f} | {c['reproduces']} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fold", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--arms", nargs="+", choices=sorted(ARMS), default=["real_aug", "insert_online_tumour"])
    ap.add_argument("--work", type=Path, default=REPO / "runs/efficacy_cv_2400")
    ap.add_argument("--committed", type=Path, default=REPO / "bench/results/efficacy_cv_2400.json")
    ap.add_argument("--out", type=Path, default=REPO / "bench/results")
    args = ap.parse_args()

    # the grid's settings, as its work folder claims them (a new machine: cv.py --resume-from ... --report-only)
    settings = json.loads((args.work / "settings.json").read_text())
    cfg = CVConfig(
        arms=tuple(args.arms), **{**settings, "segmenter": segmenter_config(**settings["segmenter"])}
    )
    if work_settings(cfg.to_dict()) != work_settings(settings):
        raise SystemExit(f"{args.work}: its settings do not rebuild into one CVConfig")
    budget = json.loads((args.work / f"fold{args.fold}" / "budget.json").read_text())["steps"]
    committed = json.loads(args.committed.read_text()) if args.committed.is_file() else {}

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        cohort = combined_cohort(["train", "validation", "test"], Path(tmp))
        ing = pipeline.ingest(cohort, cache_dir=args.work / "cache", spec=CohortSpec(channel="flair"))
    splits = cohort_splits(ing, cfg)
    fold = fold_data(ing, splits[args.fold], args.fold, cfg)
    train_sizes = {c.case_id: tumour_sizes(np.asarray(c.mask) > 0, ml_per_voxel(c)) for c in fold.train_cases}
    train_max_px = max(s["largest_slice_px"] for s in train_sizes.values())

    cases: list[dict[str, Any]] = []
    for name in args.arms:
        arm = cfg.arm(name)
        donors = online_donors(arm, fold, cfg, args.work / f"fold{args.fold}")
        kw, _ = arm_training(arm, fold, None, budget=budget, cfg=cfg, donors=donors)
        model = train_segmenter(fold.real_pool, seed=args.seed, **kw)
        before = committed_slice_dice(committed, args.fold, name, args.seed)
        for case in fold.data.test_cases:
            row = {"arm": name, **measure_case(model, case, train_max_px, cfg.segmenter.threshold)}
            old = before.get(case.case_id)
            row["reproduces"] = (
                "n/a" if old is None else "yes" if abs(old - row["dice_slice"]) < 1e-6 else "no"
            )
            cases.append(row)
            print(json.dumps(row), flush=True)

    report = {
        "fold": args.fold,
        "seed": args.seed,
        "budget": budget,
        "training": {
            "patients": sorted(train_sizes),
            "volume_ml": {k: v["volume_ml"] for k, v in train_sizes.items()},
            "largest_slice_px": train_max_px,
        },
        "cases": sorted(cases, key=lambda c: (c["case_id"], args.arms.index(c["arm"]))),
        **provenance("bench/efficacy/hard_patient.py", t0, "OMP_NUM_THREADS=2 "),
    }
    write_report(args.out, "hard_patient", report, [markdown(report), footer(report)])


if __name__ == "__main__":
    main()
