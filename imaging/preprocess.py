"""From validated 3D cases to the 2D training slices of the dHVAE (method.md, "Data").

Per case (:func:`resample_case`):

1. reorient to the closest canonical (RAS+) orientation, so that array axis 2 is the axial axis
   (the authors' ``nibabel.processing.resample_to_output`` also returns RAS+ data);
2. resample the image to ``shape`` (default 128 x 128 x 64) by trilinear interpolation; resample the mask
   the same way as a float and re-binarise it at 0.5;
3. normalise the image to [0, 1]: per axial slice min-max (MRI; a constant slice becomes zeros, which
   also handles the negative constant background of z-scored BraTS volumes), or, for PET, clip to
   volume-wise percentiles and scale.

Over the cohort (:func:`preprocess_cohort`): keep the axial slices that contain tumour, drop those whose
tumour area is under the floor (200 px at 128 x 128), and balance the rest by tumour area
(:func:`balance_by_area`). The result is cached on disk, keyed by the input files' contents, the settings
and this code, so a second call returns at once.

This module imports numpy, scipy and nibabel only (no torch): the API server runs it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import nibabel as nib
import numpy as np
import scipy
import scipy.ndimage as ndi

from .cohort import Cohort, CohortSpec, load_case
from .errors import CohortError, Problem
from .files import atomic_file, sha256_file

log = logging.getLogger(__name__)

#: In-plane size at which the paper's pixel counts (200 px floor, 25 px bins) are defined.
REFERENCE_INPLANE = (128, 128)


@dataclass(frozen=True)
class PreprocessConfig:
    """How volumes become training slices.

    Attributes:
        shape: resampled grid ``(H, W, D)`` = (X, Y, axial slices), voxels. Paper: 128 x 128 x 64.
        normalisation: ``"minmax"``: per axial slice min-max to [0, 1] (paper, MRI);
            ``"pet_percentile"``: clip the volume to ``pet_percentiles`` and scale to [0, 1].
        pet_percentiles: lower and upper percentiles (0-100) for ``"pet_percentile"``.
        canonical: reorient to RAS+ first so that slices are axial whatever the file's orientation.
        mask_threshold: a resampled (float) mask voxel is tumour when >= this value.
        area_floor_px: smallest tumour area of a kept slice, pixels at 128 x 128 (paper: 200); scaled by
            ``H * W / 128**2`` for other in-plane sizes.
        area_bin_px: width of the tumour-area bins, pixels at 128 x 128 (paper code: 25); scaled likewise.
        balance: cap the number of slices per area bin (paper); ``False`` keeps every slice over the floor.
        cap_per_bin: most slices kept per bin; ``None`` uses the authors' rule
            ``max(1, n_cases * D // n_bins)`` (their ``n_samples * D // len(bins)``), which spreads a
            budget of one volume's worth of slices per case evenly over the bins.
        seed: seed of the (deterministic) choice of slices inside an over-full bin.
        min_tumour_slices: a case with fewer axial tumour slices after resampling gets a warning.
    """

    shape: tuple[int, int, int] = (128, 128, 64)
    normalisation: Literal["minmax", "pet_percentile"] = "minmax"
    pet_percentiles: tuple[float, float] = (0.5, 99.5)
    canonical: bool = True
    mask_threshold: float = 0.5
    area_floor_px: float = 200.0
    area_bin_px: float = 25.0
    balance: bool = True
    cap_per_bin: int | None = None
    seed: int = 0
    min_tumour_slices: int = 3

    def __post_init__(self) -> None:
        if len(self.shape) != 3 or min(self.shape) < 1:
            raise ValueError(f"shape must be three positive sizes (H, W, D), got {self.shape}")
        if self.normalisation not in ("minmax", "pet_percentile"):
            raise ValueError(
                f"normalisation must be 'minmax' or 'pet_percentile', got {self.normalisation!r}"
            )
        lo, hi = self.pet_percentiles
        if not 0.0 <= lo < hi <= 100.0:
            raise ValueError(
                f"pet_percentiles must satisfy 0 <= low < high <= 100, got {self.pet_percentiles}"
            )
        if self.area_bin_px <= 0 or self.area_floor_px < 0:
            raise ValueError("area_bin_px must be > 0 and area_floor_px >= 0")
        if self.cap_per_bin is not None and self.cap_per_bin < 1:
            raise ValueError(f"cap_per_bin must be >= 1 or None, got {self.cap_per_bin}")

    @property
    def area_scale(self) -> float:
        """Pixel-count scale of this in-plane size relative to 128 x 128."""
        return self.shape[0] * self.shape[1] / (REFERENCE_INPLANE[0] * REFERENCE_INPLANE[1])

    @property
    def floor_px(self) -> float:
        """Tumour-area floor at this in-plane size, pixels."""
        return self.area_floor_px * self.area_scale

    @property
    def bin_px(self) -> float:
        """Tumour-area bin width at this in-plane size, pixels."""
        return self.area_bin_px * self.area_scale


@dataclass
class ResampledCase:
    """One case on the resampled grid, as the exporter writes it.

    Attributes:
        case_id: the case's identifier in the cohort.
        image: float32 ``(H, W, D)`` in [0, 1] (normalised as configured).
        mask: uint8 ``(H, W, D)`` in {0, 1}.
        affine: float64 ``(4, 4)`` voxel -> world (mm) of the resampled grid; overlays the original.
    """

    case_id: str
    image: np.ndarray
    mask: np.ndarray
    affine: np.ndarray


@dataclass
class SliceSet:
    """The training slices of a cohort.

    Attributes:
        slices: float32 ``(N, 2, H, W)`` in [0, 1]: channel 0 the image, channel 1 the binary mask;
            the balanced slices, ordered by (case, slice index).
        case_ids: case of each slice, length N.
        slice_index: axial index (array axis 2 of the resampled volume) of each slice, length N.
        cases: every case on the resampled grid, sorted by id.
        tumour_slices: number of axial slices with any tumour, over all cases, before floor and balancing.
        config: the settings used.
        warnings: non-fatal findings of preprocessing (e.g. a case with few tumour slices); the cohort's
            own warnings are in ``Cohort.warnings``.
        cap_per_bin: the cap actually applied (``0`` when balancing is off).
    """

    slices: np.ndarray
    case_ids: list[str]
    slice_index: list[int]
    cases: list[ResampledCase]
    tumour_slices: int
    config: PreprocessConfig
    warnings: list[str] = field(default_factory=list)
    cap_per_bin: int = 0


# --------------------------------------------------------------------------------------------------
# Geometry


def grid_transform(old_shape: tuple[int, ...], new_shape: tuple[int, ...]) -> np.ndarray:
    """Homogeneous ``(4, 4)`` map from a voxel index of the new grid to a (continuous) index of the old.

    Both grids cover the same field of view: voxel ``i`` of the new grid spans
    ``[i * s, (i + 1) * s)`` in old voxel widths, with ``s = old / new``, so its centre is at old index
    ``(i + 0.5) * s - 0.5 = s * i + (s - 1) / 2`` (the ``align_corners=False`` convention).
    """
    scale = np.asarray(old_shape[:3], dtype=np.float64) / np.asarray(new_shape[:3], dtype=np.float64)
    transform = np.eye(4)
    transform[:3, :3] = np.diag(scale)
    transform[:3, 3] = (scale - 1.0) / 2.0
    return transform


def resample_affine(affine: np.ndarray, old_shape: tuple[int, ...], new_shape: tuple[int, ...]) -> np.ndarray:
    """Voxel -> world affine of the resampled grid: voxel sizes scaled by ``old / new``, origin moved so
    the field of view (and hence the world position of every structure) is unchanged."""
    return np.asarray(affine, dtype=np.float64) @ grid_transform(old_shape, new_shape)


def resample_volume(volume: np.ndarray, new_shape: tuple[int, int, int]) -> np.ndarray:
    """Trilinear resampling of a 3D array onto a grid of ``new_shape`` covering the same field of view.

    Args:
        volume: ``(X, Y, Z)`` array.
        new_shape: ``(H, W, D)``.

    Returns:
        float32 ``(H, W, D)``. Outside the old voxel centres the edge value is repeated (``mode="nearest"``),
        so the border is not darkened. As in the authors' code, no anti-aliasing is applied before
        downsampling.
    """
    transform = grid_transform(volume.shape, new_shape)
    return ndi.affine_transform(
        volume.astype(np.float32, copy=False),
        np.diag(transform[:3, :3]),  # a diagonal matrix given as a vector: the fast path of scipy
        offset=transform[:3, 3],
        output_shape=tuple(new_shape),
        order=1,
        mode="nearest",
    )


def to_canonical(
    image: np.ndarray, mask: np.ndarray, affine: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Flip / permute the array axes to the closest RAS+ orientation (no interpolation).

    Returns:
        ``(image, mask, affine)`` with the affine updated so that every voxel keeps its world position.
    """
    orientation = nib.orientations.io_orientation(affine)
    if np.array_equal(orientation, [[0, 1], [1, 1], [2, 1]]):
        return image, mask, affine
    new_affine = affine @ nib.orientations.inv_ornt_aff(orientation, image.shape)
    image = np.ascontiguousarray(nib.orientations.apply_orientation(image, orientation))
    mask = np.ascontiguousarray(nib.orientations.apply_orientation(mask, orientation))
    return image, mask, new_affine


# --------------------------------------------------------------------------------------------------
# Intensities


def normalise_minmax_per_slice(volume: np.ndarray, eps: float = 1e-8) -> np.ndarray:
    """Min-max of each axial slice ``volume[:, :, k]`` to [0, 1]; a constant slice becomes zeros.

    Args:
        volume: float ``(H, W, D)``.

    Returns:
        float32 ``(H, W, D)`` in [0, 1].
    """
    volume = volume.astype(np.float32, copy=False)
    lo = volume.min(axis=(0, 1), keepdims=True)
    span = volume.max(axis=(0, 1), keepdims=True) - lo
    constant = span <= eps
    out = (volume - lo) / np.where(constant, 1.0, span)
    out[:, :, constant[0, 0]] = 0.0
    return np.clip(out, 0.0, 1.0).astype(np.float32, copy=False)


def normalise_pet_percentile(
    volume: np.ndarray, percentiles: tuple[float, float] = (0.5, 99.5)
) -> np.ndarray:
    """Clip a PET volume (e.g. SUV) to its own percentiles and scale to [0, 1].

    Robust to a few very hot voxels (bladder, brain) that would squash a plain min-max. A constant volume
    becomes zeros.

    Args:
        volume: float ``(H, W, D)``.
        percentiles: ``(low, high)`` in percent.

    Returns:
        float32 ``(H, W, D)`` in [0, 1].
    """
    lo, hi = np.percentile(volume, percentiles)
    if not hi > lo:
        return np.zeros(volume.shape, dtype=np.float32)
    return ((np.clip(volume, lo, hi) - lo) / (hi - lo)).astype(np.float32)


def resample_case(
    case_id: str, image: np.ndarray, mask: np.ndarray, affine: np.ndarray, cfg: PreprocessConfig
) -> ResampledCase:
    """Reorient, resample and normalise one case.

    Args:
        image: float ``(X, Y, Z)``, any units.
        mask: ``(X, Y, Z)`` in {0, 1}.
        affine: ``(4, 4)`` voxel -> world (mm).

    Returns:
        The case on the ``cfg.shape`` grid: image in [0, 1], mask re-binarised at ``cfg.mask_threshold``.
    """
    if cfg.canonical:
        image, mask, affine = to_canonical(image, mask, affine)
    old_shape = image.shape
    image_r = resample_volume(image, cfg.shape)
    mask_r = (resample_volume(mask.astype(np.float32), cfg.shape) >= cfg.mask_threshold).astype(np.uint8)
    if cfg.normalisation == "minmax":
        image_r = normalise_minmax_per_slice(image_r)
    else:
        image_r = normalise_pet_percentile(image_r, cfg.pet_percentiles)
    return ResampledCase(case_id, image_r, mask_r, resample_affine(affine, old_shape, cfg.shape))


# --------------------------------------------------------------------------------------------------
# Balancing


def balance_by_area(
    areas: np.ndarray, *, floor: float, bin_width: float, cap: int | None, n_cases: int, depth: int, seed: int
) -> tuple[np.ndarray, int]:
    """Choose slices so that no tumour-area bin dominates (the authors' balancing, made deterministic).

    Bins are ``[floor + k * bin_width, floor + (k + 1) * bin_width)``, k = 0, 1, ... up to the largest
    area (the authors' code drops its top bin; here it is kept). Slices with area < ``floor`` are dropped.
    A bin holding more than ``cap`` slices keeps ``cap`` of them, chosen by a seeded permutation (the
    authors keep the first ones, which favours the first cases in the list).

    Args:
        areas: ``(N,)`` tumour area of each candidate slice, pixels, in a stable order.
        floor: smallest kept area, pixels.
        bin_width: bin width, pixels.
        cap: most slices per bin; ``None``: ``max(1, n_cases * depth // n_bins)`` (authors' rule).
        n_cases, depth: number of cases and slices per volume (for the default cap).
        seed: seed of the choice inside an over-full bin.

    Returns:
        ``(indices, cap)``: sorted indices into ``areas`` of the kept slices, and the cap applied.
    """
    areas = np.asarray(areas, dtype=np.float64)
    eligible = np.flatnonzero(areas >= floor)
    if eligible.size == 0:
        return eligible, cap or 0
    bins = np.floor((areas[eligible] - floor) / bin_width).astype(np.int64)
    n_bins = int(bins.max()) + 1
    cap_used = cap if cap is not None else max(1, (n_cases * depth) // n_bins)
    rng = np.random.default_rng(seed)
    kept: list[np.ndarray] = []
    for b in range(n_bins):
        members = eligible[bins == b]
        if members.size > cap_used:
            members = np.sort(rng.permutation(members)[:cap_used])
        kept.append(members)
    return np.sort(np.concatenate(kept)), cap_used


# --------------------------------------------------------------------------------------------------
# The cohort -> slices pipeline, cached


def preprocess_cohort(
    cohort: Cohort,
    spec: CohortSpec | None = None,
    cfg: PreprocessConfig | None = None,
    cache_dir: Path | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> SliceSet:
    """Load, validate, resample and slice every case of a cohort; balance the tumour slices.

    Args:
        cohort: from :func:`imaging.cohort.read_cohort`.
        spec: label rule and limits (the one the cohort was read with); default ``CohortSpec()``.
        cfg: preprocessing settings; default ``PreprocessConfig()``.
        cache_dir: where results are stored (``slices-<sha256>.npz``); ``None`` disables the cache.
        progress: called as ``progress(done_cases, total_cases)`` after each case (not on a cache hit).

    Returns:
        The slice set; identical for identical inputs, settings and code.

    Raises:
        CohortError: every voxel-level problem of every case, or no slice reaching the area floor.
    """
    spec = spec or CohortSpec()
    cfg = cfg or PreprocessConfig()
    cache_path: Path | None = None
    if cache_dir is not None:
        cache_path = Path(cache_dir) / f"slices-{cache_key(cohort, spec, cfg)}.npz"
        cached = _load_cache(cache_path, cfg)
        if cached is not None:
            log.info("preprocessing: cache hit %s", cache_path.name)
            return cached

    start = time.perf_counter()
    problems: list[Problem] = []
    warnings: list[str] = []
    resampled: list[ResampledCase] = []
    for done, case in enumerate(cohort.cases, start=1):
        try:
            image, mask, affine = load_case(case, spec)
            resampled.append(resample_case(case.case_id, image, mask, affine, cfg))
        except CohortError as exc:
            problems += exc.problems  # keep going: the user wants the whole list at once
        if progress is not None:
            progress(done, len(cohort.cases))
    if problems:
        raise CohortError(problems)

    result = _slice_and_balance(resampled, cfg, warnings)
    log.info(
        "preprocessing: %d cases, %d tumour slices, %d kept in %.1f s",
        len(resampled),
        result.tumour_slices,
        len(result.case_ids),
        time.perf_counter() - start,
    )
    if cache_path is not None:
        _save_cache(cache_path, result)
    return result


def restrict_to_cases(slices: SliceSet, case_ids: Sequence[str]) -> SliceSet:
    """The slice set of some of a cohort's cases only, re-balanced on those cases alone.

    For a patient-level split: what a generator trained on the training patients sees must not depend
    on the test patients, not even through the balancing cap.
    """
    wanted = set(case_ids)
    cases = [c for c in slices.cases if c.case_id in wanted]
    if len(cases) != len(wanted):
        missing = sorted(wanted - {c.case_id for c in slices.cases})
        raise ValueError(f"cases not in the slice set: {missing}")
    return _slice_and_balance(cases, slices.config, [])


def _slice_and_balance(
    resampled: list[ResampledCase], cfg: PreprocessConfig, warnings: list[str]
) -> SliceSet:
    owners: list[int] = []
    indices: list[int] = []
    areas: list[int] = []
    tumour_slices = 0
    for i, case in enumerate(resampled):
        per_slice = case.mask.sum(axis=(0, 1), dtype=np.int64)  # (D,) tumour pixels of each axial slice
        with_tumour = np.flatnonzero(per_slice > 0)
        tumour_slices += with_tumour.size
        if with_tumour.size < cfg.min_tumour_slices:
            warnings.append(
                f"{case.case_id}: only {with_tumour.size} axial slice(s) with tumour after resampling "
                f"to {cfg.shape}"
            )
        owners += [i] * with_tumour.size
        indices += with_tumour.tolist()
        areas += per_slice[with_tumour].tolist()

    if cfg.balance:
        keep, cap = balance_by_area(
            np.asarray(areas),
            floor=cfg.floor_px,
            bin_width=cfg.bin_px,
            cap=cfg.cap_per_bin,
            n_cases=len(resampled),
            depth=cfg.shape[2],
            seed=cfg.seed,
        )
    else:
        keep, cap = np.flatnonzero(np.asarray(areas, dtype=np.float64) >= cfg.floor_px), 0
    if keep.size == 0:
        raise CohortError(
            [
                Problem(
                    ".",
                    f"no axial slice has a tumour area of at least {cfg.floor_px:g} px at "
                    f"{cfg.shape[0]}x{cfg.shape[1]} ({tumour_slices} slices have smaller tumours)",
                )
            ]
        )

    height, width = cfg.shape[:2]
    slices = np.empty((keep.size, 2, height, width), dtype=np.float32)
    for row, j in enumerate(keep):
        case, k = resampled[owners[j]], indices[j]
        slices[row, 0] = case.image[:, :, k]
        slices[row, 1] = case.mask[:, :, k]
    return SliceSet(
        slices=slices,
        case_ids=[resampled[owners[j]].case_id for j in keep],
        slice_index=[indices[j] for j in keep],
        cases=resampled,
        tumour_slices=tumour_slices,
        config=cfg,
        warnings=warnings,
        cap_per_bin=cap,
    )


def code_version() -> str:
    """sha256 of the source of this module and of the cohort reader, plus the numeric libraries'
    versions: any change to how slices are made invalidates the cache."""
    digest = hashlib.sha256()
    for module_file in (Path(__file__), Path(__file__).with_name("cohort.py")):
        digest.update(module_file.read_bytes())
    digest.update(f"numpy {np.__version__} scipy {scipy.__version__} nibabel {nib.__version__}".encode())
    return digest.hexdigest()


def cache_key(cohort: Cohort, spec: CohortSpec, cfg: PreprocessConfig) -> str:
    """sha256 of everything the slices depend on: every used file's contents (not its path or mtime, so
    a re-uploaded cohort hits the cache), the case ids, the settings and the code version."""
    payload = {
        "code": code_version(),
        "spec": asdict(spec),
        "cfg": asdict(cfg),
        "channel": cohort.channel,
        "cases": [
            [c.case_id, c.image_index, sha256_file(c.image_path), sha256_file(c.label_path)]
            for c in cohort.cases
        ],
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def _save_cache(path: Path, result: SliceSet) -> None:
    """Write the slice set as a plain ``.npz`` (no pickled objects), atomically (temp file + rename)."""
    arrays: dict[str, np.ndarray] = {
        "slices": result.slices,
        "case_ids": np.asarray(result.case_ids, dtype=np.str_),
        "slice_index": np.asarray(result.slice_index, dtype=np.int64),
        "tumour_slices": np.asarray(result.tumour_slices, dtype=np.int64),
        "cap_per_bin": np.asarray(result.cap_per_bin, dtype=np.int64),
        "warnings": np.asarray(result.warnings, dtype=np.str_),
        "resampled_ids": np.asarray([c.case_id for c in result.cases], dtype=np.str_),
    }
    for i, case in enumerate(result.cases):
        arrays[f"image_{i}"], arrays[f"mask_{i}"], arrays[f"affine_{i}"] = case.image, case.mask, case.affine
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as f:
        np.savez(f, allow_pickle=False, **arrays)


def _load_cache(path: Path, cfg: PreprocessConfig) -> SliceSet | None:
    """The cached slice set, or ``None`` when absent or unreadable (then it is recomputed)."""
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            ids = [str(s) for s in data["resampled_ids"]]
            cases = [
                ResampledCase(case_id, data[f"image_{i}"], data[f"mask_{i}"], data[f"affine_{i}"])
                for i, case_id in enumerate(ids)
            ]
            return SliceSet(
                slices=data["slices"],
                case_ids=[str(s) for s in data["case_ids"]],
                slice_index=[int(k) for k in data["slice_index"]],
                cases=cases,
                tumour_slices=int(data["tumour_slices"]),
                config=cfg,
                warnings=[str(w) for w in data["warnings"]],
                cap_per_bin=int(data["cap_per_bin"]),
            )
    except (OSError, KeyError, ValueError) as exc:
        log.warning("preprocessing cache %s unreadable (%s); recomputing", path, exc)
        return None


def otsu_threshold(image: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of ``image`` (the one that maximises the between-class variance)."""
    values = np.asarray(image, np.float64).ravel()
    lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        return lo
    hist, edges = np.histogram(values, bins=bins, range=(lo, hi))
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres) / np.maximum(w0, 1)
    m1 = ((hist * centres).sum() - np.cumsum(hist * centres)) / np.maximum(w1, 1)
    between = w0 * w1 * (m0 - m1) ** 2
    return float(centres[int(np.argmax(between[:-1]))])


def zero_background(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """A synthetic slice put on the real cases' intensity convention: 0 outside the brain.

    The real cases are skull-stripped, so their background is exactly 0 after min-max normalisation;
    a generator's background is a low, noisy grey instead (0.05-0.6 for the ``small`` dHVAE), which
    nnU-Net's cropping and intensity statistics would treat as tissue. The brain is the largest
    connected component above Otsu's threshold, its holes filled, joined with the tumour mask (a tumour
    always stays on tissue); everything else is set to 0. Returns a new float32 ``(H, W)`` array.
    """
    from scipy import ndimage

    img = np.asarray(image, np.float32)
    fg = img > otsu_threshold(img)
    labels, n = ndimage.label(fg)
    if n > 1:
        sizes = ndimage.sum(fg, labels, index=np.arange(1, n + 1))
        fg = labels == 1 + int(np.argmax(sizes))
    brain = ndimage.binary_fill_holes(fg | (np.asarray(mask) > 0))
    return np.where(brain, img, 0.0).astype(np.float32)
