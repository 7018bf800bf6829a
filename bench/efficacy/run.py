"""Does dHVAE augmentation raise the Dice of a U-Net trained on few BraTS patients? (issue 4)

Generators and U-Nets learn from the training patients only (train + validation splits of
../shared/data/brats2015-deepmedic); Dice is measured on the test patients, whom no generator sees.
The protocol is efficacy/grid.py (evaluate_cohort: the same code the service's POST /v1/evaluations runs): every
method x N x seed, under both training-length protocols (fixed_epochs, the paper's; step_matched, the
fair one), then the table next to the paper's numbers and the Dice-against-N figure.

    .venv/bin/python bench/efficacy/run.py --grid full          # the issue's grid (GPU-sized)
    .venv/bin/python bench/efficacy/run.py --grid cpu           # a pilot sized for 2 CPU cores
    .venv/bin/python bench/efficacy/run.py --grid cpu-all --name efficacy   # all six methods, N = 500

Results: bench/results/<name>.{json,md,png} (name: efficacy for the full grid, efficacy_<grid> else).
A killed run started again with the same arguments continues (work folder: runs/efficacy_<grid>).
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import shlex
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/: the shared-data helpers
from brats import REPO, efficacy_data  # noqa: E402
from efficacy.grid import METHODS, EfficacyConfig, evaluate_cohort  # noqa: E402
from efficacy.segmenter import UNET_WIDTHS, segmenter_config  # noqa: E402
from models.registry import TRAINED  # noqa: E402
from pipeline import pipeline  # noqa: E402
from pipeline.cli import parse_overrides  # noqa: E402

# The grid: every method, N up to 2000, 5 seeds, the paper's U-Net and 40 epochs.
FULL = dict(
    methods=METHODS,
    n=[250, 500, 1000, 2000],
    seeds=5,
    preset="small",
    steps=2000,
    unet="paper",
    epochs=40,
    lr=1e-4,
    protocols=["fixed_epochs", "step_matched"],
)
GRIDS = {
    "full": FULL,
    # Sized for 2 CPU cores: three methods, N up to 500, 3 seeds, the narrower U-Net. The generators are
    # the `small` preset for 2000 steps (~30 min each on 2 cores); pass a checkpoint trained on the
    # training patients with --pretrained dhvae=PATH (bench/small_quality.py --keep) to reuse one.
    "cpu": {
        **FULL,
        "methods": ("none", "traditional", "dhvae"),
        "n": [250, 500],
        "seeds": 3,
        "unet": "small",
    },
    # Every method of the issue on 2 CPU cores: the six methods, N = 500 only (there the two protocols
    # train the same U-Net, so a configuration costs one U-Net per seed), 3 seeds. Each learned generator
    # trains the `small` preset for 2000 steps. Measured on 2-core AVX512-BF16 EPYCs: 81 min in all
    # (bench/results/efficacy.json: VAE 3 min, HVAE 15, LSGAN 9, dHVAE 27, 21 U-Nets of ~1.2 min); 152 min
    # on a machine half as fast (commit 7d3879b).
    "cpu-all": {
        **FULL,
        "n": [500],
        "seeds": 3,
        "unet": "small",
    },
}


def log_progress(p) -> None:
    """Generator training every 100 steps; every U-Net run."""
    if p.stage != "train" or p.done % 100 == 0 or p.done == p.total:
        eta = "" if p.eta_s is None else f", eta {p.eta_s / 60:.1f} min"
        logging.getLogger("bench.efficacy").info("%s %d/%d %s%s", p.stage, p.done, p.total, p.unit, eta)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--grid", choices=sorted(GRIDS), default="cpu")
    ap.add_argument("--methods", nargs="+", choices=METHODS)
    ap.add_argument("--n", nargs="+", type=int, help="synthetic pairs to add (N > 0)")
    ap.add_argument("--seeds", type=int, help="U-Net seeds 0..n-1")
    ap.add_argument("--preset", choices=["tiny", "small", "paper"])
    ap.add_argument("--steps", type=int, help="generator training steps")
    ap.add_argument("--unet", choices=sorted(UNET_WIDTHS))
    ap.add_argument("--epochs", type=int, help="U-Net epochs (fixed_epochs; sets the step_matched budget)")
    ap.add_argument("--lr", type=float, help="U-Net learning rate (method.md: 1e-4)")
    ap.add_argument("--protocols", nargs="+", choices=["fixed_epochs", "step_matched"])
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="generator override")
    ap.add_argument(
        "--pretrained",
        action="append",
        default=[],
        metavar="METHOD=CHECKPOINT",
        help="sample METHOD from this checkpoint instead of training it (it must not have seen a test patient)",
    )
    ap.add_argument("--name", help="results file stem (default: efficacy, or efficacy_<grid>)")
    ap.add_argument("--work", type=Path, help="work folder (default: runs/<name>)")
    ap.add_argument("--out", type=Path, default=REPO / "bench/results")
    ap.add_argument("--report-only", action="store_true", help="report the runs finished so far, run no more")
    args = ap.parse_args()
    g = {**GRIDS[args.grid], **{k: v for k, v in vars(args).items() if k in FULL and v is not None}}
    name = args.name or ("efficacy" if args.grid == "full" else f"efficacy_{args.grid}")
    work = args.work or REPO / "runs" / name
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    overrides = parse_overrides(args.set)
    pretrained = {}
    learned = TRAINED  # the ones with a checkpoint
    for item in args.pretrained:
        method, sep, path = item.partition("=")
        if not sep or method not in learned or not Path(path).is_file():
            ap.error(
                f"--pretrained {item!r}: expected METHOD=CHECKPOINT with METHOD one of "
                f"{learned} and an existing file"
            )
        pretrained[method] = str(Path(path).resolve())
    cfg = EfficacyConfig(
        methods=tuple(g["methods"]),
        n_synthetic=tuple(g["n"]),
        seeds=tuple(range(g["seeds"])),
        protocols=tuple(g["protocols"]),
        preset=g["preset"],
        generator_steps=g["steps"],
        generator_overrides=overrides,
        pretrained=pretrained,
        segmenter=segmenter_config(channels=UNET_WIDTHS[g["unet"]], epochs=g["epochs"], lr=g["lr"]),
    )
    device = pipeline.default_device()
    details = {
        "command": " ".join([".venv/bin/python bench/efficacy/run.py", *map(shlex.quote, sys.argv[1:])]),
        "grid": args.grid,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)",
        "machine": {
            "torch": torch.__version__,
            "python": platform.python_version(),
            "threads": torch.get_num_threads(),
        },
    }

    evaluate_cohort(
        efficacy_data(work / "cache"),
        cfg,
        args.out,
        work_dir=work,
        stem=name,
        title=f"Efficacy on BraTS ({args.grid} grid, {details['device']})",
        paper=True,
        details=details,
        progress=log_progress,
        device=device,
        report_only=args.report_only,
    )
    print((args.out / f"{name}.md").read_text())


if __name__ == "__main__":
    main()
