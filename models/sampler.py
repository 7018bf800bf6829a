"""Prior sampling with rejection: decode z ~ N(0, I), threshold the mask, keep pairs with enough tumour.

method.md, "Sampling": no leapfrog at generation time; mask thresholded at 0.5; pairs whose mask area is
under the floor (200 px at 128 x 128) are rejected until exactly N are accepted.

Reproducibility and resumption. Candidates are drawn in batches of a fixed size, batch b from a
generator seeded by (seed, b), so the accepted sequence is a pure function of (weights, seed, sampling
config). A generation killed part-way restarts at any batch b, given how many pairs were accepted
before it: the journal written by the pipeline records exactly that, batch by batch.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from imaging.errors import LowAcceptance

from .config import SamplingConfig
from .rng import step_generator

if TYPE_CHECKING:
    from .train import Trainable


@dataclass
class Pair:
    """One accepted synthetic pair: image in [0, 1] float32 (H, W), mask {0, 1} uint8 (H, W)."""

    index: int  # position in the accepted sequence, 0-based
    image: np.ndarray
    mask: np.ndarray
    batch: int  # the candidate batch it came from


@dataclass
class BatchDone:
    """Marker yielded after every candidate batch: how many pairs were accepted before the next batch."""

    batch: int
    accepted_total: int
    draws_total: int
    passed_total: int  # candidates over the floor, including those past n in the last batch


def max_draws(n: int, cfg: SamplingConfig) -> int:
    return max(cfg.min_draws, cfg.max_draws_factor * n)


EARLY_STOP_DRAWS = 256  # least draws of this run before the acceptance seen so far can end it


def reachable(accepted: int, n: int, draws: int, cap: int, first_draw: int, passed_here: int) -> bool:
    """Can ``n`` still be reached within ``cap`` draws at the acceptance observed in this run?

    Optimistic on purpose: the rate is (passes + 3) / draws (the "rule of three" upper bound when none
    passed), so a generation is only stopped early when even that rate falls short."""
    seen = draws - first_draw
    if seen < EARLY_STOP_DRAWS:
        return True
    rate = (passed_here + 3) / seen
    return accepted + rate * (cap - draws) >= n


@torch.no_grad()
def sample_pairs(
    model: Trainable,
    n: int,
    *,
    seed: int,
    cfg: SamplingConfig,
    image_size: int,
    start_batch: int = 0,
    accepted_before: int = 0,
    passed_before: int = 0,
    device: torch.device | str = "cpu",
) -> Iterator[Pair | BatchDone]:
    """Yield accepted pairs ``accepted_before .. n-1`` in order, with a :class:`BatchDone` after each batch.

    Raises LowAcceptance once the draw cap makes reaching n impossible at the rate observed.
    """
    floor = cfg.area_floor(image_size)
    cap = max_draws(n, cfg)
    accepted, b, passed = accepted_before, start_batch, passed_before
    first_draw = start_batch * cfg.batch_size
    model.eval()
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    while accepted < n:
        draws = b * cfg.batch_size
        if draws >= cap:
            raise LowAcceptance(
                f"only {accepted} of {n} pairs reached the mask-area floor of {floor} px after {draws} draws "
                f"(acceptance {accepted / max(draws, 1):.1%}). Train longer, or lower min_mask_area."
            )
        z = torch.randn(
            cfg.batch_size, model.cfg.network.latent_dim, generator=step_generator(seed, b, stream=2)
        )
        out = model.decode(z.to(device)).float().cpu()
        images = out[:, 0].numpy().astype(np.float32)
        masks = (out[:, 1] > cfg.mask_threshold).numpy().astype(np.uint8)
        for i in range(cfg.batch_size):
            if int(masks[i].sum()) < floor:
                continue
            passed += 1
            if accepted < n:
                yield Pair(accepted, images[i], masks[i], b)
                accepted += 1
        b += 1
        yield BatchDone(b - 1, accepted, b * cfg.batch_size, passed)
        if accepted < n and not reachable(
            accepted, n, b * cfg.batch_size, cap, first_draw, passed - passed_before
        ):
            draws = b * cfg.batch_size
            raise LowAcceptance(
                f"only {accepted} of {n} pairs reached the mask-area floor of {floor} px after {draws} draws "
                f"(acceptance {accepted / max(draws, 1):.1%}): at that rate {n} cannot be reached within "
                f"the cap of {cap} draws. Train longer, or lower min_mask_area."
            )


def sample_array(
    model: Trainable,
    n: int,
    *,
    seed: int,
    cfg: SamplingConfig,
    image_size: int,
    device: torch.device | str = "cpu",
) -> np.ndarray:
    """The ``n`` accepted pairs of :func:`sample_pairs` as one ``(n, 2, H, W)`` float32 array: image in
    [0, 1], mask {0, 1}."""
    out = np.empty((n, 2, image_size, image_size), np.float32)
    for item in sample_pairs(model, n, seed=seed, cfg=cfg, image_size=image_size, device=device):
        if isinstance(item, Pair):
            out[item.index, 0], out[item.index, 1] = item.image, item.mask
    return out
