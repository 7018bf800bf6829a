"""Does this CPU reproduce a committed cross-validation's numbers? (sessions run on different CPUs)

Trains the strong baseline of one fold's inner validation for the first ``--steps`` steps, with the
settings of a committed report (``bench/results/efficacy_cv.json``), and prints its validation curve
beside the committed one. The U-Net trains in fp32 everywhere, but AVX2 and AVX-512 kernels round
differently, so a run resumed on another kind of CPU drifts from the committed one; this says by how
much, before the rows of two machines are mixed in one table. About 1.5 minutes for 200 steps.

    OMP_NUM_THREADS=2 .venv/bin/python bench/efficacy/cross_cpu.py --fold 0 --steps 200
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/: the shared-data helpers
from machine import describe, machine  # noqa: E402

from brats import REPO, combined_cohort  # noqa: E402
from efficacy.crossval import CVConfig, cohort_splits, fold_data, inner_curve  # noqa: E402
from efficacy.segmenter import SegmenterConfig  # noqa: E402
from imaging.cohort import CohortSpec  # noqa: E402
from pipeline import pipeline  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--report", type=Path, default=REPO / "bench/results/efficacy_cv.json")
    ap.add_argument("--fold", type=int, default=0)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--work", type=Path, default=REPO / "runs" / "efficacy_cv", help="its ingest cache")
    args = ap.parse_args(argv)
    committed = json.loads(args.report.read_text())
    c = committed["config"]
    seg = c["segmenter"]
    segmenter = SegmenterConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in seg.items()})
    cfg = CVConfig(
        folds=c["folds"],
        fold_seed=c["fold_seed"],
        tumour_free_ratio=c["tumour_free_ratio"],
        eval_every=c["eval_every"],
        inner_patients=c["inner_patients"],
        segmenter=segmenter,
    )
    cfg = replace(cfg, max_steps=args.steps)  # the first steps of the same run (no schedule depends on it)
    with tempfile.TemporaryDirectory() as tmp:
        cohort = combined_cohort(["train", "validation", "test"], Path(tmp))
        ing = pipeline.ingest(cohort, cache_dir=args.work / "cache", spec=CohortSpec(channel="flair"))
    splits = cohort_splits(ing, cfg)
    budget = committed["folds"][args.fold]["budget"]
    patient = budget["validation_patients"][0]
    here = inner_curve(ing, fold_data(ing, splits[args.fold], args.fold, cfg), patient, cfg)
    theirs = {p["step"]: p[patient] for p in budget["curve"]}
    print(f"fold {args.fold}, {patient} held out; committed on {describe(committed['machine'])}")
    print(f"here: {describe(machine())}")
    for step, dice in here:
        print(
            f"step {step}: here {dice:.5f} committed {theirs[step]:.5f} difference {dice - theirs[step]:+.1e}"
        )


if __name__ == "__main__":
    main()
