"""Small seeded fixtures of the efficacy tests: bright discs with their masks, as pairs and volumes."""

from dataclasses import dataclass

import numpy as np

SIZE = 32


def toy_pairs(n: int, seed: int = 0, size: int = SIZE) -> np.ndarray:
    """Bright discs with their mask: (n, 2, size, size) float32 in [0, 1]."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    out = np.zeros((n, 2, size, size), np.float32)
    for i in range(n):
        cy, cx = rng.uniform(0.3, 0.7, 2) * size
        r = rng.uniform(0.1, 0.2) * size
        disc = ((yy - cy) ** 2 + (xx - cx) ** 2 < r * r).astype(np.float32)
        out[i, 0] = 0.2 + 0.6 * disc + 0.05 * rng.random((size, size))
        out[i, 1] = disc
    return out


@dataclass
class Case:
    case_id: str
    image: np.ndarray  # (H, W, D)
    mask: np.ndarray
    affine: np.ndarray | None = None


def toy_case(case_id: str, seed: int, depth: int = 4) -> Case:
    pairs = toy_pairs(depth, seed)
    pairs[0, 1] = 0  # one slice without tumour: excluded from dice_slice
    return Case(
        case_id, np.moveaxis(pairs[:, 0], 0, -1).copy(), np.moveaxis(pairs[:, 1], 0, -1).astype(np.uint8)
    )
