"""How many optimiser steps does the downstream U-Net need on the BraTS training patients? (issue 4)

Real slices only (no augmentation), the efficacy benchmark's patient split, Dice on the test patients,
for a few step counts and learning rates. It sizes the efficacy grid: a U-Net still near its starting
point measures nothing about augmentation.

    .venv/bin/python bench/efficacy/unet_steps.py --steps 200 1000 --lr 1e-4 1e-3 --unet small
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/: the shared-data helpers
from brats import REPO, efficacy_data  # noqa: E402
from contract.schemas import UNET_WIDTHS  # noqa: E402
from models import efficacy  # noqa: E402
from models.evaluation import run_downstream  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", nargs="+", type=int, default=[200, 1000])
    ap.add_argument("--lr", nargs="+", type=float, default=[1e-4, 1e-3])
    ap.add_argument("--unet", choices=sorted(UNET_WIDTHS), default="small")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=REPO / "bench/results/unet_steps.json")
    args = ap.parse_args()
    data = efficacy_data(REPO / "runs/cache")
    rows = []
    for lr in args.lr:
        for steps in args.steps:
            cfg = efficacy.segmenter_config(channels=UNET_WIDTHS[args.unet], lr=lr)
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
        "optimiser": "RMSprop, soft Dice loss (MONAI DiceLoss), batch 32 (method.md)",
        "rows": rows,
    }
    args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
