"""Train on synthetic, test on real: do a generator's masks match its images? (issue 4, diagnosis)

An augmentation can only help if its pairs teach the U-Net something true about real tumours. This
trains the downstream U-Net on one generator's synthetic pairs ALONE (no real slice) and tests it on
the real test patients, side by side with a U-Net trained on the real training slices alone for the
same number of steps. A generator whose synthetic-only U-Net scores far below the real-only one makes
pairs whose masks do not outline what a real tumour looks like, and adding them can at best act as a
regulariser. The pairs are the ones an efficacy run drew (:func:`efficacy.grid.pairs_path`), so this
reads the very data the efficacy rows were trained on.

    .venv/bin/python bench/efficacy/tstr.py --work runs/efficacy --seeds 0 1 2

Results: bench/results/efficacy_tstr.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/: the shared-data helpers
from brats import REPO, efficacy_data  # noqa: E402
from efficacy.grid import pairs_path, read_rows  # noqa: E402
from efficacy.report import METRICS, json_safe, summarize  # noqa: E402
from efficacy.segmenter import run_downstream, segmenter_config, step_matched_steps  # noqa: E402
from models.registry import GENERATORS  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=REPO / "runs/efficacy", help="an efficacy run's work folder")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--methods", nargs="+", choices=GENERATORS, default=GENERATORS)
    ap.add_argument("--steps", type=int, help="U-Net steps (default: the run's step_matched budget)")
    ap.add_argument("--out", type=Path, default=REPO / "bench/results")
    args = ap.parse_args()
    settings = json.loads((args.work / "settings.json").read_text())
    cfg = segmenter_config(**settings["config"]["segmenter"])  # the run's U-Net, field by field
    data = efficacy_data(args.work / "cache")
    if data.summary() != settings["data"]:
        sys.exit(f"{args.work}: the shared data no longer match the run's split")
    steps = args.steps or step_matched_steps(
        len(data.real_train), max(settings["config"]["n_synthetic"]), cfg
    )
    sources = {"real": data.real_train}
    for method in args.methods:
        path = pairs_path(args.work, method)
        if path.is_file():
            sources[method] = np.load(path, allow_pickle=False)

    # The real-only U-Net at the step_matched budget is the efficacy run's own ("none", step_matched)
    # row: the same slices, seed, steps and settings, so it is read back, not trained again.
    real_rows = {
        r["seed"]: r
        for r in read_rows(args.work / "rows.jsonl")
        if r["method"] == "none" and r["protocol"] == "step_matched" and r["steps"] == steps
    }
    rows = []
    for seed in args.seeds:
        for name, pairs in sources.items():
            t0 = time.perf_counter()
            reused = name == "real" and seed in real_rows
            r = (
                real_rows[seed]
                if reused
                else run_downstream(
                    pairs, None, data.test_cases, seed=seed, cfg=cfg, protocol="step_matched", steps=steps
                )
            )
            rows.append(
                {
                    "train_on": name,
                    "n_pairs": len(pairs),
                    "seed": seed,
                    "steps": r["steps"],
                    **{k: r[k] for k in METRICS},
                    "seconds": None if reused else round(time.perf_counter() - t0, 1),
                    "from": "the efficacy run's rows.jsonl (none, step_matched)"
                    if reused
                    else "trained here",
                }
            )
            print(json.dumps(rows[-1]), flush=True)

    summary = {
        name: {m: summarize([r[m] for r in rows if r["train_on"] == name]) for m in ("dice_slice", "dice_3d")}
        for name in sources
    }
    cmd = " ".join([".venv/bin/python bench/efficacy/tstr.py", *map(shlex.quote, sys.argv[1:])])
    result = {
        "command": cmd,
        "data": data.summary(),
        "segmenter": json_safe(asdict(cfg)),
        "steps": steps,
        "summary": summary,
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "efficacy_tstr.json").write_text(json.dumps(json_safe(result), indent=1) + "\n")
    lines = [
        "# Train on synthetic, test on real (BraTS test patients)",
        "",
        f"Each U-Net trains {steps} steps on ONE source alone; slice and 3D Dice (%) on the test patients,",
        f"mean +- std over seeds {args.seeds}. `real` = the training patients' real tumour slices.",
        "",
        "| trained on | pairs | slice Dice | 3D Dice |",
        "|---|---|---|---|",
    ]
    for name, s in summary.items():
        d, v = s["dice_slice"], s["dice_3d"]
        lines.append(
            f"| {name} | {len(sources[name])} | {100 * d['mean']:.1f} +- {100 * d['std']:.1f} "
            f"| {100 * v['mean']:.1f} +- {100 * v['std']:.1f} |"
        )
    lines += ["", f"Command: `{cmd}`. Raw rows: `efficacy_tstr.json`.", ""]
    (args.out / "efficacy_tstr.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
