"""Training and sampling speed of the dHVAE on this machine, side by side in one run.

For each (config, batch) it times, in a fresh subprocess each (so peak RSS is per configuration):
  reference     the authors' computational structure: 2K potential gradients per flow (each recomputed
                from the graph), the perceptual net on target and reconstruction together, and the
                adaptive weight's two gradients through the whole second-order graph;
  ours-full     our step with the *same maths*: K+1 gradients (the end-of-step gradient reused), the
                target's VGG features without a graph, adaptive weight through the whole graph;
  ours-default  our default: as ours-full, adaptive weight through the final decode only
                (loss.adaptive_weight = "final_decode", a documented heuristic option);
  ours-nhwc     ours-default with channels-last (NHWC) tensors and weights (train.channels_last = true)
  ours-bf16     ours-default under bfloat16 autocast (train.precision = "bf16"; the small preset's
                "auto" picks it on CPUs with AMX / AVX512-BF16 like this one).
Every step has the adversarial branch active (disc_start = 0) and the perceptual loss on, like the
authors' figures quoted in issue #2 (median of 5 steps after warm-up). The reference and ours-full
losses are checked equal on the same batch and noise before timing.

    .venv/bin/python bench/train_speed.py            # full run, writes bench/results/train_speed.{json,md}
    .venv/bin/python bench/train_speed.py --quick    # c32 at batch 4 only, fewer steps
    .venv/bin/python bench/train_speed.py --cells c32:4 paper:1 --modes reference ours-full ours-default \
        --name train_speed_fp32                       # some cells only (e.g. a CPU without native bf16)

Configs: "c32" is the issue's "C=32 (else paper config)" for which it quotes the authors' figures (the
`small` preset was that width until 2026-12-01; older results files call it "small"); "paper" is C=128.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from models import losses  # noqa: E402
from models.config import DHVAEConfig, get_preset  # noqa: E402
from models.dhvae import DHVAE, StepLosses, _randn_like  # noqa: E402
from models.registry import build_model  # noqa: E402
from models.rng import step_generator  # noqa: E402
from models.train import autocast, bf16_native  # noqa: E402
from pipeline.pipeline import attach_perceptual  # noqa: E402

# The authors' figures on a 2-core machine (issue #2): seconds per step, peak GB; sampling pairs/s.
AUTHORS = {
    ("c32", 4): {"s_per_step": 7.2, "peak_gb": 3.5},
    ("c32", 16): {"s_per_step": 42.9, "peak_gb": 11.6},
    ("paper", 1): {"s_per_step": 11.7, "peak_gb": None},
    ("paper", 2): {"s_per_step": 23.8, "peak_gb": 6.6},
}
AUTHORS_SAMPLING = {"c32": 33.6, "paper": 5.1}


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux), else what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def speed_config(name: str) -> DHVAEConfig:
    """The two configurations the issue quotes the authors' figures for: the paper's, and C = 32."""
    paper = get_preset("paper")
    if name == "paper":
        return paper
    if name == "c32":
        return paper.replace(**{"network.base_channels": 32})
    raise KeyError(f"unknown speed config {name!r}; choose c32 or paper")


def reference_losses(model: DHVAE, x: torch.Tensor, step: int, rng: torch.Generator) -> StepLosses:
    """The authors' step structure (HamiltonianAutoencoder.forward + LPIPSWithDiscriminator), our modules."""
    cfg, f = model.cfg, model.cfg.flow
    mu, logvar = model.encoder(x)
    e0 = _randn_like(mu, rng)
    z = mu + (0.5 * logvar).exp() * e0
    gamma = _randn_like(mu, rng)
    rho = gamma / f.sqrt_beta0
    logits = model.decoder(z)  # the VAE forward's reconstruction
    from models.hamiltonian import tempering_factor

    for k in range(1, f.n_leapfrog + 1):
        g = torch.autograd.grad(losses.potential(logits, x, z).sum(), z, create_graph=True)[0]
        rho = rho - 0.5 * f.step_size * g
        z = z + f.step_size * rho
        logits = model.decoder(z)
        g = torch.autograd.grad(losses.potential(logits, x, z).sum(), z, create_graph=True)[0]
        rho = rho - 0.5 * f.step_size * g
        rho = tempering_factor(k, f.n_leapfrog, f.sqrt_beta0) * rho
    l_hvae = losses.hvae_loss(logits, x, z, rho, e0, logvar)
    x_hat = torch.sigmoid(logits)
    lp = model._perceptual[0]
    l_rec = losses.reconstruction_loss(x, x_hat, lambda xh: lp(x, xh), cfg.loss.perceptual_weight)
    g_adv = losses.generator_hinge_loss(model.discriminator(x_hat))
    lam = losses.adaptive_weight(l_rec, g_adv, model.decoder.head.weight, cfg.loss.adaptive_weight_max)
    loss = (1 - cfg.loss.alpha) * l_hvae + cfg.loss.alpha * (l_rec + lam * g_adv)
    return StepLosses(
        loss, x_hat.detach(), {"hvae": l_hvae.item(), "rec": l_rec.item(), "lambda": lam.item()}
    )


