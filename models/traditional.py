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


def source_indices(n_real: int, n: int, *, seed: int) -> np.ndarray:
    """The real slice each of the ``n`` augmented pairs comes from: concatenated seeded permutations.

    Returns ``(n,)`` int64 indices in ``[0, n_real)``.
    """
    if n_real < 1:
        raise ValueError("no real slices to augment")
    rng = np.random.default_rng(seed)
    reps = math.ceil(n / n_real) if n > 0 else 0
    order = [rng.permutation(n_real) for _ in range(reps)]
    return np.concatenate(order)[:n].astype(np.int64) if order else np.zeros(0, np.int64)


def augment_pairs(
    real: np.ndarray, n: int, *, seed: int, cfg: TraditionalAugConfig | None = None
) -> np.ndarray:
    """``n`` augmented pairs from ``real`` slices.

    Args:
        real: ``(N, 2, H, W)`` float ``[image, mask]``, image in [0, 1], mask in {0, 1}.
        n: number of augmented pairs to produce (may exceed N: sources repeat with new random transforms).
        seed: seeds both the choice of sources and the transforms.
        cfg: flip / rotation parameters.

    Returns:
        ``(n, 2, H, W)`` float32: image in [0, 1], mask exactly {0, 1}.
    """
    cfg = cfg or TraditionalAugConfig()
    real = np.asarray(real)
    if real.ndim != 4 or real.shape[1] != 2:
        raise ValueError(f"real slices must be (N, 2, H, W) [image, mask], got shape {real.shape}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    src = source_indices(real.shape[0], n, seed=seed)

    # One RandomState drives every transform, in a fixed order per pair: the sequence is seeded end to end.
    state = np.random.RandomState(seed)
    flips = [RandFlip(prob=cfg.flip_prob, spatial_axis=axis) for axis in (0, 1)]
    rotate = RandRotate(
        range_x=math.radians(cfg.max_rotation_deg), prob=cfg.rotate_prob, keep_size=True, padding_mode="zeros"
    )
    for t in (*flips, rotate):
        t.set_random_state(state=state)

    out = np.empty((n, *real.shape[1:]), dtype=np.float32)
    for i, s in enumerate(src):
        pair = real[s].astype(np.float32)  # (2, H, W): MONAI's channel-first array layout
        for flip in flips:
            pair = flip(pair)  # one draw, both channels flipped together
        rotate.randomize(None)  # one angle for the pair, then each channel with its own interpolation
        image = rotate(pair[0:1], mode="bilinear", randomize=False)
        mask = rotate(pair[1:2], mode="nearest", randomize=False)
        out[i, 0] = np.clip(convert_to_numpy(image)[0], 0.0, 1.0)
        out[i, 1] = convert_to_numpy(mask)[0] > cfg.mask_threshold
    return out


def draw_traditional(slices, n: int, seed: int) -> np.ndarray:
    """The registry's draw: ``n`` augmented pairs of a cohort's balanced tumour slices (a SliceSet)."""
    return augment_pairs(slices.slices, n, seed=seed)
