"""How many optimiser steps does the downstream U-Net need on the BraTS training patients? (issue 4)

Real slices only (no augmentation), the efficacy benchmark's patient split, Dice on the test patients,
for a few step counts, learning rates and RMSprop momenta. It sizes the efficacy grid (a U-Net still
near its starting point measures nothing about augmentation) and shows how much of an "augmentation
gain" more steps alone give (the reason for the step_matched protocol). 160 steps = 40 epochs of the
129 real slices; 440 and 760 steps = 40 epochs with 250 and 500 synthetic slices added.

    .venv/bin/python bench/efficacy/unet_steps.py --steps 160 440 760 --momentum 0.999 0 --unet small
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/: the shared-data helpers
from brats import REPO, efficacy_data  # noqa: E402
from efficacy.report import json_safe  # noqa: E402
from efficacy.segmenter import UNET_WIDTHS, run_downstream, segmenter_config  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", nargs="+", type=int, default=[160, 440, 760])
    ap.add_argument("--lr", nargs="+", type=float, default=[1e-4])
    ap.add_argument("--momentum", nargs="+", type=float, default=[0.999, 0.0], help="RMSprop momentum")
    ap.add_argument("--unet", choices=sorted(UNET_WIDTHS), default="small")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=REPO / "bench/results/unet_steps.json")
    args = ap.parse_args()
    data = efficacy_data(REPO / "runs/cache")
    rows = []
    grid = [(lr, m, steps) for lr in args.lr for m in args.momentum for steps in args.steps]
    for lr, momentum, steps in grid:
        cfg = segmenter_config(channels=UNET_WIDTHS[args.unet], lr=lr, momentum=momentum)
        t0 = time.perf_counter()
        r = run_downstream(
            data.real_train,
            None,
            data.test_cases,
            seed=args.seed,
            cfg=cfg,
            protocol="step_matched",
            steps=steps,
        )
        rows.append(
            {
                "lr": lr,
                "momentum": momentum,
                "steps": steps,
                "unet": args.unet,
                "seed": args.seed,
                **{k: r[k] for k in ("dice_slice", "dice_3d", "hd95", "hd95_unit", "n_real")},
                "seconds": round(time.perf_counter() - t0, 1),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    result = {
        "command": " ".join([".venv/bin/python bench/efficacy/unet_steps.py", *sys.argv[1:]]),
        "data": data.summary(),
        "segmenter": json_safe(asdict(segmenter_config(channels=UNET_WIDTHS[args.unet]))),
        "rows": rows,
    }
    args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
