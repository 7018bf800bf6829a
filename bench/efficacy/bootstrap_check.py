"""How firm is a cross-validation's "helps"? (issue 11: a verdict must not hang on the bootstrap's own dice)

A recipe "helps" when the lower end of its 95 % patient-bootstrap interval lies above 0. The report draws
that interval from ``config.bootstrap`` resamples with one random seed, so a lower bound near 0 can flip
with the seed alone. For each arm of a committed report, and each metric the report's recommendation and
targets read (slice Dice; 3D Dice after each fold's chosen post-processing), this recomputes the paired
gain's lower bound:

- with the report's number of resamples, under ``--bootstrap-seeds`` seeds: in how many is it above 0;
- with ``--resamples`` resamples (default 200,000), where the Monte Carlo error is negligible.

It reads the committed rows only: no U-Net is trained and nothing is chosen, so reading the test patients
here is no tuning. Seconds on 2 cores.

    .venv/bin/python bench/efficacy/bootstrap_check.py --report bench/results/efficacy_cv_2400.json

Results: bench/results/bootstrap_check_<report stem>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/: the shared-data helpers
from machine import footer, provenance, write_report  # noqa: E402

from brats import REPO  # noqa: E402

sys.path.insert(0, str(REPO))
from efficacy.crossval import POST_METRIC, REFERENCE, paired_gain, postprocessed, verdict  # noqa: E402

METRICS = ("dice_slice", POST_METRIC)


def check(report: dict[str, Any], seeds: int, resamples: int) -> list[dict[str, Any]]:
    """Per (arm, metric): the report's interval, its lower bound's sign over ``seeds`` bootstrap seeds,
    and the interval from ``resamples`` resamples."""
    rows = postprocessed(
        report["rows"], {f["fold"]: f["postprocess"] for f in report["folds"] if f.get("postprocess")}
    )
    boot, folds = report["config"]["bootstrap"], report["config"]["folds"]  # a verdict needs every fold
    out = []
    for arm in report["arms"]:
        if arm == REFERENCE:
            continue
        for metric in METRICS:
            g = paired_gain(rows, arm, metric, bootstrap=boot, seed=0, folds=folds)
            if g is None:
                continue
            # seed 0 is the report's own interval, g
            others = (
                paired_gain(rows, arm, metric, bootstrap=boot, seed=s, folds=folds) for s in range(1, seeds)
            )
            lows = [g["ci95"][0], *(o["ci95"][0] for o in others)]
            fine = paired_gain(rows, arm, metric, bootstrap=resamples, seed=0, folds=folds)
            out.append(
                {
                    "arm": arm,
                    "metric": metric,
                    "runs": g["runs"],
                    "gain_points": 100 * g["mean_patient_gain"],
                    "ci95_points": [100 * x for x in g["ci95"]],
                    "helps": g["helps"],
                    "untested_patients": g["untested_patients"],
                    "untested_folds": g["untested_folds"],
                    "lower_above_0": sum(x > 0 for x in lows),
                    "lower_range_points": [100 * min(lows), 100 * max(lows)],
                    "fine_ci95_points": [100 * x for x in fine["ci95"]],
                    "fine_helps": fine["helps"],
                }
            )
    return out


def markdown(report: dict[str, Any]) -> str:
    seeds, boot, fine = report["bootstrap_seeds"], report["resamples_report"], report["resamples_fine"]
    lines = [
        f"# How firm is each verdict? (`{report['source']}`)",
        "",
        f"Each paired gain's 95 % lower bound, recomputed from the committed rows: with the report's {boot:,} "
        f"resamples under {seeds} bootstrap seeds, and with {fine:,} resamples. 3D Dice is post-processed "
        "as each fold chose on its inner split. A verdict is firm when the seeds agree.",
        "",
        f"| arm | metric | runs | gain | 95 % CI (report) | helps | lower > 0, of {seeds} seeds "
        f"| lower, range | 95 % CI ({fine:,}) | helps ({fine:,}) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in report["checks"]:
        lo, hi = c["ci95_points"]
        flo, fhi = c["fine_ci95_points"]
        rlo, rhi = c["lower_range_points"]
        lines.append(
            f"| {c['arm']} | {c['metric']} | {c['runs']} | {c['gain_points']:+.1f} | [{lo:+.2f}, {hi:+.1f}] "
            f"| {verdict(c)} | {c['lower_above_0']} | [{rlo:+.2f}, {rhi:+.2f}] "
            f"| [{flo:+.2f}, {fhi:+.1f}] | {verdict({**c, 'helps': c['fine_helps']})} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--report", type=Path, required=True, help="a committed cv.py report (JSON)")
    p.add_argument("--bootstrap-seeds", type=int, default=20)
    p.add_argument("--resamples", type=int, default=200_000)
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = p.parse_args()
    t0 = time.perf_counter()
    committed = json.loads(args.report.read_text())
    report = {
        "source": args.report.name,
        "bootstrap_seeds": args.bootstrap_seeds,
        "resamples_report": committed["config"]["bootstrap"],
        "resamples_fine": args.resamples,
        "checks": check(committed, args.bootstrap_seeds, args.resamples),
        **provenance("bench/efficacy/bootstrap_check.py", t0),
    }
    write_report(args.out, f"bootstrap_check_{args.report.stem}", report, [markdown(report), footer(report)])


if __name__ == "__main__":
    main()
