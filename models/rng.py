"""Seeded random streams: one CPU generator per (seed, step, stream), so that a run resumed from a
checkpoint, or a sampler restarted at batch b, draws exactly what an uninterrupted run would."""

from __future__ import annotations

import torch


def step_generator(seed: int, step: int, stream: int = 0) -> torch.Generator:
    """A CPU generator for (seed, step, stream): independent of everything that ran before."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step * 7_919 + stream) % (2**63))
