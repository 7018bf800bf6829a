"""Small synthetic cohorts on disk: brain-like MRI or body-like PET volumes with a tumour label map.

Used by ``make demo`` when the shared BraTS data is absent, by the tests, and for PET (no real PET volume
with a tumour mask is available offline). Not a simulator: just plausible enough that ingestion,
preprocessing, training and export see realistic shapes, orientations, intensity ranges and labels.

MRI (FLAIR-like): a head ellipsoid with a grey rim, dark ventricles and a bright, irregular oedema
around an enhancing rim and a necrotic core. Channels ``flair``, ``t1``, ``t1c``; labels 1 necrosis,
2 oedema, 3 enhancing (consecutive, as nnU-Net v2 requires). Axes stored LPS-like (x and y flipped), as
BraTS files are, 240 x 240 x 155 mm field of view.

PET (SUV-like, >= 0): a body ellipse of low uptake (~0.5-1), an unlabelled organ of physiological
uptake, and a hot irregular lesion (SUV ~5-12), label 1, blurred to PET resolution. Channel ``pet``,
4 mm voxels (at the default shape).

Deterministic: the same arguments give the same voxel values.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import nibabel as nib
import numpy as np
import scipy.ndimage as ndi

Modality = Literal["mri", "pet"]
PhantomLayout = Literal["folders", "nnunet", "msd"]

MRI_CHANNELS = ("flair", "t1", "t1c")
MRI_LABELS = {"background": 0, "necrosis": 1, "oedema": 2, "enhancing": 3}
PET_LABELS = {"background": 0, "lesion": 1}

# File names per layout: BraTS-2021 style for MRI folders, HECKTOR style for PET folders.
_FOLDER_NAMES = {"flair": "{case}_flair", "t1": "{case}_t1", "t1c": "{case}_t1ce", "pet": "{case}__PT"}
_FOLDER_LABEL = {"mri": "{case}_seg", "pet": "{case}__gtvt"}
# dataset.json channel names, as people write them.
_NNUNET_NAMES = {"flair": "FLAIR", "t1": "T1", "t1c": "T1c", "pet": "PET"}
_MSD_NAMES = {"flair": "FLAIR", "t1": "T1w", "t1c": "t1gd", "pet": "PET"}


def make_phantom_cohort(
    out_dir: Path,
    n_cases: int = 3,
    shape: tuple[int, int, int] = (96, 96, 48),
    modality: Modality = "mri",
    layout: PhantomLayout = "folders",
    seed: int = 0,
) -> Path:
    """Write a synthetic cohort of ``n_cases`` cases in ``layout`` under ``out_dir``.

    Args:
        out_dir: folder to create (or fill); becomes the cohort root.
        n_cases: number of cases, named ``phantom_000``, ``phantom_001``, ...
        shape: volume shape ``(X, Y, Z)``, voxels; Z is the axial axis.
        modality: ``"mri"`` (channels flair, t1, t1c; labels 1-3) or ``"pet"`` (channel pet; label 1).
        layout: ``"folders"`` (one folder per case), ``"nnunet"`` (nnU-Net v2 raw) or ``"msd"``
            (Decathlon; multi-channel images are one 4D file).
        seed: the cohort's seed; case ``i`` uses the generator seeded with ``(seed, i)``.

    Returns:
        ``out_dir``.
    """
    if modality not in ("mri", "pet"):
        raise ValueError(f"modality must be 'mri' or 'pet', got {modality!r}")
    if layout not in ("folders", "nnunet", "msd"):
        raise ValueError(f"layout must be 'folders', 'nnunet' or 'msd', got {layout!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    channels = MRI_CHANNELS if modality == "mri" else ("pet",)
    labels_map = MRI_LABELS if modality == "mri" else PET_LABELS
    affine = phantom_affine(shape, modality)

    case_ids = [f"phantom_{i:03d}" for i in range(n_cases)]
    for i, case in enumerate(case_ids):
        rng = np.random.default_rng([seed, i])
        volumes, labels = mri_case(shape, rng) if modality == "mri" else pet_case(shape, rng)
        if layout == "folders":
            folder = out_dir / case
            folder.mkdir(exist_ok=True)
            for name in channels:
                _save(volumes[name], affine, folder / (_FOLDER_NAMES[name].format(case=case) + ".nii.gz"))
            _save(labels, affine, folder / (_FOLDER_LABEL[modality].format(case=case) + ".nii.gz"))
            if modality == "mri":  # as in BraTS-derived data: present, and to be ignored by the reader
                brain = (volumes["t1"] > 0).astype(np.uint8)
                _save(brain, affine, folder / "brainmask.nii.gz")
        elif layout == "nnunet":
            (out_dir / "imagesTr").mkdir(exist_ok=True)
            (out_dir / "labelsTr").mkdir(exist_ok=True)
            for c, name in enumerate(channels):
                _save(volumes[name], affine, out_dir / "imagesTr" / f"{case}_{c:04d}.nii.gz")
            _save(labels, affine, out_dir / "labelsTr" / f"{case}.nii.gz")
        else:
            (out_dir / "imagesTr").mkdir(exist_ok=True)
            (out_dir / "labelsTr").mkdir(exist_ok=True)
            stacked = (
                np.stack([volumes[n] for n in channels], axis=-1) if len(channels) > 1 else volumes["pet"]
            )
            _save(stacked, affine, out_dir / "imagesTr" / f"{case}.nii.gz")
            _save(labels, affine, out_dir / "labelsTr" / f"{case}.nii.gz")

    if layout == "nnunet":
        meta: dict[str, object] = {
            "channel_names": {str(c): _NNUNET_NAMES[n] for c, n in enumerate(channels)},
            "labels": labels_map,
            "numTraining": n_cases,
            "file_ending": ".nii.gz",
            "name": f"Phantom{modality.upper()}",
        }
        (out_dir / "dataset.json").write_text(json.dumps(meta, indent=2))
    elif layout == "msd":
        meta = {
            "name": f"Phantom{modality.upper()}",
            "modality": {str(c): _MSD_NAMES[n] for c, n in enumerate(channels)},
            "labels": {str(v): k for k, v in labels_map.items()},
            "numTraining": n_cases,
            "numTest": 0,
            "training": [
                {"image": f"./imagesTr/{c}.nii.gz", "label": f"./labelsTr/{c}.nii.gz"} for c in case_ids
            ],
            "test": [],
        }
        (out_dir / "dataset.json").write_text(json.dumps(meta, indent=2))
    return out_dir


def phantom_affine(shape: tuple[int, int, int], modality: Modality) -> np.ndarray:
    """Voxel -> world (mm) affine of a phantom, centred on the world origin.

    MRI: a 240 x 240 x 155 mm field of view stored with x and y flipped (LPS-like, as BraTS files);
    PET: RAS+, 384 x 384 x 192 mm (4 mm voxels at the default 96 x 96 x 48).
    """
    if modality == "mri":
        spacing = np.array([240.0, 240.0, 155.0]) / np.asarray(shape, dtype=np.float64)
        signs = np.array([-1.0, -1.0, 1.0])
    else:
        spacing = np.array([384.0, 384.0, 192.0]) / np.asarray(shape, dtype=np.float64)
        signs = np.ones(3)
    affine = np.eye(4)
    affine[:3, :3] = np.diag(signs * spacing)
    affine[:3, 3] = -affine[:3, :3] @ ((np.asarray(shape, dtype=np.float64) - 1.0) / 2.0)
    return affine


def _grid(shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Normalised coordinates in [-1, 1] along each axis, broadcastable to ``shape``."""
    x, y, z = (np.linspace(-1.0, 1.0, n, dtype=np.float32) for n in shape)
    return x[:, None, None], y[None, :, None], z[None, None, :]


