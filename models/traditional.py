"""Traditional augmentation, the paper's non-generative baseline: flips and rotations of real pairs.

method.md, "Baselines": "traditional augmentation (flips, rotations up to 90 deg, on the stacked pair)".
Each augmented pair is one real slice put through MONAI array transforms, with ONE random draw per pair
applied identically to both channels:
    RandFlip along H, RandFlip along W (each with ``flip_prob``),
    RandRotate by an angle uniform in [-max_rotation_deg, +max_rotation_deg] (with ``rotate_prob``),
      bilinear for the image, nearest for the mask, zero padding outside the field of view, size kept.
The mask is re-binarised (> 0.5) afterwards and the image clipped to [0, 1].

Reproducible: the output is a pure function of (real slices, n, seed, config). Sources are used in seeded
permutations, so every real slice is augmented once before any is augmented twice.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from monai.transforms import RandFlip, RandRotate
from monai.utils import convert_to_numpy


@dataclass(frozen=True)
class TraditionalAugConfig:
    """Parameters of the flip + rotation augmentation."""

    flip_prob: float = 0.5  # per spatial axis (H and W independently)
    max_rotation_deg: float = 90.0  # rotations uniform in [-max, +max] degrees (method.md: "up to 90 deg")
    rotate_prob: float = 1.0
    mask_threshold: float = 0.5


def iter_source_indices(n_real: int, n: int, *, seed: int) -> Iterator[int]:
    """The real slice each of the ``n`` augmented pairs comes from, one at a time: concatenated seeded
    permutations of ``[0, n_real)``, drawn as they are needed."""
    if n_real < 1:
        raise ValueError("no real slices to augment")
    return _permutations(n_real, n, np.random.default_rng(seed))


def _permutations(n_real: int, n: int, rng: np.random.Generator) -> Iterator[int]:
    for start in range(0, n, n_real):
        yield from rng.permutation(n_real)[: n - start].tolist()


def source_indices(n_real: int, n: int, *, seed: int) -> np.ndarray:
    """:func:`iter_source_indices` as ``(n,)`` int64 indices."""
    return np.fromiter(iter_source_indices(n_real, n, seed=seed), np.int64, count=max(n, 0))


def iter_augment_pairs(
    real: np.ndarray, n: int, *, seed: int, cfg: TraditionalAugConfig | None = None
) -> Iterator[np.ndarray]:
    """Yield ``n`` augmented pairs ``(2, H, W)`` from ``real`` slices, one at a time (what
    :func:`augment_pairs` stacks; an export streams them, so memory does not grow with ``n``).

    Args:
        real: ``(N, 2, H, W)`` float ``[image, mask]``, image in [0, 1], mask in {0, 1}.
        n: number of augmented pairs to produce (may exceed N: sources repeat with new random transforms).
        seed: seeds both the choice of sources and the transforms.
        cfg: flip / rotation parameters.

    Yields ``(2, H, W)`` float32: image in [0, 1], mask exactly {0, 1}. The inputs are checked before
    the first pair.
    """
    cfg = cfg or TraditionalAugConfig()
    real = np.asarray(real)
    if real.ndim != 4 or real.shape[1] != 2:
        raise ValueError(f"real slices must be (N, 2, H, W) [image, mask], got shape {real.shape}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    return _augmented(real, iter_source_indices(real.shape[0], n, seed=seed), seed, cfg)


def _augmented(
    real: np.ndarray, src: Iterator[int], seed: int, cfg: TraditionalAugConfig
) -> Iterator[np.ndarray]:
    # One RandomState drives every transform, in a fixed order per pair: the sequence is seeded end to end.
    state = np.random.RandomState(seed)
    flips = [RandFlip(prob=cfg.flip_prob, spatial_axis=axis) for axis in (0, 1)]
    rotate = RandRotate(
        range_x=math.radians(cfg.max_rotation_deg), prob=cfg.rotate_prob, keep_size=True, padding_mode="zeros"
    )
    for t in (*flips, rotate):
        t.set_random_state(state=state)
    for s in src:
        pair = real[s].astype(np.float32)  # (2, H, W): MONAI's channel-first array layout
        for flip in flips:
            pair = flip(pair)  # one draw, both channels flipped together
        rotate.randomize(None)  # one angle for the pair, then each channel with its own interpolation
        image = rotate(pair[0:1], mode="bilinear", randomize=False)
        mask = rotate(pair[1:2], mode="nearest", randomize=False)
        out = np.empty((2, *real.shape[2:]), np.float32)
        out[0] = np.clip(convert_to_numpy(image)[0], 0.0, 1.0)
        out[1] = convert_to_numpy(mask)[0] > cfg.mask_threshold
        yield out


def augment_pairs(
    real: np.ndarray, n: int, *, seed: int, cfg: TraditionalAugConfig | None = None
) -> np.ndarray:
    """The ``n`` pairs of :func:`iter_augment_pairs` as one ``(n, 2, H, W)`` float32 array."""
    pairs = iter_augment_pairs(real, n, seed=seed, cfg=cfg)
    out = np.empty((n, 2, *np.shape(real)[2:]), dtype=np.float32)
    for i, pair in enumerate(pairs):
        out[i] = pair
    return out


def draw_traditional(
    slices, n: int, seed: int, cfg: TraditionalAugConfig | None = None
) -> Iterator[np.ndarray]:
    """The registry's draw: ``n`` augmented pairs of a cohort's balanced tumour slices (a SliceSet), one
    at a time."""
    return iter_augment_pairs(slices.slices, n, seed=seed, cfg=cfg)
