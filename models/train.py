"""The training loop: model-agnostic, resumable, seeded, with NaN guards and progress reporting.

A model brings two methods (see models/dhvae.py):
    training_losses(x, step, rng) -> StepLosses(loss, fake, metrics)   the generator's objective
    discriminator_loss(x, fake, step) -> Tensor | None                  None when there is no D (yet)
and ``generator_parameters()`` / ``discriminator_parameters()``. Each step draws its batch and its noise
from generators seeded by (seed, step), so a run resumed from a checkpoint continues exactly as the
uninterrupted run would have, and the same seed, config and data give the same weights on a CPU.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from imaging.errors import CheckpointError, TrainingDiverged
from imaging.progress import ProgressFn, Reporter, StopFn

from .checkpoint import load_checkpoint, save_checkpoint
from .config import DHVAEConfig
from .dhvae import StepLosses
from .rng import step_generator

log = logging.getLogger(__name__)


def batch_indices(n: int, batch_size: int, seed: int, step: int) -> Tensor:
    """Indices of the batch of optimiser step ``step``: epochs are seeded permutations of the n slices.

    With fewer slices than a batch, permutations are concatenated so every batch is full.
    """
    steps_per_epoch = max(1, n // batch_size)
    epoch, j = divmod(step, steps_per_epoch)
    g = step_generator(seed, epoch, stream=1)
    reps = math.ceil(steps_per_epoch * batch_size / n)
    order = torch.cat([torch.randperm(n, generator=g) for _ in range(reps)])
    return order[j * batch_size : (j + 1) * batch_size]


def bf16_native(device: torch.device) -> bool:
    """Whether bfloat16 matrix work runs natively here (CUDA with bf16, or a CPU with AMX / AVX512-BF16)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()


def autocast(precision: str, device: torch.device | str) -> contextlib.AbstractContextManager:
    """The forward-pass precision context for ``TrainConfig.precision``."""
    device = torch.device(device)
    use_bf16 = precision == "bf16" or (precision == "auto" and bf16_native(device))
    if not use_bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


class Trainable(Protocol):
    """The training contract: what :func:`fit` (and :func:`models.sampler.sample_pairs`) need of a
    generator. :class:`models.dhvae.DHVAE` and :class:`models.lsgan.LSGAN` have it; a new generator
    that has it trains, checkpoints, samples and exports with no other change (``models/registry.py``).

    ``training_losses(x, step, rng)`` -> :class:`models.dhvae.StepLosses` for a batch ``x`` (B, 2, H, W)
    in [0, 1]; ``discriminator_loss(x, fake, step)`` -> the critic's loss, or None when there is none
    (yet); ``decode(z)`` (B, latent_dim) -> (B, 2, H, W) probabilities; the rest is ``nn.Module``'s.
    """

    cfg: DHVAEConfig

    def training_losses(self, x: Tensor, step: int, rng: torch.Generator | None = None) -> StepLosses: ...
    def discriminator_loss(self, x: Tensor, fake: Tensor, step: int) -> Tensor | None: ...
    def generator_parameters(self) -> list[nn.Parameter]: ...
    def discriminator_parameters(self) -> list[nn.Parameter]: ...
    def decode(self, z: Tensor) -> Tensor: ...

    # nn.Module's own
    def to(self, *args: Any, **kwargs: Any) -> Any: ...
    def train(self, mode: bool = True) -> Any: ...
    def eval(self) -> Any: ...
    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]: ...
    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]: ...
    def load_state_dict(
        self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False
    ) -> Any: ...


@dataclass
class TrainResult:
    step: int
    metrics: dict[str, float]
    slices_per_s: float


def _optimizers(model: Trainable, cfg: DHVAEConfig) -> dict[str, torch.optim.Optimizer]:
    t = cfg.train
    opts: dict[str, torch.optim.Optimizer] = {
        "generator": torch.optim.AdamW(
            model.generator_parameters(), lr=t.lr, betas=t.betas, weight_decay=t.weight_decay
        )
    }
    d_params = model.discriminator_parameters()
    if d_params:
        opts["discriminator"] = torch.optim.AdamW(
            d_params, lr=t.discriminator_lr, betas=t.betas, weight_decay=t.weight_decay
        )
    return opts


def _check_finite(step: int, what: str, value: Tensor, checkpoint: Path) -> None:
    if not torch.isfinite(value).all():
        raise TrainingDiverged(
            f"training diverged at step {step}: {what} is not finite. The last good checkpoint is kept at "
            f"{checkpoint}; lower the learning rate (train.lr) or the step size (flow.step_size) and resume."
        )


def fit(
    model: Trainable,
    data: Tensor,
    cfg: DHVAEConfig,
    *,
    checkpoint: Path,
    progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
    device: torch.device | str = "cpu",
    extra: dict | None = None,
) -> TrainResult:
    """Train ``model`` on ``data`` (N, 2, H, W) in [0, 1] for ``cfg.train.steps`` optimiser steps.

    If ``checkpoint`` exists it is resumed from (weights, optimiser states, step); otherwise training
    starts from the model's current weights (fresh, or a base model for fine-tuning). The checkpoint is
    rewritten every ``checkpoint_every`` steps and at the end, with ``extra`` (e.g. the data's grid).
    """
    t = cfg.train
    model.to(device).train()
    if t.channels_last:
        model.to(memory_format=torch.channels_last)
    opts = _optimizers(model, cfg)
    start = 0
    if checkpoint.exists():
        payload = load_checkpoint(checkpoint, map_location=device)
        model.load_state_dict(payload["model"])
        for name, opt in opts.items():
            if name not in payload["optimizers"]:
                raise CheckpointError(f"{checkpoint.name}: no state for optimiser {name!r}; cannot resume")
            opt.load_state_dict(payload["optimizers"][name])
        start = payload["step"]
        log.info("resuming from %s at step %d", checkpoint, start)

    reporter = Reporter("train", t.steps, "steps", progress, should_stop, start=start)
    n = data.shape[0]
    metrics: dict[str, float] = {}
    for step in range(start, t.steps):
        reporter.check_cancelled()
        x = data[batch_indices(n, t.batch_size, t.seed, step)].to(device)
        if t.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)

        with autocast(t.precision, device):
            out = model.training_losses(x, step, step_generator(t.seed, step))
        _check_finite(step, "the generator loss", out.loss.detach(), checkpoint)
        opts["generator"].zero_grad(set_to_none=True)
        out.loss.backward()
        grad_norm = nn.utils.clip_grad_norm_(model.generator_parameters(), float("inf"))
        _check_finite(step, "the generator gradient", grad_norm, checkpoint)
        opts["generator"].step()
        metrics = {"loss": out.loss.item(), **out.metrics}

        with autocast(t.precision, device):
            d_loss = model.discriminator_loss(x, out.fake, step)
        if d_loss is not None:
            _check_finite(step, "the discriminator loss", d_loss.detach(), checkpoint)
            opts["discriminator"].zero_grad(set_to_none=True)
            d_loss.backward()
            opts["discriminator"].step()
            metrics["disc"] = d_loss.item()

        done = step + 1
        if done % t.checkpoint_every == 0 or done == t.steps:
            save_checkpoint(checkpoint, model=model, config=cfg, step=done, optimizers=opts, extra=extra)
        reporter.report(
            done,
            epoch=float(step // max(1, n // t.batch_size)),
            slices_per_s=reporter.rate(done) * t.batch_size,
            **metrics,
        )

    return TrainResult(step=t.steps, metrics=metrics, slices_per_s=reporter.rate(t.steps) * t.batch_size)
