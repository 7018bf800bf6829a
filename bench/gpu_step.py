"""Training-step time of a preset on this machine's default device (the GPU when there is one).

    python3 bench/gpu_step.py --preset paper --steps 30 --out $OUT/gpu_step.json

Random slices (the step's cost does not depend on the data), the adversarial branch on from the start
(``loss.disc_start=0``); the perceptual loss on when the VGG16 weights are there (``weights/``), else off,
and the JSON says which. Reports the median seconds per step after ``--warmup`` steps.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from machine import machine  # noqa: E402

from models.config import PRESETS  # noqa: E402
from models.registry import build_model  # noqa: E402
from models.train import fit  # noqa: E402
from pipeline.pipeline import attach_perceptual, default_device  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="paper", choices=sorted(PRESETS))
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--precision", default="auto", help="train.precision: fp32 | bf16 | auto")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    device = default_device()
    perceptual = "vgg16" if (REPO / "weights/vgg16_lpips.pt").is_file() and args.preset != "tiny" else "none"
    cfg = PRESETS[args.preset].replace(
        **{
            "train.steps": args.steps,
            "train.precision": args.precision,
            "loss.disc_start": 0,
            "loss.perceptual": perceptual,
            "train.checkpoint_every": 10**9,
        }
    )
    size = cfg.network.image_size
    data = torch.rand(64, 2, size, size)
    data[:, 1] = (data[:, 1] > 0.7).float()
    stamps: list[float] = []

    def tick(p) -> None:
        if p.stage == "train":
            if device.type == "cuda":
                torch.cuda.synchronize()
            stamps.append(time.perf_counter())

    model = build_model(cfg)
    attach_perceptual(model, cfg, device)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        fit(model, data, cfg, checkpoint=Path(tmp) / "last.pt", progress=tick, device=device)
        wall = time.perf_counter() - t0
    deltas = [b - a for a, b in zip(stamps[args.warmup :], stamps[args.warmup + 1 :], strict=False)]
    result = {
        "preset": args.preset,
        "batch_size": cfg.train.batch_size,
        "precision": args.precision,
        "perceptual": perceptual,
        "steps": args.steps,
        "median_s_per_step": statistics.median(deltas) if deltas else None,
        "wall_s": round(wall, 2),
        "peak_gpu_mib": round(torch.cuda.max_memory_allocated() / 2**20) if device.type == "cuda" else None,
        "device": str(device),
        "machine": machine(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
