"""The downstream segmenter: a patient split, MONAI's 2D U-Net, how long it trains, and its metrics.

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
                carries an affine (else in voxels), averaged over patients;
    fp_volume   volume predicted as tumour on a patient's tumour-free slices (ml), averaged over patients;
    *_lcc       dice_3d, hd95 and fp_volume again after nnU-Net's post-processing: only the largest 3D
                connected component of the stacked prediction is kept (MONAI's
                KeepLargestConnectedComponent), which removes the scattered false positives a 2D U-Net
                makes on healthy slices. Measured on the same prediction, so every run reports both.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal, Protocol

import numpy as np
import torch
from torch import Tensor, nn

from imaging.cohort import split_sizes
from imaging.errors import DHVAEError
from models.rng import step_generator

log = logging.getLogger(__name__)


def as_tensor(x: np.ndarray | Tensor, dtype: Any = np.float32) -> Tensor:
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
        n_train, n_test = split_sizes(n, test_fraction)
    elif n_train is None:
        assert n_test is not None
        n_train = n - n_test
    elif n_test is None:
        n_test = n - n_train
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
    # "rmsprop": the authors' optimiser; "adam": Adam (our switch, for a baseline that is not held back
    # by RMSprop's momentum-0.999 noise; give it its own ``lr``, e.g. 1e-3)
    optimizer: Literal["rmsprop", "adam"] = "rmsprop"
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


# each optimiser's learning rate when a request or a command names only the optimiser
OPTIMIZER_LR: dict[str, float] = {"rmsprop": 1e-4, "adam": 1e-3}


def make_optimizer(model: nn.Module, cfg: SegmenterConfig) -> torch.optim.Optimizer:
    """The U-Net's optimiser: ``cfg.optimizer`` with its learning rate and weight decay."""
    if cfg.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "rmsprop":
        return torch.optim.RMSprop(
            model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
    raise DHVAEError(f"unknown optimizer {cfg.optimizer!r}; choose from {', '.join(OPTIMIZER_LR)}")


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


OnlineTransform = Callable[[Tensor, int, int], Tensor]  # (batch (B, 2, H, W), seed, step) -> batch


@dataclass(frozen=True)
class LoaderRecipe:
    """How the U-Net's batches are drawn when synthetic pairs are added (issue 11, A.4 and B.4).

    ``real_fraction``: the share of every batch drawn from the real slices (e.g. 0.75: a 3:1 ratio), so
    adding pairs never starves the real ones; None pools real and synthetic slices together (the paper's
    way, where a real slice is seen less often the more pairs are added). ``synthetic_weight``: lambda on
    the synthetic slices' Dice loss. ``pretrain_steps``: the first steps draw synthetic pairs only (then
    every step follows ``real_fraction``): synthetic pretraining and real fine-tuning in one budget.
    """

    real_fraction: float | None = 0.75
    synthetic_weight: float = 1.0
    pretrain_steps: int = 0

    def __post_init__(self) -> None:
        if self.real_fraction is not None and not 0.0 < self.real_fraction <= 1.0:
            raise DHVAEError(f"real_fraction must be in (0, 1], got {self.real_fraction}")
        if self.synthetic_weight < 0 or self.pretrain_steps < 0:
            raise DHVAEError("synthetic_weight and pretrain_steps must be >= 0")


class _Stream:
    """Indices into ``n`` items in seeded permutations, one per pass, continued across steps."""

    def __init__(self, n: int, seed: int, stream: int) -> None:
        self.n, self.seed, self.stream, self.epoch, self.pos = n, seed, stream, 0, n
        self.order: Tensor | None = None

    def take(self, k: int) -> Tensor:
        out: list[Tensor] = []
        while k > 0:
            if self.pos >= self.n:
                self.order = torch.randperm(
                    self.n, generator=step_generator(self.seed, self.epoch, self.stream)
                )
                self.epoch, self.pos = self.epoch + 1, 0
            assert self.order is not None
            got = self.order[self.pos : self.pos + k]
            out.append(got)
            self.pos += len(got)
            k -= len(got)
        return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def train_segmenter(
    pairs: np.ndarray | Tensor,
    *,
    seed: int,
    cfg: SegmenterConfig | None = None,
    protocol: TrainingProtocol = "fixed_epochs",
    steps: int | None = None,
    device: torch.device | str = "cpu",
    progress: Callable[[int, int, float], None] | None = None,
    synthetic: np.ndarray | Tensor | None = None,
    recipe: LoaderRecipe | None = None,
    online: Sequence[OnlineTransform] = (),
    on_step: Callable[[int, nn.Module], None] | None = None,
) -> nn.Module:
    """Train the downstream U-Net on ``pairs`` ``(N, 2, H, W)`` ([image, mask]).

    Soft Dice loss (``monai.losses.DiceLoss(sigmoid=True)``, pooled over the batch or per slice as
    ``cfg.dice_loss`` says), RMSprop at ``cfg.lr`` with ``cfg.momentum`` and ``cfg.weight_decay``, the
    gradient norm clipped at ``cfg.grad_clip``; the run lasts :func:`training_steps` steps. The initial
    weights and the batch order depend on ``seed`` only (the global torch RNG is left as it was).

    Two loaders. Without ``synthetic``/``recipe``/``online`` (the paper's, and the issue-4 grid's):
    ``pairs`` holds real and synthetic slices together, in batches of seeded permutations, one per
    epoch. Otherwise ``pairs`` are the real slices and ``synthetic`` the added ones, drawn as ``recipe``
    says (:class:`LoaderRecipe`), and every batch goes through the ``online`` transforms in order
    (e.g. :class:`efficacy.online.OnlineAugment`).

    ``progress(step, total, loss)`` is called after every step, ``on_step(step, model)`` too (the model
    in train mode: an inner validation may evaluate it). Returns the model in eval mode.
    """
    from monai.losses import DiceLoss

    cfg = cfg or SegmenterConfig()
    data = as_tensor(pairs)
    if data.ndim != 4 or data.shape[1] != 2:
        raise ValueError(f"training pairs must be (N, 2, H, W) [image, mask], got {tuple(data.shape)}")
    n = data.shape[0]
    if n == 0:
        raise DHVAEError("no training slices for the segmenter")
    extra = as_tensor(synthetic) if synthetic is not None and len(synthetic) else None
    mixed = extra is not None or recipe is not None or bool(online)
    recipe = recipe or LoaderRecipe()
    total = training_steps(n + (0 if extra is None else len(extra)), cfg, protocol, steps)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_unet(cfg)
    model.to(device).train()
    opt = make_optimizer(model, cfg)
    loss_fn = DiceLoss(sigmoid=True, batch=cfg.dice_loss == "batch")
    per_epoch = steps_per_epoch(n, cfg.batch_size, cfg.drop_last)
    order = torch.empty(0, dtype=torch.long)
    pooled = data if extra is None or recipe.real_fraction is not None else torch.cat([data, extra])
    real_stream = _Stream(len(pooled), seed, stream=3)
    syn_stream = _Stream(len(extra), seed, stream=4) if extra is not None else None
    b = cfg.batch_size
    for step in range(total):
        n_syn = 0
        if not mixed:
            epoch, j = divmod(step, per_epoch)
            if j == 0:
                order = torch.randperm(n, generator=step_generator(seed, epoch, stream=3))
            batch = data[order[j * b : (j + 1) * b]]
        else:
            if syn_stream is not None and extra is not None and recipe.real_fraction is not None:
                n_syn = b if step < recipe.pretrain_steps else b - round(b * recipe.real_fraction)
            parts = [pooled[real_stream.take(b - n_syn)]] if n_syn < b else []
            if n_syn:
                assert syn_stream is not None and extra is not None
                parts.append(extra[syn_stream.take(n_syn)])
            batch = torch.cat(parts)
            for transform in online:
                batch = transform(batch, seed, step)
        batch = batch.to(device)
        logits = model(batch[:, :1])
        n_real = len(batch) - n_syn
        if n_syn and n_real and recipe.synthetic_weight != 1.0:
            w = recipe.synthetic_weight * n_syn / (n_real + recipe.synthetic_weight * n_syn)
            loss = (1 - w) * loss_fn(logits[:n_real], batch[:n_real, 1:]) + w * loss_fn(
                logits[n_real:], batch[n_real:, 1:]
            )
        else:
            loss = loss_fn(logits, batch[:, 1:])
        if not torch.isfinite(loss):
            raise DHVAEError(f"segmenter training diverged at step {step} (loss {loss.item()})")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        if progress is not None:
            progress(step + 1, total, loss.item())
        if on_step is not None:
            on_step(step + 1, model)
    return model.eval()


@torch.no_grad()
def predict_slices(model: nn.Module, images: np.ndarray | Tensor, batch_size: int = 32) -> np.ndarray:
    """Tumour probabilities for 2D images ``(N, H, W)`` in [0, 1]; returns ``(N, H, W)`` float32."""
    model.eval()
    x = as_tensor(images)
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


LCC_METRICS = ("dice_3d_lcc", "hd95_lcc", "fp_volume_lcc")  # after :func:`largest_component`
VOLUME_METRICS = ("dice_3d", "hd95", "fp_volume", *LCC_METRICS)


def largest_component(pred: np.ndarray) -> np.ndarray:
    """nnU-Net's post-processing of a binary 3D prediction: keep its largest connected component (full
    connectivity), drop the rest. ``(H, W, D)`` bool -> ``(H, W, D)`` bool (a 2D ``(H, W)`` mask alike)."""
    from monai.transforms import KeepLargestConnectedComponent

    keep = KeepLargestConnectedComponent(applied_labels=[1], is_onehot=False)
    return np.asarray(keep(np.asarray(pred, dtype=np.uint8)[None]))[0] > 0


class VolumeCase(Protocol):
    """A test patient: ``image`` ``(H, W, D)`` in [0, 1], ``mask`` ``(H, W, D)`` {0, 1}; ``affine`` optional.

    imaging.preprocess.ResampledCase is one.
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


def ml_per_voxel(case: Any) -> float:
    """The volume of one voxel of ``case`` in ml (1.0 where it has no affine: volumes then count voxels)."""
    spacing = voxel_spacing(case)
    return float(np.prod(spacing)) / 1000.0 if spacing else 1.0


def evaluate_segmenter(
    model: nn.Module,
    cases: Sequence[VolumeCase],
    *,
    threshold: float = 0.5,
    batch_size: int = 32,
    pooled_batch: int = 32,
    volumes: bool = True,
) -> dict[str, Any]:
    """Segment every test volume slice by slice and measure it (``volumes=False``: only the tumour
    slices, and only the slice metrics: what an inner validation needs, without the 3D ones' cost).

    Returns a dict:
        dice_slice     mean soft Dice over all tumour-containing 2D slices of all cases (the paper's metric)
        dice_pooled    soft Dice pooled over batches of ``pooled_batch`` consecutive tumour slices, averaged
                       over batches (the authors' evaluation loop)
        dice_3d        mean over cases of the hard Dice of the thresholded 3D prediction
        hd95           mean over cases of the 95th-percentile Hausdorff distance (mm if affines, else voxels)
        fp_volume      mean over cases of the volume predicted as tumour on the slices without tumour (ml if
                       affines, else voxels): the false positives a 2D U-Net makes on healthy slices
        dice_3d_lcc, hd95_lcc, fp_volume_lcc  the same three after :func:`largest_component`
        n_cases, n_tumour_slices, hd95_unit, threshold
        per_case       [{"case_id", "dice_slice", "tumour_slices", and the 3D metrics above}]
    """
    if not cases:
        raise DHVAEError("no test cases to evaluate")
    slice_scores: list[np.ndarray] = []
    tumour_probs: list[np.ndarray] = []  # (n, H, W) per case, for dice_pooled
    tumour_masks: list[np.ndarray] = []
    per_case: list[dict[str, Any]] = []
    units = {voxel_spacing(c) is None for c in cases}
    for case in cases:
        mask = np.asarray(case.mask) > 0
        tumour = np.flatnonzero(mask.reshape(-1, mask.shape[-1]).any(0))  # axial slices with tumour
        if not volumes:
            probs = predict_slices(model, np.moveaxis(np.asarray(case.image)[..., tumour], -1, 0), batch_size)
            slice_scores.append(soft_dice(probs, np.moveaxis(mask[..., tumour], -1, 0)))
            tumour_probs.append(probs)
            tumour_masks.append(np.moveaxis(mask[..., tumour], -1, 0))
            continue
        prob = segment_volume(model, case.image, batch_size)
        tumour_probs.append(np.moveaxis(prob[..., tumour], -1, 0))
        tumour_masks.append(np.moveaxis(mask[..., tumour], -1, 0))
        scores = soft_dice(tumour_probs[-1], tumour_masks[-1])
        slice_scores.append(scores)
        pred = prob > threshold
        spacing = voxel_spacing(case)
        free = ~mask.reshape(-1, mask.shape[-1]).any(0)  # axial slices without tumour
        voxel = ml_per_voxel(case)
        kept = largest_component(pred)
        per_case.append(
            {
                "case_id": case.case_id,
                "dice_slice": float(scores.mean()) if scores.size else float("nan"),
                "dice_3d": dice_score(pred, mask),
                "hd95": hd95(pred, mask, spacing),
                "fp_volume": int(pred[..., free].sum()) * voxel,
                "dice_3d_lcc": dice_score(kept, mask),
                "hd95_lcc": hd95(kept, mask, spacing),
                "fp_volume_lcc": int(kept[..., free].sum()) * voxel,
                "tumour_slices": int(tumour.size),
            }
        )
    all_scores = np.concatenate(slice_scores)
    if not volumes:
        return {
            "dice_slice": float(all_scores.mean()) if all_scores.size else float("nan"),
            "n_tumour_slices": int(all_scores.size),
        }
    probs, masks = np.concatenate(tumour_probs), np.concatenate(tumour_masks)
    pooled = [
        soft_dice(probs[None, i : i + pooled_batch], masks[None, i : i + pooled_batch])[0]
        for i in range(0, len(probs), pooled_batch)
    ]
    return {
        "dice_slice": float(all_scores.mean()) if all_scores.size else float("nan"),
        "dice_pooled": float(np.mean(pooled)) if pooled else float("nan"),
        **{m: float(np.mean([c[m] for c in per_case])) for m in VOLUME_METRICS},
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


# The U-Net's widths (MONAI UNet channels) by name, as a request names them: "paper" is MONAI's usual 2D layout.
UNET_WIDTHS: dict[str, tuple[int, ...]] = {
    "paper": (16, 32, 64, 128, 256),
    "small": (8, 16, 32, 64, 128),
    "tiny": (4, 8, 16),  # smoke tests
}


def segmenter_config(**overrides: Any) -> SegmenterConfig:
    """SegmenterConfig with some fields replaced (tuples from lists, for JSON requests). ``channels``
    without ``strides`` gets one stride-2 downsampling between consecutive widths."""
    fixed: dict[str, Any] = {
        k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items() if v is not None
    }
    if "channels" in fixed and "strides" not in fixed:
        fixed["strides"] = (2,) * (len(fixed["channels"]) - 1)
    return replace(SegmenterConfig(), **fixed)
