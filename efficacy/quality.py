"""Quality of synthetic pairs against held-out real slices (no segmenter involved).

PSNR (dB), SSIM, LPIPS, a Frechet distance on VGG16 features ("Frechet VGG16 distance": no Inception
weights offline, so it is NOT an FID and is not comparable with published FIDs), the Jensen-Shannon
divergence of mask-area histograms (bits), and a memorisation check (nearest real training slice of
each synthetic pair).
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import torch
from torch import Tensor

from models.perceptual import LPIPS

from .segmenter import as_tensor

log = logging.getLogger(__name__)

# --- quality of synthetic pairs -------------------------------------------------------------------


def psnr(x: np.ndarray, y: np.ndarray, data_range: float = 1.0) -> np.ndarray:
    """Peak signal-to-noise ratio per image, in dB: ``10 log10(data_range^2 / MSE)``; inf if identical.

    ``x``, ``y``: ``(N, ...)`` arrays of the same shape. Returns ``(N,)``.
    """
    a, b = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
    mse = ((a - b) ** 2).reshape(len(a), -1).mean(1)
    with np.errstate(divide="ignore"):
        return 10.0 * np.log10(data_range**2 / mse)


def ssim(x: np.ndarray, y: np.ndarray, data_range: float = 1.0) -> np.ndarray:
    """Structural similarity per 2D image ``(N, H, W)`` (``monai.metrics.SSIMMetric``: Gaussian window 11,
    sigma 1.5, k1 0.01, k2 0.03, the usual Wang et al. 2004 constants). Returns ``(N,)`` in [-1, 1]."""
    from monai.metrics import SSIMMetric

    a, b = as_tensor(x)[:, None], as_tensor(y)[:, None]
    scores = SSIMMetric(spatial_dims=2, data_range=data_range, reduction="none")(a, b)
    return cast(Tensor, scores).reshape(-1).numpy()


def js_divergence(p: Sequence[float] | np.ndarray, q: Sequence[float] | np.ndarray) -> float:
    """Jensen-Shannon divergence between two histograms (normalised here), in bits: 0 (equal) .. 1 (disjoint).

    ``JS = 0.5 KL(p || m) + 0.5 KL(q || m)``, ``m = (p + q) / 2``, log base 2, with ``0 log 0 = 0``.
    """
    a, b = np.asarray(p, np.float64), np.asarray(q, np.float64)
    if a.shape != b.shape or a.sum() <= 0 or b.sum() <= 0 or (a < 0).any() or (b < 0).any():
        raise ValueError("js_divergence needs two non-negative histograms of the same length, each with mass")
    a, b = a / a.sum(), b / b.sum()
    m = 0.5 * (a + b)

    def kl(u: np.ndarray) -> float:
        nz = u > 0
        return float((u[nz] * np.log2(u[nz] / m[nz])).sum())

    return 0.5 * kl(a) + 0.5 * kl(b)


def mask_area_js(masks_a: np.ndarray, masks_b: np.ndarray, bin_px: float = 25.0) -> float:
    """JS divergence (bits) between the distributions of tumour area (pixels per 2D mask, ``(N, H, W)``),
    as histograms on shared bins of ``bin_px`` pixels (25 px: the balancing bins of method.md)."""
    area_a = (np.asarray(masks_a) > 0.5).reshape(len(masks_a), -1).sum(1)
    area_b = (np.asarray(masks_b) > 0.5).reshape(len(masks_b), -1).sum(1)
    top = max(area_a.max(initial=0), area_b.max(initial=0)) + bin_px
    edges = np.arange(0.0, top + bin_px, bin_px)
    return js_divergence(np.histogram(area_a, edges)[0], np.histogram(area_b, edges)[0])


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6
) -> float:
    """Frechet (2-Wasserstein) distance between Gaussians N(mu1, sigma1) and N(mu2, sigma2):

        ||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^{1/2})

    (Dowson & Landau 1982; the formula of FID, Heusel et al. 2017). If the matrix square root is not
    finite, ``eps`` is added to both diagonals first, as pytorch-fid does. Units: squared feature units.
    """
    from scipy import linalg

    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    with warnings.catch_warnings():  # singular products (fewer samples than dimensions) are handled below
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():
        offset = np.eye(s1.shape[0]) * eps
        covmean = linalg.sqrtm((s1 + offset) @ (s2 + offset))
    covmean = np.real(covmean)  # numerical noise can leave tiny imaginary parts
    diff = mu1 - mu2
    return float(max(0.0, diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean)))


def frechet_distance_from_features(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted (mean, covariance ddof 1) to ``(N, D)`` and ``(M, D)``."""
    a, b = np.asarray(feats_a, np.float64), np.asarray(feats_b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or len(a) < 2 or len(b) < 2:
        raise ValueError(f"need two (N >= 2, D) feature sets of equal D, got {a.shape} and {b.shape}")
    if min(len(a), len(b)) <= a.shape[1]:
        log.warning(
            "Frechet distance from %d and %d samples of %d-d features: the covariances are singular and the "
            "value is biased; use several times more samples than dimensions",
            len(a),
            len(b),
            a.shape[1],
        )
    return frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))


