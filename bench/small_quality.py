"""Can a user train the ``small`` preset on ~100 real slices to useful quality in 30 minutes on 2 cores?

Data: the BraTS training + validation patients of ../shared/data/brats2015-deepmedic (4 patients, the
balanced tumour slices at 128 x 128, FLAIR); the test patients' tumour slices are the held-out reference
and never reach the generator. The model is trained for a wall-clock budget, then N pairs are sampled
and compared with the held-out slices. "Useful" is judged against two references measured in the same
run: the untrained network (what no training gives) and the real training slices themselves (what a
perfect generator would score against the held-out patients).

    .venv/bin/python bench/small_quality.py --minutes 30     # writes bench/results/small_quality.{json,md,png}
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from brats import DATA, REPO, combined_cohort
from efficacy.quality import quality_metrics
from imaging.cohort import CohortSpec
from models.checkpoint import model_from_checkpoint
from models.config import SamplingConfig
from models.registry import build_model
from models.sampler import Pair, sample_pairs
from pipeline import pipeline


def sample(model: torch.nn.Module, n: int, seed: int) -> tuple[np.ndarray, dict]:
    """n accepted pairs (n, 2, H, W) and the acceptance statistics."""
    cfg = SamplingConfig()
    pairs, done = [], None
    for item in sample_pairs(model, n, seed=seed, cfg=cfg, image_size=128):
        if isinstance(item, Pair):
            pairs.append(np.stack([item.image, item.mask.astype(np.float32)]))
        else:
            done = item
    return np.stack(pairs), {"draws": done.draws_total, "acceptance": done.passed_total / done.draws_total}


def preview(pairs: np.ndarray, real: np.ndarray, path: Path, n: int = 8) -> None:
    """Top row: real held-out slices; bottom rows: synthetic; mask outline in red."""
    from PIL import Image
    from scipy import ndimage

    def tile(pair):
        img = (np.clip(pair[0], 0, 1) * 255).astype(np.uint8)
        rgb = np.stack([img] * 3, -1)
        m = pair[1] > 0.5
        edge = m & ~ndimage.binary_erosion(m)
        rgb[edge] = (255, 40, 40)
        return rgb

    rows = [np.concatenate([tile(p) for p in real[:n]], 1)]
    for r in range(2):
        rows.append(np.concatenate([tile(p) for p in pairs[r * n : (r + 1) * n]], 1))
    Image.fromarray(np.concatenate(rows, 0)).save(path)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--n-samples", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=REPO / "bench/results")
    ap.add_argument(
        "--keep",
        type=Path,
        help="also copy the trained checkpoint here (e.g. runs/small30/model.pt, for bench/efficacy/run.py "
        "--pretrained dhvae=...: it saw the training patients only)",
    )
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        spec = CohortSpec(channel="flair")
        train = pipeline.ingest(combined_cohort(["train", "validation"], tmp), cache_dir=tmp / "c", spec=spec)
        test = pipeline.ingest(DATA / "test", cache_dir=tmp / "c", spec=spec)
        real_train, heldout = train.slices.slices, test.slices.slices

        # Calibrate the number of steps to the budget with a short timed run (counted in the budget):
        # the median time between steps after the first (model set-up and warm-up excluded), with the
        # adversarial branch on as it is for most of the run (before disc_start a step is ~15 % cheaper:
        # a probe without it planned 2466 steps for 30 min, which took 33.3).
        t0 = time.perf_counter()
        stamps: list[float] = []
        pipeline.train(
            train,
            pipeline.TrainSpec(preset="small", steps=4, seed=args.seed, overrides={"loss.disc_start": 0}),
            model_dir=tmp / "probe",
            device="cpu",
            progress=lambda p: stamps.append(time.perf_counter()) if p.stage == "train" else None,
        )
        probe_s = time.perf_counter() - t0
        per_step = float(np.median(np.diff(stamps[-4:])))
        steps = max(10, int((args.minutes * 60 - probe_s) / per_step * 0.97))
        log_every = max(1, steps // 20)
        curve: list[dict] = []

        def progress(p):
            if p.stage == "train" and (p.done % log_every == 0 or p.done == p.total):
                curve.append({"step": p.done, **{k: round(v, 3) for k, v in p.metrics.items()}})

        t1 = time.perf_counter()
        ckpt = pipeline.train(
            train,
            pipeline.TrainSpec(preset="small", steps=steps, seed=args.seed),
            model_dir=tmp / "small",
            device="cpu",
            progress=progress,
        )
        train_minutes = (time.perf_counter() - t1 + probe_s) / 60
        if args.keep:
            args.keep.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(ckpt, args.keep)
        model, payload = model_from_checkpoint(ckpt)
        cfg = payload["config_obj"]

        synth, acc = sample(model, args.n_samples, seed=1)
        torch.manual_seed(args.seed)
        untrained = build_model(cfg)
        try:
            untrained_pairs, untrained_acc = sample(untrained, min(args.n_samples, 50), seed=1)
            untrained_q = quality_metrics(
                untrained_pairs, heldout, real_train, train_case_ids=train.slices.case_ids
            )
        except Exception as e:  # an untrained decoder rarely reaches the area floor
            untrained_acc, untrained_q = {"error": str(e)}, None
        q = quality_metrics(synth, heldout, real_train, train_case_ids=train.slices.case_ids)
        real_q = quality_metrics(real_train, heldout, None)
        args.out.mkdir(parents=True, exist_ok=True)
        preview(synth, heldout[:: max(1, len(heldout) // 8)], args.out / "small_quality.png")

    result = {
        "command": f".venv/bin/python bench/small_quality.py --minutes {args.minutes:g}",
        "machine": {"cores": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version()},
        "data": {
            "train_patients": sorted(set(train.slices.case_ids)),
            "train_slices": int(len(real_train)),
            "heldout_patients": sorted(set(test.slices.case_ids)),
            "heldout_slices": int(len(heldout)),
        },
        "preset": "small",
        "config": cfg.to_dict(),
        "budget_minutes": args.minutes,
        "steps": steps,
        "seconds_per_step": round(per_step, 2),
        "train_minutes": round(train_minutes, 1),
        "loss_curve": curve,
        "sampling": acc,
        "quality": {"small_trained": q, "untrained": untrained_q, "real_train_vs_heldout": real_q},
        "untrained_sampling": untrained_acc,
    }
    (args.out / "small_quality.json").write_text(json.dumps(result, indent=2, default=float) + "\n")
    (args.out / "small_quality.md").write_text(report(result))
    print(report(result))


def report(r: dict) -> str:
    keys = ["psnr_db", "ssim", "lpips", "frechet_vgg16", "mask_area_js_bits"]
    q = r["quality"]
    lines = [
        "# `small` preset: useful quality in 30 minutes on 2 cores?",
        "",
        f"Command: `{r['command']}`. Machine: {r['machine']}.",
        f"Data: {r['data']['train_slices']} balanced FLAIR tumour slices of {len(r['data']['train_patients'])} "
        f"patients (BraTS train + validation); held out: {r['data']['heldout_slices']} slices of the "
        f"{len(r['data']['heldout_patients'])} test patients.",
        f"Training: {r['steps']} steps of batch {r['config']['train']['batch_size']} "
        f"(probe {r['seconds_per_step']} s/step; {60 * r['train_minutes'] / r['steps']:.2f} s/step over the "
        f"whole run, probe included; precision {r['config']['train']['precision']}) in {r['train_minutes']} min.",
        f"Sampling: acceptance {r['sampling'].get('acceptance', 0):.1%} at the 200 px floor "
        f"(untrained: {r['untrained_sampling'].get('acceptance', r['untrained_sampling'])}).",
        "",
        "| metric (synthetic or real vs held-out test slices) | untrained | small, trained | real training slices |",
        "|---|---|---|---|",
    ]
    for k in keys:

        def cell(d, k=k):
            return "-" if d is None or k not in d else f"{d[k]:.3f}"

        lines.append(
            f"| {k} | {cell(q['untrained'])} | {cell(q['small_trained'])} | {cell(q['real_train_vs_heldout'])} |"
        )
    mem = q["small_trained"].get("memorisation")
    if mem:
        lines += ["", f"Memorisation: {mem}"]
    lines += [
        "",
        "Preview (`small_quality.png`): top row real held-out slices, then synthetic pairs (mask outline red).",
        "",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
