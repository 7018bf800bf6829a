"""Synthetic phantom cohorts: files per layout, plausible intensities, determinism."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from imaging.cohort import load_case, read_cohort
from imaging.phantoms import make_phantom_cohort, phantom_affine

SHAPE = (24, 24, 12)


@pytest.mark.parametrize(
    ("layout", "modality", "files"),
    [
        ("folders", "mri", ["phantom_000/phantom_000_flair.nii.gz", "phantom_000/phantom_000_t1ce.nii.gz",
                            "phantom_000/phantom_000_seg.nii.gz", "phantom_000/brainmask.nii.gz"]),
        ("folders", "pet", ["phantom_000/phantom_000__PT.nii.gz", "phantom_000/phantom_000__gtvt.nii.gz"]),
        ("nnunet", "mri", ["dataset.json", "imagesTr/phantom_000_0002.nii.gz",
                           "labelsTr/phantom_000.nii.gz"]),
        ("nnunet", "pet", ["dataset.json", "imagesTr/phantom_000_0000.nii.gz",
                           "labelsTr/phantom_000.nii.gz"]),
        ("msd", "mri", ["dataset.json", "imagesTr/phantom_000.nii.gz", "labelsTr/phantom_000.nii.gz"]),
        ("msd", "pet", ["dataset.json", "imagesTr/phantom_000.nii.gz", "labelsTr/phantom_000.nii.gz"]),
    ],
)  # fmt: skip
def test_layout_files(tmp_path: Path, layout: str, modality: str, files: list[str]) -> None:
    root = make_phantom_cohort(tmp_path / "c", 2, SHAPE, modality, layout)  # type: ignore[arg-type]
    for rel in files:
        assert (root / rel).is_file(), rel
    if layout == "msd":
        image = nib.load(root / "imagesTr/phantom_000.nii.gz")
        assert image.shape == (SHAPE + (3,) if modality == "mri" else SHAPE)
        meta = json.loads((root / "dataset.json").read_text())
        assert len(meta["training"]) == 2
    assert len(read_cohort(root).cases) == 2


def test_mri_phantom_looks_like_flair_with_a_bright_multiclass_tumour(tmp_path: Path) -> None:
    case = read_cohort(make_phantom_cohort(tmp_path / "c", 1, (48, 48, 24))).cases[0]
    flair, mask, _ = load_case(case)
    labels = np.asarray(nib.load(case.label_path).dataobj)
    assert set(np.unique(labels)) == {0, 1, 2, 3}
    brain = flair > 100
    assert flair[labels == 2].mean() > 1.4 * flair[brain & (labels == 0)].mean()  # oedema is bright
    assert flair[~brain].max() < 100  # near-zero background
    assert 0.005 < mask.mean() < 0.2


def test_pet_phantom_has_positive_suv_and_a_hot_lesion(tmp_path: Path) -> None:
    case = read_cohort(make_phantom_cohort(tmp_path / "c", 1, (48, 48, 24), "pet")).cases[0]
    suv, mask, _ = load_case(case)
    body = suv > 0.2
    assert suv.min() >= 0.0
    assert np.median(suv[mask == 1]) > 3.0 * np.median(suv[body & (mask == 0)])
    assert set(np.unique(mask)) == {0, 1}


def test_phantoms_are_deterministic_per_seed(tmp_path: Path) -> None:
    def voxels(name: str, seed: int) -> np.ndarray:
        root = make_phantom_cohort(tmp_path / name, 1, SHAPE, seed=seed)
        return np.asarray(nib.load(root / "phantom_000/phantom_000_flair.nii.gz").dataobj)

    np.testing.assert_array_equal(voxels("a", 3), voxels("b", 3))
    assert not np.array_equal(voxels("a", 3), voxels("c", 4))


@pytest.mark.parametrize("modality", ["mri", "pet"])
def test_affine_is_centred_with_sensible_spacing(modality: str) -> None:
    affine = phantom_affine((96, 96, 48), modality)  # type: ignore[arg-type]
    centre = affine @ np.array([47.5, 47.5, 23.5, 1.0])
    np.testing.assert_allclose(centre[:3], 0.0, atol=1e-9)
    spacing = np.abs(np.diag(affine)[:3])
    expected = [2.5, 2.5, 155 / 48] if modality == "mri" else [4.0, 4.0, 4.0]
    np.testing.assert_allclose(spacing, expected)


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="modality"):
        make_phantom_cohort(tmp_path, modality="ct")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="layout"):
        make_phantom_cohort(tmp_path, layout="zip")  # type: ignore[arg-type]