def default_perceptual_net() -> LPIPS:
    """LPIPS-VGG16 on 2-channel pairs in [0, 1] (models/perceptual.py); WeightsMissing without weights."""
    return LPIPS(in_channels=2, input_range="unit")


@torch.no_grad()
def vgg16_features(pairs: np.ndarray, net: LPIPS, layer: int = -1, batch_size: int = 32) -> np.ndarray:
    """Per-pair VGG16 descriptors: the spatial mean of LPIPS's channel-normalised activations at ``layer``
    (index into relu1_2 .. relu5_3; default relu5_3, 512-d). ``pairs`` ``(N, 2, H, W)``, H, W >= 16.
    Returns ``(N, C_layer)`` float64."""
    x = as_tensor(pairs)
    device = next(net.parameters()).device
    out = [
        net.features(x[i : i + batch_size].to(device))[layer].mean((2, 3)).cpu()
        for i in range(0, len(x), batch_size)
    ]
    return torch.cat(out).double().numpy()


def frechet_vgg16_distance(a: np.ndarray, b: np.ndarray, net: LPIPS | None = None, layer: int = -1) -> float:
    """The "Frechet VGG16 distance" between two sets of pairs ``(N, 2, H, W)``.

    :func:`frechet_distance_from_features` on :func:`vgg16_features`: an FID-like score with ImageNet
    VGG16 (the 2-channel LPIPS trunk) in place of Inception, so not comparable with published FIDs.
    Needs several times more pairs than feature dimensions (512 at relu5_3) for a stable covariance.
    """
    net = net or default_perceptual_net()
    return frechet_distance_from_features(vgg16_features(a, net, layer), vgg16_features(b, net, layer))


def nearest_neighbours(
    queries: np.ndarray, references: np.ndarray, chunk: int = 256
) -> tuple[np.ndarray, np.ndarray]:
    """For each query image ``(N, H, W)``, the closest reference image ``(M, H, W)`` by L2 distance.

    Returns ``(index (N,) int64, distance (N,) float64)``, the distance as an RMS pixel difference
    ``||q - r||_2 / sqrt(H W)`` (same units as the intensities: a fraction of the [0, 1] range).
    """
    q = as_tensor(queries, np.float64).flatten(1)
    r = as_tensor(references, np.float64).flatten(1)
    if len(r) == 0:
        raise ValueError("no reference images")
    idx, dist = [], []
    for i in range(0, len(q), chunk):
        d = torch.cdist(q[i : i + chunk], r)
        best = d.min(1)
        idx.append(best.indices)
        dist.append(best.values)
    if not idx:
        return np.zeros(0, np.int64), np.zeros(0)
    scale = math.sqrt(q.shape[1])
    return torch.cat(idx).numpy(), (torch.cat(dist) / scale).numpy()


@dataclass
class MemorisationReport:
    """Nearest real training slice of each synthetic pair (image channel, RMS distance in [0, 1] units)."""

    threshold: float
    fraction_near_copies: float  # share of synthetic pairs closer than ``threshold`` to a training slice
    distance_min: float
    distance_median: float
    nearest_index: np.ndarray = field(repr=False)  # (N,) index into the training slices
    distance: np.ndarray = field(repr=False)  # (N,)
    # Scale for reading the distances: median over training slices of the distance to the nearest training
    # slice of ANOTHER patient (how close two different real patients come). None without patient ids.
    reference_median: float | None = None

    def as_dict(self) -> dict[str, float | None]:
        return {
            "threshold": self.threshold,
            "fraction_near_copies": self.fraction_near_copies,
            "distance_min": self.distance_min,
            "distance_median": self.distance_median,
            "reference_median": self.reference_median,
        }


