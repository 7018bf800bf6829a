"""Cross-validated efficacy on the six shared BraTS cases (issue 11, part A): efficacy/crossval.py.

3 folds of 4 training and 2 test patients (every patient tested once), the strong baseline (real slices
with MONAI online augmentation), a step budget chosen per fold on an inner validation patient, paired
gains with a patient-level bootstrap interval.

    .venv/bin/python bench/efficacy/cv.py                                  # the default arms, 5 seeds
    .venv/bin/python bench/efficacy/cv.py --seeds 3 --arms real real_aug insert insert_online
    .venv/bin/python bench/efficacy/cv.py --report-only                    # report what is done
    .venv/bin/python bench/efficacy/cv.py ... --resume-from bench/results/efficacy_cv.json  # new machine
    .venv/bin/python bench/efficacy/cv.py ... --remeasure real_aug --remeasure-seeds 0  # older rows again,
                                                                    # with the post-processed 3D metrics

Results: bench/results/efficacy_cv.{json,md,png}. Resumable: the work folder (runs/efficacy_cv) keeps
every finished run; the same command continues. Arms may be added; other settings need a new folder.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/: the shared-data helpers
from machine import describe, machine  # noqa: E402

from brats import REPO, combined_cohort  # noqa: E402
from efficacy.crossval import (  # noqa: E402
    ARMS,
    CVConfig,
    foreign_seeds,
    remeasure,
    restore_work_dir,
    run_crossval,
    write_crossval,
)
from efficacy.segmenter import OPTIMIZER_LR, UNET_WIDTHS, segmenter_config  # noqa: E402
from imaging.cohort import CohortSpec  # noqa: E402
from pipeline import pipeline  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arms", nargs="+", choices=sorted(ARMS), help="default: CVConfig's")
    ap.add_argument("--seeds", type=int, default=5, help="U-Net seeds 0..n-1")
    ap.add_argument(
        "--train-seeds",
        type=int,
        nargs="+",
        help="train only these seeds' missing runs (a session on the CPU kind of one seed's rows); "
        "the report still covers 0..n-1",
    )
    ap.add_argument("--folds", type=int, default=3)
    ap.add_argument(
        "--train-folds",
        type=int,
        nargs="+",
        help="train only these folds' missing runs (a session with time for one fold's generator fit); "
        "the report still covers every fold",
    )
    ap.add_argument("--unet", choices=sorted(UNET_WIDTHS), default="small")
    ap.add_argument("--max-steps", type=int, default=1200, help="inner validation: longest run")
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--inner-patients", type=int, default=2, help="held-out training patients per fold")
    ap.add_argument(
        "--optimizer",
        choices=sorted(OPTIMIZER_LR),
        default="rmsprop",
        help="every arm's U-Net optimiser (rmsprop: the authors'; choose with bench/efficacy/inner_probe.py)",
    )
    ap.add_argument("--lr", type=float, help=f"its learning rate (default: {OPTIMIZER_LR})")
    ap.add_argument("--generator-steps", type=int, default=2000)
    ap.add_argument(
        "--n", type=int, help="offline pairs of every arm that has them (default: each arm's, 500)"
    )
    ap.add_argument("--preset", default="small")
    ap.add_argument("--name", default="efficacy_cv")
    ap.add_argument("--work", type=Path, help="work folder (default: runs/<name>)")
    ap.add_argument("--out", type=Path, default=REPO / "bench/results")
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument(
        "--resume-from",
        type=Path,
        help="a committed report (e.g. bench/results/efficacy_cv.json): seed the work folder with its "
        "budgets and finished runs (a new machine has no runs/)",
    )
    ap.add_argument(
        "--remeasure",
        nargs="+",
        default=[],
        choices=sorted(ARMS),
        help="train these arms' finished runs again where they predate the post-processed 3D metrics "
        "(each new row keeps the old metrics as 'before': the determinism check)",
    )
    ap.add_argument("--remeasure-seeds", type=int, nargs="+", help="only these seeds (default: all)")
    args = ap.parse_args(argv)
    for flag, chosen, what, count in (
        ("--train-seeds", args.train_seeds, "seed", args.seeds),
        ("--remeasure-seeds", args.remeasure_seeds, "seed", args.seeds),
        ("--train-folds", args.train_folds, "fold", args.folds),
    ):
        if chosen and not set(chosen) <= set(range(count)):  # it would train nothing, silently
            ap.error(f"{flag} {chosen}: every {what} must lie in 0..{count - 1} (--{what}s {count})")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    work = args.work or REPO / "runs" / args.name
    kw = {"arms": tuple(args.arms)} if args.arms else {}
    cfg = CVConfig(
        **kw,
        folds=args.folds,
        seeds=tuple(range(args.seeds)),
        max_steps=args.max_steps,
        eval_every=args.eval_every,
        inner_patients=args.inner_patients,
        preset=args.preset,
        generator_steps=args.generator_steps,
        n_synthetic=args.n,
        segmenter=segmenter_config(
            channels=UNET_WIDTHS[args.unet],
            optimizer=args.optimizer,
            lr=args.lr or OPTIMIZER_LR[args.optimizer],
        ),
    )
    if args.resume_from:
        committed = json.loads(args.resume_from.read_text())
        # rows that predate the tag ran on the machine the committed report names
        added = restore_work_dir(
            committed, work, fallback_tags={"cpu_flags": committed["machine"]["cpu_flags"]}
        )
        logging.info("%s: %d finished runs restored into %s", args.resume_from, added, work)
    if args.remeasure:
        moved = remeasure(work, args.remeasure, args.remeasure_seeds or cfg.seeds)
        logging.info("%d finished runs of %s to train again", moved, ", ".join(args.remeasure))
    here = machine()
    if not args.report_only and (
        foreign := foreign_seeds(work, args.train_seeds or cfg.seeds, here["cpu_flags"])
    ):
        kinds = "; ".join(f"seed {s}: {', '.join(k)}" for s, k in foreign.items())
        ap.error(
            f"this CPU ({', '.join(here['cpu_flags'])}) would train seeds other CPU kinds began ({kinds}); "
            "its runs would pair with nothing: pass --train-seeds of this kind, or a separate --work"
        )
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        cohort = combined_cohort(["train", "validation", "test"], Path(tmp))
        ing = pipeline.ingest(cohort, cache_dir=work / "cache", spec=CohortSpec(channel="flair"))
    device = pipeline.default_device()
    report = run_crossval(
        ing,
        cfg,
        work,
        device=device,
        report_only=args.report_only,
        row_tags={"cpu_flags": here["cpu_flags"]},
        train_seeds=args.train_seeds,
        train_folds=args.train_folds,
    )
    report["machine"] = here
    # the CPU kinds the rows ran on: fp32 kernels round differently on AVX2 and AVX-512 (a run's curve
    # drifts by 1.2e-4 Dice at step 100: bench/efficacy/cross_cpu.py), so a resumed grid says which rows ran where
    kinds = Counter(", ".join(r.get("cpu_flags") or ["unknown"]) for r in report["rows"])
    report["rows_by_cpu"] = dict(kinds)
    report["command"] = " ".join([".venv/bin/python bench/efficacy/cv.py", *map(shlex.quote, sys.argv[1:])])
    report["wall_minutes_this_invocation"] = round((time.perf_counter() - t0) / 60, 1)
    by_cpu = "; ".join(f"{k}: {v}" for k, v in kinds.items())
    extra = (
        f"\nCommand: `{report['command']}`. Machine: {describe(report['machine'])}. "
        f"Rows by CPU flags: {by_cpu}. U-Net widths `{args.unet}`, "
        f"optimiser {cfg.segmenter.optimizer} (lr {cfg.segmenter.lr:g}). "
        f"Plot: `{args.name}.png`. Raw rows: `{args.name}.json`.\n"
    )
    write_crossval(report, args.out, args.name, extra)
    print((args.out / f"{args.name}.md").read_text())


if __name__ == "__main__":
    main()
