"""Choose on the inner validation split only (issue 11: "choose every hyperparameter on the inner
split"); the test patients are never opened.

The optimiser of the strong baseline: efficacy/crossval.py's choose_budget, run for each optimiser on
the same folds and held-out training patients.

    OMP_NUM_THREADS=2 .venv/bin/python bench/efficacy/inner_probe.py --folds-run 0 1 --inner-patients 1

Results: bench/results/inner_probe.{json,md}: each variant's smoothed inner curve per fold, its best and
its budget, and the variant with the higher mean best (what the cross-validation should then use).

Which recipes go to the test folds (``--arms``): each arm trained on a fold's training patients but one
held-out training patient (its pairs drawn from those patients only, and an agreement filter's scorer
trained on them for the fold's budget), its slice Dice on the held-out patient at the fold's budget
against the strong baseline's, whose curves and budgets come from the cross-validation's work folder
(runs/efficacy_cv, the same settings: a resumed grid reuses them).

    OMP_NUM_THREADS=2 .venv/bin/python bench/efficacy/inner_probe.py --arms insert insert_healthy \
        --optimizer adam --inner-patients 2 --probe-patients 1

On a new machine, restore the folder's budgets first (``cv.py --resume-from
bench/results/efficacy_cv.json --report-only``), then ``--resume-from bench/results/inner_probe_arms.json``
reuses the committed arms' curves whose recipe still holds (an older insertion's are probed again).

Rule, fixed before a run: an arm goes to the test folds when its mean inner gain at the budget (over
the probed folds and patients) is above 0. Results: bench/results/inner_probe_arms.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/: the shared-data helpers
from machine import footer, provenance, write_report  # noqa: E402

from brats import REPO, combined_cohort  # noqa: E402
from efficacy.crossval import (  # noqa: E402
    ARMS,
    REFERENCE,
    CVConfig,
    cached_inner_curve,
    choose_budget,
    cohort_splits,
    fold_data,
    inner_validation_patients,
    restore_arm_curves,
    smooth3,
    work_settings,
)
from efficacy.grid import claim_work_dir  # noqa: E402
from efficacy.segmenter import OPTIMIZER_LR, UNET_WIDTHS, segmenter_config  # noqa: E402
from imaging.cohort import CohortSpec  # noqa: E402
from pipeline import pipeline  # noqa: E402

# name -> SegmenterConfig fields: each optimiser at its own learning rate (the authors' RMSprop 1e-4 with
# momentum 0.999, Adam 1e-3)
SCRIPT, ENV = "bench/efficacy/inner_probe.py", "OMP_NUM_THREADS=2 "  # the reports' command line

VARIANTS: dict[str, dict[str, object]] = {
    name: {"optimizer": name, "lr": lr} for name, lr in OPTIMIZER_LR.items()
}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=sorted(VARIANTS))
    ap.add_argument("--arms", nargs="+", choices=sorted(set(ARMS) - {REFERENCE}), help="probe recipes")
    ap.add_argument("--optimizer", choices=sorted(OPTIMIZER_LR), default="adam", help="--arms: the U-Net's")
    ap.add_argument("--probe-patients", type=int, default=1, help="--arms: held-out patients per fold")
    ap.add_argument("--folds-run", nargs="+", type=int, default=[0, 1, 2], help="which folds to probe")
    ap.add_argument("--inner-patients", type=int, default=1)
    ap.add_argument("--unet", choices=sorted(UNET_WIDTHS), default="small")
    ap.add_argument("--max-steps", type=int, default=1200)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--work", type=Path, help="default: runs/inner_probe (--arms: runs/efficacy_cv)")
    ap.add_argument("--out", type=Path, default=REPO / "bench/results")
    ap.add_argument(
        "--resume-from",
        type=Path,
        help="--arms: a committed probe report (bench/results/inner_probe_arms.json) whose arms' curves "
        "seed the work folder (restore the folder's budgets first: cv.py --resume-from ... --report-only)",
    )
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args.work = args.work or REPO / "runs" / ("efficacy_cv" if args.arms else "inner_probe")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        cohort = combined_cohort(["train", "validation", "test"], Path(tmp))
        ing = pipeline.ingest(cohort, cache_dir=args.work / "cache", spec=CohortSpec(channel="flair"))
    if args.arms:
        probe_arms(args, ing, t0)
        return
    results: dict[str, dict[int, dict]] = {}
    for name in args.variants:
        cfg = CVConfig(
            max_steps=args.max_steps,
            eval_every=args.eval_every,
            inner_patients=args.inner_patients,
            segmenter=segmenter_config(channels=UNET_WIDTHS[args.unet], **VARIANTS[name]),
        )
        splits = cohort_splits(ing, cfg)
        for i in args.folds_run:
            fold = fold_data(ing, splits[i], i, cfg)
            budget = choose_budget(ing, fold, cfg, args.work / name / f"fold{i}", pipeline.default_device())
            results.setdefault(name, {})[i] = budget
    summary = {
        name: {
            "settings": VARIANTS[name],
            "best_smoothed": {i: max(p["smoothed"] for p in b["curve"]) for i, b in by_fold.items()},
            "budget": {i: b["steps"] for i, b in by_fold.items()},
        }
        for name, by_fold in results.items()
    }
    for s in summary.values():
        s["mean_best"] = float(np.mean(list(s["best_smoothed"].values())))
    chosen = max(summary, key=lambda n: summary[n]["mean_best"])
    report = {
        "variants": summary,
        "chosen": chosen,
        "curves": results,
        **provenance(SCRIPT, t0, ENV),
    }
    lines = [
        "# The strong baseline's optimiser, chosen on the inner validation split",
        "",
        "Slice Dice (%) of the strong baseline (real slices + online augmentation) on held-out *training*",
        "patients, 3-point smoothed; the test patients are not used.",
        "",
        f"| variant | fold | held out | best | budget (steps) | curve (every {args.eval_every} steps) |",
        "|---|---|---|---|---|---|",
    ]
    for name, by_fold in results.items():
        for i, b in by_fold.items():
            curve = " ".join(f"{100 * p['smoothed']:.0f}" for p in b["curve"])
            lines.append(
                f"| {name} | {i} | {', '.join(b['validation_patients'])} | "
                f"{100 * summary[name]['best_smoothed'][i]:.1f} | {b['steps']} | {curve} |"
            )
    lines += [
        "",
        "Mean best: "
        + ", ".join(f"{n} {100 * s['mean_best']:.1f}" for n, s in summary.items())
        + f". **Chosen: {chosen}.**",
        "",
        f"{footer(report)} U-Net widths `{args.unet}`.",
        "",
    ]
    write_report(args.out, "inner_probe", report, lines)


def probe_arms(args: argparse.Namespace, ing, t0: float) -> None:
    """``--arms``: each arm against the strong baseline on held-out training patients, at the budget."""
    cfg = CVConfig(
        arms=(REFERENCE, *args.arms),
        max_steps=args.max_steps,
        eval_every=args.eval_every,
        inner_patients=args.inner_patients,
        segmenter=segmenter_config(
            channels=UNET_WIDTHS[args.unet], optimizer=args.optimizer, lr=OPTIMIZER_LR[args.optimizer]
        ),
    )
    # the cross-validation's own folder: its settings must be these (the budgets and the reference's
    # curves are its cached ones)
    claim_work_dir(args.work, work_settings(cfg.to_dict()), "a cross-validation")
    if args.resume_from:
        restored = restore_arm_curves(json.loads(args.resume_from.read_text()), args.work)
        logging.info("%s: restored %s", args.resume_from, ", ".join(restored) or "nothing")
    device = pipeline.default_device()
    splits = cohort_splits(ing, cfg)
    rows = []
    for i in args.folds_run:
        fold = fold_data(ing, splits[i], i, cfg)
        fdir = args.work / f"fold{i}"
        budget = choose_budget(ing, fold, cfg, fdir, device)["steps"]
        for val_id in inner_validation_patients(fold, cfg)[: args.probe_patients]:
            curves = {
                name: cached_inner_curve(ing, fold, cfg.arm(name), val_id, cfg, fdir, device, budget=budget)
                for name in cfg.arms
            }
            for name, curve in curves.items():
                steps = [s for s, _ in curve]
                smooth = smooth3([d for _, d in curve])
                rows.append(
                    {
                        "fold": i,
                        "held_out": val_id,
                        "arm": name,
                        "budget": budget,
                        "at_budget": float(smooth[steps.index(budget)]),
                        "best": float(smooth.max()),
                        "curve": curve,
                    }
                )
    ref = {(r["fold"], r["held_out"]): r["at_budget"] for r in rows if r["arm"] == REFERENCE}
    gains = {
        name: float(
            np.mean([r["at_budget"] - ref[r["fold"], r["held_out"]] for r in rows if r["arm"] == name])
        )
        for name in args.arms
    }
    winners = sorted((n for n, g in gains.items() if g > 0), key=lambda n: -gains[n])
    report = {
        "rows": rows,
        "mean_gain_at_budget": gains,
        "to_test_folds": winners,
        "rule": "an arm goes to the test folds when its mean inner gain at the budget is above 0",
        "arms": {n: cfg.arm(n).settings() for n in cfg.arms},
        **provenance(SCRIPT, t0, ENV),
    }
    lines = [
        "# Which recipes go to the test folds: the inner validation split",
        "",
        "Slice Dice (%) on a held-out *training* patient of each fold (3-point smoothed), each arm trained",
        "on the fold's other training patients (pairs drawn from them only); the test patients are not used.",
        "",
        f"| fold | held out | arm | at the budget | gain | best | curve (every {args.eval_every} steps) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        gain = r["at_budget"] - ref[r["fold"], r["held_out"]]
        shown = " ".join(f"{100 * d:.0f}" for d in smooth3([d for _, d in r["curve"]]))
        lines.append(
            f"| {r['fold']} | {r['held_out']} | {r['arm']} | {100 * r['at_budget']:.1f} (step {r['budget']}) | "
            f"{'' if r['arm'] == REFERENCE else f'{100 * gain:+.1f}'} | {100 * r['best']:.1f} | {shown} |"
        )
    lines += [
        "",
        "Mean gain at the budget over the strong baseline: "
        + ", ".join(f"{n} {100 * g:+.1f}" for n, g in gains.items())
        + f". Rule: {report['rule']}. **To the test folds: {', '.join(winners) or 'none'}.**",
        "",
        f"{footer(report)} U-Net widths `{args.unet}`, optimiser {args.optimizer}.",
        "",
    ]
    write_report(args.out, "inner_probe_arms", report, lines)


if __name__ == "__main__":
    main()