def cross_patient_distances(images: np.ndarray, case_ids: Sequence[str]) -> np.ndarray:
    """For each real image ``(M, H, W)``, the RMS distance to the nearest image of another patient. ``(M,)``.

    Slices of the same patient are excluded because neighbouring slices are near-copies of each other.
    Patients with no other patient to compare with get NaN.
    """
    images = np.asarray(images)
    ids = np.asarray(case_ids)
    if len(ids) != len(images):
        raise ValueError(f"{len(images)} images but {len(ids)} case ids")
    out = np.full(len(images), np.nan)
    for case in np.unique(ids):
        mine, others = ids == case, ids != case
        if others.any():
            out[mine] = nearest_neighbours(images[mine], images[others])[1]
    return out


def memorisation(
    synthetic: np.ndarray,
    train: np.ndarray,
    threshold: float = 0.02,
    train_case_ids: Sequence[str] | None = None,
) -> MemorisationReport:
    """Does the generator copy training patients?

    For each synthetic pair ``(N, 2, H, W)``, the nearest real training pair ``(M, 2, H, W)`` by L2 on the
    image channel (RMS distance, :func:`nearest_neighbours`); near-copies are those within ``threshold``
    (default 0.02, 2 % of the intensity range: a heuristic). With ``train_case_ids`` (one per training
    slice) the report also gives ``reference_median`` (:func:`cross_patient_distances`), the scale on
    which to judge the distances: a generator that does not copy stays about as far from its training
    slices as different real patients are from each other.
    """
    idx, dist = nearest_neighbours(np.asarray(synthetic)[:, 0], np.asarray(train)[:, 0])
    reference = None
    if train_case_ids is not None:
        ref = cross_patient_distances(np.asarray(train)[:, 0], train_case_ids)
        reference = float(np.nanmedian(ref)) if np.isfinite(ref).any() else None
    return MemorisationReport(
        reference_median=reference,
        threshold=threshold,
        fraction_near_copies=float((dist < threshold).mean()) if dist.size else 0.0,
        distance_min=float(dist.min()) if dist.size else float("nan"),
        distance_median=float(np.median(dist)) if dist.size else float("nan"),
        nearest_index=idx,
        distance=dist,
    )


@torch.no_grad()
def quality_metrics(
    synthetic: np.ndarray,
    heldout: np.ndarray,
    train: np.ndarray | None = None,
    *,
    net: LPIPS | None = None,
    near_copy_threshold: float = 0.02,
    train_case_ids: Sequence[str] | None = None,
    include_vgg: bool = True,
) -> dict[str, Any]:
    """Quality of synthetic pairs ``(N, 2, H, W)`` against held-out real pairs ``(M, 2, H, W)``.

    Synthetic and real slices are unpaired, so PSNR (dB), SSIM and LPIPS compare each synthetic pair with
    its nearest held-out real pair (L2 on the image channel; PSNR / SSIM on the image channel, LPIPS on
    the 2-channel pair) and are averaged: how close the synthetic pairs come to real, unseen anatomy.
    ``frechet_vgg16`` and ``mask_area_js`` compare the two sets as distributions. With ``train`` given,
    ``memorisation`` reports near-copies of training slices (:func:`memorisation`).
    ``include_vgg=False`` skips the VGG16-based metrics (LPIPS, Frechet VGG16 distance), e.g. without
    the weights.
    """
    synthetic, heldout = np.asarray(synthetic, np.float32), np.asarray(heldout, np.float32)
    nn_idx, _ = nearest_neighbours(synthetic[:, 0], heldout[:, 0])
    match = heldout[nn_idx]
    out: dict[str, Any] = {
        "n_synthetic": len(synthetic),
        "n_heldout": len(heldout),
        "psnr_db": float(np.mean(psnr(synthetic[:, 0], match[:, 0]))),
        "ssim": float(np.mean(ssim(synthetic[:, 0], match[:, 0]))),
        "mask_area_js_bits": mask_area_js(synthetic[:, 1], heldout[:, 1]),
    }
    if include_vgg:
        net = net or default_perceptual_net()
        device = next(net.parameters()).device
        lp = [
            net(
                torch.from_numpy(match[i : i + 32]).to(device),
                torch.from_numpy(synthetic[i : i + 32]).to(device),
            )
            .flatten()
            .cpu()
            for i in range(0, len(synthetic), 32)
        ]
        out["lpips"] = float(torch.cat(lp).mean())
        out["frechet_vgg16"] = frechet_vgg16_distance(synthetic, heldout, net)
    if train is not None:
        out["memorisation"] = memorisation(synthetic, train, near_copy_threshold, train_case_ids).as_dict()
    return out