MODES = ["reference", "ours-full", "ours-default", "ours-nhwc", "ours-bf16"]


def build(preset: str, mode: str) -> DHVAE:
    aw = "full" if mode in ("reference", "ours-full") else "final_decode"
    cfg = speed_config(preset).replace(
        **{
            "loss.disc_start": 0,
            "loss.perceptual": "vgg16",
            "loss.adaptive_weight": aw,
            "train.channels_last": mode == "ours-nhwc",
        }
    )
    torch.manual_seed(0)
    model = build_model(cfg)
    attach_perceptual(model, cfg, "cpu")
    if mode == "ours-nhwc":
        model.to(memory_format=torch.channels_last)
    return model


def batch(b: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(b, 2, 128, 128, generator=g)
    x[:, 1] = (x[:, 1] > 0.8).float()
    return x


def time_training(preset: str, b: int, mode: str, steps: int, warmup: int) -> dict:
    model = build(preset, mode)
    model.train()
    opt_g = torch.optim.AdamW(model.generator_parameters(), lr=4.5e-5, betas=(0.5, 0.9))
    opt_d = torch.optim.AdamW(model.discriminator_parameters(), lr=4.5e-5, betas=(0.5, 0.9))
    x = batch(b)
    if mode == "ours-nhwc":
        x = x.contiguous(memory_format=torch.channels_last)
    precision = "bf16" if mode == "ours-bf16" else "fp32"
    times = []
    for s in range(warmup + steps):
        t0 = time.perf_counter()
        rng = step_generator(0, s)
        with autocast(precision, "cpu"):
            out = (
                reference_losses(model, x, s, rng)
                if mode == "reference"
                else model.training_losses(x, s, rng)
            )
        opt_g.zero_grad(set_to_none=True)
        out.loss.backward()
        opt_g.step()
        with autocast(precision, "cpu"):
            d = model.discriminator_loss(x, out.fake, s)
        opt_d.zero_grad(set_to_none=True)
        d.backward()
        opt_d.step()
        if s >= warmup:
            times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    return {
        "s_per_step": round(med, 3),
        "slices_per_s": round(b / med, 3),
        "step_times": [round(t, 3) for t in times],
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
    }


def check_same_maths(preset: str) -> dict:
    """Reference and ours-full give the same loss and lambda on the same batch and noise."""
    a, b = build(preset, "reference"), build(preset, "ours-full")
    x = batch(2)
    ra = reference_losses(a, x, 0, step_generator(0, 0))
    rb = b.training_losses(x, 0, step_generator(0, 0))
    return {
        "loss_reference": ra.loss.item(),
        "loss_ours": rb.loss.item(),
        "lambda_reference": ra.metrics["lambda"],
        "lambda_ours": rb.metrics["lambda"],
        "rel_diff": abs(ra.loss.item() - rb.loss.item()) / abs(ra.loss.item()),
    }


def time_sampling(preset: str, n: int = 64) -> dict:
    """Prior samples decoded, thresholded and area-checked per second: the sampler itself, with the
    floor at 0 so that every candidate counts (the authors' figure is likewise decodes per second)."""
    from models.config import SamplingConfig
    from models.sampler import sample_pairs

    torch.manual_seed(0)
    model = build_model(speed_config(preset))
    cfg = SamplingConfig(min_mask_area=0)
    list(sample_pairs(model, cfg.batch_size, seed=0, cfg=cfg, image_size=128))  # warm-up
    rates = []
    for rep in range(3):
        t0 = time.perf_counter()
        list(sample_pairs(model, n, seed=rep + 1, cfg=cfg, image_size=128))
        rates.append(n / (time.perf_counter() - t0))
    return {
        "pairs_per_s": round(statistics.median(rates), 2),
        "n": n,
        "batch_size": cfg.batch_size,
        "channels_last": cfg.channels_last,
    }


def run_one(spec: dict) -> dict:
    if spec["kind"] == "train":
        return time_training(spec["preset"], spec["batch"], spec["mode"], spec["steps"], spec["warmup"])
    if spec["kind"] == "sample":
        return time_sampling(spec["preset"])
    return check_same_maths(spec["preset"])


def subprocess_run(spec: dict) -> dict:
    proc = subprocess.run(
        [sys.executable, __file__, "--one", json.dumps(spec)], capture_output=True, text=True
    )
    if proc.returncode != 0:
        return {
            "error": proc.stderr.strip().splitlines()[-1]
            if proc.stderr.strip()
            else f"exit {proc.returncode}"
        }
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--cells", nargs="+", metavar="CONFIG:BATCH", help="only these cells, e.g. c32:4 paper:1")
    ap.add_argument("--modes", nargs="+", choices=MODES, help="only these modes")
    ap.add_argument("--name", help="results file stem (default train_speed, or train_speed_quick)")
    ap.add_argument("--out", type=Path, default=REPO / "bench/results")
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_one(json.loads(args.one))))
        return

    steps, warmup = (3, 1) if args.quick else (5, 1)
    # (preset, batch, modes). Paper batch 16 does not fit in 24 GB on a CPU (issue #2): the largest
    # batches are measured in the fastest mode only, where a step takes minutes in the others.
    grid = [
        ("c32", 4, MODES),
        ("c32", 16, MODES),
        ("paper", 1, MODES),
        ("paper", 2, MODES),
        ("paper", 4, ["ours-bf16"]),
        ("paper", 8, ["ours-bf16"]),
    ]
    if args.quick:
        grid = [("c32", 4, MODES)]
    if args.cells:
        grid = [(c.split(":")[0], int(c.split(":")[1]), MODES) for c in args.cells]
    if args.modes:
        grid = [(c, b, [m for m in modes if m in args.modes]) for c, b, modes in grid]
    results: dict = {
        "command": " ".join([".venv/bin/python bench/train_speed.py", *map(shlex.quote, sys.argv[1:])]),
        "machine": {
            "cpu": cpu_model(),
            "bf16_native": bf16_native(torch.device("cpu")),
            "cores": os.cpu_count(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "python": platform.python_version(),
        },
        "protocol": f"median of {steps} steps after {warmup} warm-up, adversarial branch and LPIPS active, 128x128",
        "same_maths": {
            p: subprocess_run({"kind": "check", "preset": p}) for p in sorted({g[0] for g in grid})
        },
        "training": [],
        "sampling": [],
    }
    for preset, b, modes in grid:
        row = {"preset": preset, "batch": b, "authors": AUTHORS.get((preset, b))}
        for mode in modes:
            row[mode] = subprocess_run(
                {
                    "kind": "train",
                    "preset": preset,
                    "batch": b,
                    "mode": mode,
                    "steps": steps,
                    "warmup": warmup,
                }
            )
            print(preset, b, mode, row[mode], flush=True)
        results["training"].append(row)
    for preset in sorted({g[0] for g in grid}):
        r = subprocess_run({"kind": "sample", "preset": preset})
        results["sampling"].append(
            {"preset": preset, "authors_pairs_per_s": AUTHORS_SAMPLING.get(preset), **r}
        )
        print("sample", preset, r, flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    name = args.name or ("train_speed_quick" if args.quick else "train_speed")
    (args.out / f"{name}.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / f"{name}.md").write_text(report(results))
    print(f"wrote {args.out / name}.json and .md")


def report(r: dict) -> str:
    def speed(cell):
        if not cell or "error" in cell:
            return (cell or {}).get("error", "-")
        return f"{cell['s_per_step']:.2f} s ({cell['slices_per_s']:.2f} sl/s, {cell['peak_rss_gb']:.1f} GB)"

    def speed_or_blank(cell):
        return speed(cell) if cell else "not run"

    lines = [
        "# Training and sampling speed (CPU)",
        "",
        f"Machine: {r['machine']}. Protocol: {r['protocol']}.",
        "",
        f"Command: `{r.get('command', '.venv/bin/python bench/train_speed.py')}` (each cell in its own "
        "process; peak = max RSS).",
        "",
        "| config | batch | authors (issue #2) | reference (authors' structure, measured here) | ours, same maths (fp32) | ours, final-decode weight (fp32) | ours, final-decode + NHWC (fp32) | ours, final-decode + bf16 | speed-up vs authors' figure (same / final / NHWC / bf16) | vs reference measured here (same / final / NHWC / bf16) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in r["training"]:
        a = row.get("authors") or {}
        ref, full, dflt, nhwc, bf = (
            row.get("reference"),
            row.get("ours-full"),
            row.get("ours-default"),
            row.get("ours-nhwc"),
            row.get("ours-bf16"),
        )

        def ratio(base, cell):
            if not base or not cell or "error" in cell:
                return "-"
            return f"{base / cell['s_per_step']:.1f}x"

        a_s = a.get("s_per_step")
        r_s = ref.get("s_per_step") if ref and "error" not in ref else None
        lines.append(
            f"| {row['preset']} | {row['batch']} | {f'{a_s} s' if a_s else '-'} | {speed_or_blank(ref)} | "
            f"{speed_or_blank(full)} | {speed_or_blank(dflt)} | {speed_or_blank(nhwc)} | {speed_or_blank(bf)} | "
            f"{ratio(a_s, full)} / {ratio(a_s, dflt)} / {ratio(a_s, nhwc)} / {ratio(a_s, bf)} | "
            f"{ratio(r_s, full)} / {ratio(r_s, dflt)} / {ratio(r_s, nhwc)} / {ratio(r_s, bf)} |"
        )
    lines += ["", "Same maths check (reference vs ours-full on one batch, same noise):", ""]
    for p, c in r["same_maths"].items():
        lines.append(f"- {p}: {c}")
    lines += ["", "| sampling | authors pairs/s | ours pairs/s |", "|---|---|---|"]
    for s in r["sampling"]:
        lines.append(
            f"| {s['preset']} | {s.get('authors_pairs_per_s')} | {s.get('pairs_per_s', s.get('error'))} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
