"""Choose the strong baseline's optimiser on the inner validation split only (issue 11, A.3 and the
"choose every hyperparameter on the inner split" rule): efficacy/crossval.py's choose_budget, run for
each optimiser on the same folds and held-out training patients; the test patients are never opened.

    OMP_NUM_THREADS=2 .venv/bin/python bench/efficacy/inner_probe.py --folds-run 0 1 --inner-patients 1

Results: bench/results/inner_probe.{json,md}: each variant's smoothed inner curve per fold, its best and
its budget, and the variant with the higher mean best (what the cross-validation should then use).
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/: the shared-data helpers
from machine import describe, machine  # noqa: E402

from brats import REPO, combined_cohort  # noqa: E402
from efficacy.crossval import CVConfig, choose_budget, fold_data, make_folds  # noqa: E402
from efficacy.segmenter import OPTIMIZER_LR, UNET_WIDTHS, segmenter_config  # noqa: E402
from imaging.cohort import CohortSpec  # noqa: E402
from pipeline import pipeline  # noqa: E402

# name -> SegmenterConfig fields: each optimiser at its own learning rate (the authors' RMSprop 1e-4 with
# momentum 0.999, Adam 1e-3)
VARIANTS: dict[str, dict[str, object]] = {
    name: {"optimizer": name, "lr": lr} for name, lr in OPTIMIZER_LR.items()
}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=sorted(VARIANTS))
    ap.add_argument("--folds-run", nargs="+", type=int, default=[0, 1, 2], help="which folds to probe")
    ap.add_argument("--inner-patients", type=int, default=1)
    ap.add_argument("--unet", choices=sorted(UNET_WIDTHS), default="small")
    ap.add_argument("--max-steps", type=int, default=1200)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--work", type=Path, default=REPO / "runs" / "inner_probe")
    ap.add_argument("--out", type=Path, default=REPO / "bench/results")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        cohort = combined_cohort(["train", "validation", "test"], Path(tmp))
        ing = pipeline.ingest(cohort, cache_dir=args.work / "cache", spec=CohortSpec(channel="flair"))
    results: dict[str, dict[int, dict]] = {}
    for name in args.variants:
        cfg = CVConfig(
            max_steps=args.max_steps,
            eval_every=args.eval_every,
            inner_patients=args.inner_patients,
            segmenter=segmenter_config(channels=UNET_WIDTHS[args.unet], **VARIANTS[name]),
        )
        splits = make_folds([c.case_id for c in ing.slices.cases], cfg.folds, seed=cfg.fold_seed)
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
        "machine": machine(),
        "command": " ".join(
            [
                "OMP_NUM_THREADS=2 .venv/bin/python bench/efficacy/inner_probe.py",
                *map(shlex.quote, sys.argv[1:]),
            ]
        ),
        "wall_minutes": round((time.perf_counter() - t0) / 60, 1),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "inner_probe.json").write_text(json.dumps(report, indent=1, default=str))
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
        f"Command: `{report['command']}` ({report['wall_minutes']} min). Machine: "
        f"{describe(report['machine'])}. U-Net widths `{args.unet}`.",
        "",
    ]
    (args.out / "inner_probe.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
