"""Does augmentation help? Downstream segmentation, its metrics, and quality metrics of synthetic pairs.

Downstream protocol (method.md, "Downstream evaluation"): a 2D U-Net from MONAI (1 input channel, 1
output, sigmoid), soft Dice loss, RMSprop lr 1e-4 (momentum 0.999, as in the authors' code), batch 32,
trained on real training slices (+ N synthetic pairs) and tested on other patients, 3D volumes segmented
slice by slice and stacked. Two training-length protocols (issue 4):
    "fixed_epochs"  the paper's: ``epochs`` passes over the training set, so adding N pairs adds steps;
    "step_matched"  every run of a configuration gets the same number of optimiser steps
                    (:func:`step_matched_steps`), real-only included: the fair comparison.

Metrics (all as fractions in [0, 1] unless said otherwise):
    dice_slice  the paper's metric: soft Dice of the predicted probabilities on tumour-containing 2D test
                slices, averaged over all such slices of all test patients;
    dice_pooled the same soft Dice as the authors' notebook computes it: pooled over the pixels of each
                batch of 32 consecutive tumour slices (patients in order), averaged over the batches;
                larger than dice_slice, since small tumours weigh less;
    dice_3d     hard Dice of the thresholded, stacked 3D prediction per patient, averaged over patients;
    hd95        95th-percentile symmetric Hausdorff distance per patient (MONAI), in mm when the case
                carries an affine (else in voxels), averaged over patients.
Quality of synthetic pairs against held-out real slices: PSNR (dB), SSIM, LPIPS, a Frechet distance on
VGG16 features ("Frechet VGG16 distance": no Inception weights offline, so it is NOT an FID and is not
comparable with published FIDs), the Jensen-Shannon divergence of mask-area histograms (bits), and a
memorisation check (nearest real training slice of each synthetic pair).
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import numpy as np
import torch
from torch import Tensor, nn

from .errors import DHVAEError
from .train import step_generator

log = logging.getLogger(__name__)


def _as_tensor(x: np.ndarray | Tensor, dtype: Any = np.float32) -> Tensor:
    """A CPU tensor from an array or tensor (copies negative-stride views, which torch refuses)."""
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x, dtype=dtype)))


TrainingProtocol = Literal["fixed_epochs", "step_matched"]
PROTOCOLS: tuple[str, ...] = ("fixed_epochs", "step_matched")


# --- patient-level split --------------------------------------------------------------------------


@dataclass(frozen=True)
class PatientSplit:
    """Disjoint sets of patients: generators and U-Nets see ``train`` only; metrics use ``test`` only."""

    train: tuple[str, ...]
    test: tuple[str, ...]

    def slice_indices(self, slice_case_ids: Sequence[str], part: Literal["train", "test"]) -> np.ndarray:
        """Indices of the slices (given each slice's patient id) that belong to ``part``. (K,) int64."""
        wanted = set(self.train if part == "train" else self.test)
        return np.array([i for i, c in enumerate(slice_case_ids) if c in wanted], dtype=np.int64)


def patient_split(
    case_ids: Sequence[str],
    *,
    seed: int,
    test_fraction: float | None = None,
    n_train: int | None = None,
    n_test: int | None = None,
) -> PatientSplit:
    """Split patients (not slices) into train and test, seeded; a patient is never on both sides.

    ``case_ids`` may repeat (one entry per slice); the split is over the distinct ids. Give exactly one of
    ``test_fraction`` (rounded, at least one patient each side) or ``n_train`` / ``n_test`` (the paper: 10
    training and 30 test patients; a missing count means "all the others").
    """
    patients = sorted(set(case_ids))
    n = len(patients)
    if (test_fraction is None) == (n_train is None and n_test is None):
        raise ValueError("give either test_fraction or n_train / n_test")
    if test_fraction is not None:
        if not 0.0 < test_fraction < 1.0:
            raise DHVAEError(f"test_fraction must be in (0, 1), got {test_fraction}")
        n_test = min(max(1, round(test_fraction * n)), n - 1)
        n_train = n - n_test
    else:
        n_train = n - n_test if n_train is None else n_train
        n_test = n - n_train if n_test is None else n_test
    if n_train < 1 or n_test < 1 or n_train + n_test > n:
        raise DHVAEError(
            f"cannot split {n} patient(s) into {n_train} training and {n_test} test patient(s): "
            "a patient-level evaluation needs at least one patient on each side"
        )
    order = np.random.default_rng(seed).permutation(n)
    train = tuple(sorted(patients[i] for i in order[:n_train]))
    test = tuple(sorted(patients[i] for i in order[n_train : n_train + n_test]))
    return PatientSplit(train, test)


# --- the downstream U-Net -------------------------------------------------------------------------


@dataclass(frozen=True)
class SegmenterConfig:
    """The downstream 2D U-Net and its training (method.md: soft Dice, RMSprop 1e-4, 40 epochs, batch 32).

    The U-Net's widths are not given by method.md; MONAI's usual 2D layout is the default. The optimiser
    fields beyond the learning rate are those of the authors' ``train_unet.ipynb``, which method.md does
    not list. ``momentum`` matters most: RMSprop's momentum of 0.999 multiplies the effective step by up
    to 1000, and without it the U-Net barely moves in 40 epochs (real-only slice Dice 0.09 after 160 to
    760 steps; 0.62 after 160 with it: bench/results/unet_steps.json).
    """

    channels: tuple[int, ...] = (16, 32, 64, 128, 256)
    strides: tuple[int, ...] = (2, 2, 2, 2)
    num_res_units: int = 2
    lr: float = 1e-4
    momentum: float = 0.999  # RMSprop momentum (authors' code; torch's default is 0)
    weight_decay: float = 1e-8  # authors' code
    grad_clip: float | None = 2.0  # max gradient norm before each step (authors' code); None: no clipping
    # "batch": one soft Dice over all pixels of the batch (the authors' dice_loss, MONAI batch=True);
    # "slice": the mean of per-slice soft Dice (MONAI's default), which weights small tumours more.
    dice_loss: Literal["batch", "slice"] = "batch"
    batch_size: int = 32
    drop_last: bool = True  # an epoch drops its last partial batch, as the authors' DataLoader does
    epochs: int = 40
    threshold: float = 0.5  # probability above which a pixel is tumour (dice_3d, hd95)


def build_unet(cfg: SegmenterConfig) -> nn.Module:
    """MONAI 2D U-Net, 1 input channel (image), 1 output channel (tumour logit; sigmoid outside)."""
    from monai.networks.nets import UNet

    return UNet(
        spatial_dims=2,
        in_channels=1,
        out_channels=1,
        channels=cfg.channels,
        strides=cfg.strides,
        num_res_units=cfg.num_res_units,
    )


def steps_per_epoch(n_slices: int, batch_size: int, drop_last: bool = True) -> int:
    """Optimiser steps of one pass over ``n_slices``, as a DataLoader counts them: ``drop_last`` drops the
    last partial batch (but an epoch always has at least one batch)."""
    n = n_slices // batch_size if drop_last else math.ceil(n_slices / batch_size)
    return max(1, n)


def step_matched_steps(n_real: int, n_synthetic_max: int, cfg: SegmenterConfig) -> int:
    """The step budget of the "step_matched" protocol: what ``cfg.epochs`` epochs of the largest run take.

    Every run of a configuration (N = 0 included) is then trained for this many optimiser steps.
    """
    return cfg.epochs * steps_per_epoch(n_real + n_synthetic_max, cfg.batch_size, cfg.drop_last)


def training_steps(n_slices: int, cfg: SegmenterConfig, protocol: TrainingProtocol, steps: int | None) -> int:
    """Number of optimiser steps a run takes under ``protocol`` (``steps`` is required for "step_matched")."""
    if protocol == "fixed_epochs":
        return cfg.epochs * steps_per_epoch(n_slices, cfg.batch_size, cfg.drop_last)
    if protocol == "step_matched":
        if steps is None or steps < 1:
            raise ValueError("the step_matched protocol needs a step budget (see step_matched_steps)")
        return steps
    raise ValueError(f"unknown protocol {protocol!r}; choose one of {PROTOCOLS}")


def train_segmenter(
    pairs: np.ndarray | Tensor,
    *,
    seed: int,
    cfg: SegmenterConfig | None = None,
    protocol: TrainingProtocol = "fixed_epochs",
    steps: int | None = None,
    device: torch.device | str = "cpu",
    progress: Callable[[int, int, float], None] | None = None,
) -> nn.Module:
    """Train the downstream U-Net on ``pairs`` ``(N, 2, H, W)`` ([image, mask], real + synthetic together).

    Soft Dice loss (``monai.losses.DiceLoss(sigmoid=True)``, pooled over the batch or per slice as
    ``cfg.dice_loss`` says), RMSprop at ``cfg.lr`` with ``cfg.momentum`` and ``cfg.weight_decay``, the
    gradient norm clipped at ``cfg.grad_clip``; batches of ``cfg.batch_size`` from seeded permutations of
    the N slices, one permutation per epoch; the run lasts :func:`training_steps` steps. The initial
    weights and the batch order depend on ``seed`` only (the global torch RNG is left as it was).
    ``progress(step, total, loss)`` is called after every step. Returns the model in eval mode.
    """
    from monai.losses import DiceLoss

    cfg = cfg or SegmenterConfig()
    data = _as_tensor(pairs)
    if data.ndim != 4 or data.shape[1] != 2:
        raise ValueError(f"training pairs must be (N, 2, H, W) [image, mask], got {tuple(data.shape)}")
    n = data.shape[0]
    if n == 0:
        raise DHVAEError("no training slices for the segmenter")
    total = training_steps(n, cfg, protocol, steps)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_unet(cfg)
    model.to(device).train()
    opt = torch.optim.RMSprop(
        model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
    )
    loss_fn = DiceLoss(sigmoid=True, batch=cfg.dice_loss == "batch")
    per_epoch = steps_per_epoch(n, cfg.batch_size, cfg.drop_last)
    order = torch.empty(0, dtype=torch.long)
    for step in range(total):
        epoch, j = divmod(step, per_epoch)
        if j == 0:
            order = torch.randperm(n, generator=step_generator(seed, epoch, stream=3))
        batch = data[order[j * cfg.batch_size : (j + 1) * cfg.batch_size]].to(device)
        loss = loss_fn(model(batch[:, :1]), batch[:, 1:])
        if not torch.isfinite(loss):
            raise DHVAEError(f"segmenter training diverged at step {step} (loss {loss.item()})")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        if progress is not None:
            progress(step + 1, total, loss.item())
    return model.eval()


@torch.no_grad()
def predict_slices(model: nn.Module, images: np.ndarray | Tensor, batch_size: int = 32) -> np.ndarray:
    """Tumour probabilities for 2D images ``(N, H, W)`` in [0, 1]; returns ``(N, H, W)`` float32."""
    model.eval()
    x = _as_tensor(images)
    device = next(model.parameters()).device
    out = [
        torch.sigmoid(model(x[i : i + batch_size, None].to(device)))[:, 0].cpu()
        for i in range(0, len(x), batch_size)
    ]
    return torch.cat(out).numpy() if out else np.zeros_like(x.numpy())


def segment_volume(model: nn.Module, image: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """Segment a volume ``(H, W, D)`` slice by slice along the last (axial) axis and stack the
    probabilities: ``(H, W, D)``."""
    return np.moveaxis(predict_slices(model, np.moveaxis(image, -1, 0), batch_size), 0, -1)


# --- segmentation metrics -------------------------------------------------------------------------


def soft_dice(prob: np.ndarray | Tensor, target: np.ndarray | Tensor, smooth: float = 1e-5) -> np.ndarray:
    """Soft Dice per 2D slice: ``(2 sum(p t) + s) / (sum(p) + sum(t) + s)`` over each slice's pixels.

    ``prob`` are probabilities (not thresholded) and ``target`` the binary mask, both ``(N, H, W)``.
    Returns ``(N,)`` in [0, 1]. ``s = 1e-5`` as in ``monai.losses.DiceLoss`` (so this is 1 - that loss);
    the paper reports the mean of this over tumour-containing test slices, in percent.
    """
    p = np.asarray(prob, dtype=np.float64).reshape(len(prob), -1)
    t = np.asarray(target, dtype=np.float64).reshape(len(target), -1)
    return (2.0 * (p * t).sum(1) + smooth) / (p.sum(1) + t.sum(1) + smooth)


def dice_score(pred: np.ndarray, target: np.ndarray) -> float:
    """Hard Dice ``2 |P & T| / (|P| + |T|)`` of two binary arrays of any shape; 1.0 when both are empty."""
    p, t = np.asarray(pred).astype(bool), np.asarray(target).astype(bool)
    denom = p.sum() + t.sum()
    return 1.0 if denom == 0 else float(2.0 * np.logical_and(p, t).sum() / denom)


def hd95(pred: np.ndarray, target: np.ndarray, spacing: Sequence[float] | None = None) -> float:
    """95th-percentile symmetric Hausdorff distance between binary volumes (``monai.metrics``).

    Units: those of ``spacing`` (mm per voxel along each axis), voxels when it is None. Undefined cases
    are given fixed values so that a mean over patients stays finite: both masks empty -> 0; exactly one
    empty (a missed tumour or a phantom one) -> the diagonal of the volume, the largest distance possible.
    """
    from monai.metrics import compute_hausdorff_distance

    p, t = np.asarray(pred).astype(bool), np.asarray(target).astype(bool)
    if p.shape != t.shape:
        raise ValueError(f"shapes differ: {p.shape} vs {t.shape}")
    sp = np.ones(p.ndim) if spacing is None else np.asarray(spacing, dtype=np.float64)
    if not p.any() and not t.any():
        return 0.0
    if not p.any() or not t.any():
        return float(np.linalg.norm(np.asarray(p.shape) * sp))
    with warnings.catch_warnings():  # MONAI 1.5+ warns about its own internal use of a deprecated argument
        warnings.simplefilter("ignore", FutureWarning)
        d = compute_hausdorff_distance(
            torch.from_numpy(p[None, None].astype(np.float32)),
            torch.from_numpy(t[None, None].astype(np.float32)),
            include_background=True,  # one foreground channel: it is the class
            percentile=95,
            spacing=[float(s) for s in sp],
        )
    return float(d.item())


class VolumeCase(Protocol):
    """A test patient: ``image`` ``(H, W, D)`` in [0, 1], ``mask`` ``(H, W, D)`` {0, 1}; ``affine`` optional.

    models.preprocess.ResampledCase is one.
    """

    case_id: str
    image: np.ndarray
    mask: np.ndarray


def voxel_spacing(case: Any) -> tuple[float, ...] | None:
    """mm per voxel along each axis from ``case.affine`` (4x4) if it has one, else None (voxel units)."""
    affine = getattr(case, "affine", None)
    if affine is None:
        return None
    return tuple(float(s) for s in np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0))


def evaluate_segmenter(
    model: nn.Module,
    cases: Sequence[VolumeCase],
    *,
    threshold: float = 0.5,
    batch_size: int = 32,
    pooled_batch: int = 32,
) -> dict[str, Any]:
    """Segment every test volume slice by slice and measure it.

    Returns a dict:
        dice_slice     mean soft Dice over all tumour-containing 2D slices of all cases (the paper's metric)
        dice_pooled    soft Dice pooled over batches of ``pooled_batch`` consecutive tumour slices, averaged
                       over batches (the authors' evaluation loop)
        dice_3d        mean over cases of the hard Dice of the thresholded 3D prediction
        hd95           mean over cases of the 95th-percentile Hausdorff distance (mm if affines, else voxels)
        n_cases, n_tumour_slices, hd95_unit, threshold
        per_case       [{"case_id", "dice_slice", "dice_3d", "hd95", "tumour_slices"}]
    """
    if not cases:
        raise DHVAEError("no test cases to evaluate")
    slice_scores: list[np.ndarray] = []
    tumour_probs: list[np.ndarray] = []  # (n, H, W) per case, for dice_pooled
    tumour_masks: list[np.ndarray] = []
    per_case: list[dict[str, Any]] = []
    units = {voxel_spacing(c) is None for c in cases}
    for case in cases:
        prob = segment_volume(model, case.image, batch_size)
        mask = np.asarray(case.mask) > 0
        tumour = np.flatnonzero(mask.reshape(-1, mask.shape[-1]).any(0))  # axial slices with tumour
        tumour_probs.append(np.moveaxis(prob[..., tumour], -1, 0))
        tumour_masks.append(np.moveaxis(mask[..., tumour], -1, 0))
        scores = soft_dice(tumour_probs[-1], tumour_masks[-1])
        slice_scores.append(scores)
        pred = prob > threshold
        per_case.append(
            {
                "case_id": case.case_id,
                "dice_slice": float(scores.mean()) if scores.size else float("nan"),
                "dice_3d": dice_score(pred, mask),
                "hd95": hd95(pred, mask, voxel_spacing(case)),
                "tumour_slices": int(tumour.size),
            }
        )
    all_scores = np.concatenate(slice_scores)
    probs, masks = np.concatenate(tumour_probs), np.concatenate(tumour_masks)
    pooled = [
        soft_dice(probs[None, i : i + pooled_batch], masks[None, i : i + pooled_batch])[0]
        for i in range(0, len(probs), pooled_batch)
    ]
    return {
        "dice_slice": float(all_scores.mean()) if all_scores.size else float("nan"),
        "dice_pooled": float(np.mean(pooled)) if pooled else float("nan"),
        "dice_3d": float(np.mean([c["dice_3d"] for c in per_case])),
        "hd95": float(np.mean([c["hd95"] for c in per_case])),
        "hd95_unit": "voxel" if units == {True} else "mm" if units == {False} else "mixed",
        "n_cases": len(per_case),
        "n_tumour_slices": int(all_scores.size),
        "threshold": threshold,
        "per_case": per_case,
    }


def run_downstream(
    real: np.ndarray,
    synthetic: np.ndarray | None,
    test_cases: Sequence[VolumeCase],
    *,
    seed: int,
    cfg: SegmenterConfig | None = None,
    protocol: TrainingProtocol = "fixed_epochs",
    steps: int | None = None,
    device: torch.device | str = "cpu",
) -> dict[str, Any]:
    """One benchmark cell: train a U-Net on ``real`` (+ ``synthetic``) pairs ``(N, 2, H, W)``, test it.

    Returns :func:`evaluate_segmenter`'s dict plus ``seed``, ``protocol``, ``n_real``, ``n_synthetic``
    and ``steps`` (optimiser steps actually taken).
    """
    cfg = cfg or SegmenterConfig()
    parts = [np.asarray(real, np.float32)] + (
        [np.asarray(synthetic, np.float32)] if synthetic is not None and len(synthetic) else []
    )
    data = np.concatenate(parts)
    n_steps = training_steps(len(data), cfg, protocol, steps)
    model = train_segmenter(data, seed=seed, cfg=cfg, protocol=protocol, steps=steps, device=device)
    result = evaluate_segmenter(model, test_cases, threshold=cfg.threshold, batch_size=cfg.batch_size)
    return {
        "seed": seed,
        "protocol": protocol,
        "n_real": len(real),
        "n_synthetic": 0 if synthetic is None else len(synthetic),
        "steps": n_steps,
        **result,
    }


# --- aggregation over seeds -----------------------------------------------------------------------


def summarize(values: Sequence[float], confidence: float = 0.95) -> dict[str, float]:
    """Mean, sample standard deviation (ddof 1) and a two-sided t-interval for the mean over seeds.

    ``ci_low, ci_high = mean -+ t_{(1+confidence)/2, n-1} * std / sqrt(n)``. With one value the std and
    the interval are NaN (a single seed says nothing about the spread).
    """
    from scipy import stats

    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        raise ValueError("no values to summarize")
    mean = float(v.mean())
    if v.size == 1:
        return {"mean": mean, "std": float("nan"), "ci_low": float("nan"), "ci_high": float("nan"), "n": 1}
    std = float(v.std(ddof=1))
    half = float(stats.t.ppf(0.5 + confidence / 2, v.size - 1)) * std / math.sqrt(v.size)
    return {"mean": mean, "std": std, "ci_low": mean - half, "ci_high": mean + half, "n": int(v.size)}


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

    a, b = _as_tensor(x)[:, None], _as_tensor(y)[:, None]
    return SSIMMetric(spatial_dims=2, data_range=data_range, reduction="none")(a, b).reshape(-1).numpy()


def js_divergence(p: Sequence[float], q: Sequence[float]) -> float:
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


def default_perceptual_net() -> nn.Module:
    """LPIPS-VGG16 on 2-channel pairs in [0, 1] (models/perceptual.py); WeightsMissing without weights."""
    from .perceptual import LPIPS

    return LPIPS(in_channels=2, input_range="unit")


@torch.no_grad()
def vgg16_features(pairs: np.ndarray, net: nn.Module, layer: int = -1, batch_size: int = 32) -> np.ndarray:
    """Per-pair VGG16 descriptors: the spatial mean of LPIPS's channel-normalised activations at ``layer``
    (index into relu1_2 .. relu5_3; default relu5_3, 512-d). ``pairs`` ``(N, 2, H, W)``, H, W >= 16.
    Returns ``(N, C_layer)`` float64."""
    x = _as_tensor(pairs)
    device = next(net.parameters()).device
    out = [
        net.features(x[i : i + batch_size].to(device))[layer].mean((2, 3)).cpu()
        for i in range(0, len(x), batch_size)
    ]
    return torch.cat(out).double().numpy()


def frechet_vgg16_distance(
    a: np.ndarray, b: np.ndarray, net: nn.Module | None = None, layer: int = -1
) -> float:
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
    q = _as_tensor(queries, np.float64).flatten(1)
    r = _as_tensor(references, np.float64).flatten(1)
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
    net: nn.Module | None = None,
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