def _smooth_noise(shape: tuple[int, int, int], rng: np.random.Generator, sigma: float) -> np.ndarray:
    """Gaussian random field of unit standard deviation, correlated over ``sigma`` voxels."""
    field = ndi.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma)
    return field / (field.std() + 1e-8)


def _blob(
    shape: tuple[int, int, int], rng: np.random.Generator, centre: np.ndarray, radii: np.ndarray
) -> np.ndarray:
    """Irregular blob "distance": < 1 inside; an ellipsoid distance perturbed by smooth noise."""
    x, y, z = _grid(shape)
    d = np.sqrt(
        ((x - centre[0]) / radii[0]) ** 2
        + ((y - centre[1]) / radii[1]) ** 2
        + ((z - centre[2]) / radii[2]) ** 2
    )
    return d + 0.25 * _smooth_noise(shape, rng, sigma=max(shape) / 16)


def mri_case(
    shape: tuple[int, int, int], rng: np.random.Generator
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """One brain-like case.

    Returns:
        ``(volumes, labels)``: ``volumes[c]`` float32 ``shape`` for c in flair, t1, t1c (MR-like units,
        background 0); ``labels`` uint8 ``shape`` with 1 necrosis, 2 oedema, 3 enhancing.
    """
    x, y, z = _grid(shape)
    axes = np.array([0.78, 0.88, 0.85]) * rng.uniform(0.95, 1.05, 3)
    head = np.sqrt((x / axes[0]) ** 2 + (y / axes[1]) ** 2 + (z / axes[2]) ** 2)
    brain = head < 1.0
    cortex = brain & (head > 0.85)
    ventricles = (np.sqrt((np.abs(x) - 0.12) ** 2 / 0.08**2 + y**2 / 0.3**2 + z**2 / 0.25**2) < 1.0) & brain

    # Tumour in one hemisphere, away from the edge; sizes in normalised units (about 10 voxels at 96).
    centre = np.array(
        [rng.choice([-1, 1]) * rng.uniform(0.25, 0.4), rng.uniform(-0.3, 0.3), rng.uniform(-0.25, 0.25)]
    )
    radii = np.array([rng.uniform(0.2, 0.28), rng.uniform(0.2, 0.28), rng.uniform(0.25, 0.35)])
    d = _blob(shape, rng, centre, radii)
    labels = np.zeros(shape, dtype=np.uint8)
    labels[(d < 1.0) & brain] = 2  # oedema
    labels[(d < 0.6) & brain] = 3  # enhancing rim
    labels[(d < 0.35) & brain] = 1  # necrotic core

    texture = 0.04 * _smooth_noise(shape, rng, sigma=2.0)
    tissue = {  # (brain, cortex, ventricles, necrosis, oedema, enhancing) intensities per channel
        "flair": (0.55, 0.65, 0.15, 0.6, 1.0, 0.85),
        "t1": (0.7, 0.55, 0.2, 0.25, 0.45, 0.4),
        "t1c": (0.7, 0.55, 0.2, 0.2, 0.45, 1.1),
    }
    volumes: dict[str, np.ndarray] = {}
    for channel, (b, c, v, nec, oed, enh) in tissue.items():
        vol = np.zeros(shape, dtype=np.float32)
        vol[brain] = b
        vol[cortex] = c
        vol[ventricles] = v
        for value, intensity in ((2, oed), (3, enh), (1, nec)):
            vol[labels == value] = intensity
        vol = (vol + texture * brain) * brain
        vol += 0.01 * np.abs(rng.standard_normal(shape)).astype(np.float32)  # Rician-like floor
        volumes[channel] = (1000.0 * vol).astype(np.float32)
    return volumes, labels


def pet_case(
    shape: tuple[int, int, int], rng: np.random.Generator
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """One body-like PET case.

    Returns:
        ``(volumes, labels)``: ``volumes["pet"]`` float32 ``shape`` SUV-like (>= 0); ``labels`` uint8
        ``shape`` with 1 = lesion.
    """
    x, y, z = _grid(shape)
    body = ((x / 0.85) ** 2 + (y / 0.6) ** 2 < 1.0) & (np.abs(z) <= 1.0)
    suv = np.where(body, 0.7 + 0.15 * _smooth_noise(shape, rng, sigma=3.0), 0.0).astype(np.float32)
    organ = np.sqrt(((x - 0.35) / 0.2) ** 2 + ((y + 0.1) / 0.2) ** 2 + ((z - 0.5) / 0.3) ** 2) < 1.0
    suv[organ & body] = rng.uniform(2.5, 4.0)  # physiological uptake, not tumour

    centre = np.array([rng.uniform(-0.35, 0.0), rng.uniform(-0.25, 0.25), rng.uniform(-0.4, 0.2)])
    radii = np.array([rng.uniform(0.15, 0.22), rng.uniform(0.17, 0.25), rng.uniform(0.2, 0.3)])
    d = _blob(shape, rng, centre, radii)
    lesion = (d < 1.0) & body
    peak = rng.uniform(6.0, 12.0)
    suv[lesion] = peak * (1.0 - 0.5 * np.clip(d[lesion], 0.0, 1.0))  # hottest at the centre
    suv = ndi.gaussian_filter(suv, sigma=1.0)  # scanner resolution
    suv *= 1.0 + 0.1 * rng.standard_normal(shape).astype(np.float32)  # count noise
    suv = np.clip(suv, 0.0, None).astype(np.float32)
    return {"pet": suv}, lesion.astype(np.uint8)


def _save(data: np.ndarray, affine: np.ndarray, path: Path) -> None:
    """Write a NIfTI-1 file with both qform and sform set to ``affine`` (scanner space)."""
    image = nib.Nifti1Image(data, affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    nib.save(image, path)
