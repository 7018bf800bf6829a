"""Preprocessing: geometry of the resampled grid, normalisation, balancing, determinism and the cache."""

from __future__ import annotations

import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from imaging import preprocess
from imaging.cohort import CohortSpec, read_cohort
from imaging.errors import CohortError
from imaging.phantoms import make_phantom_cohort
from imaging.preprocess import (
    PreprocessConfig,
    balance_by_area,
    grid_transform,
    normalise_minmax_per_slice,
    normalise_pet_percentile,
    preprocess_cohort,
    resample_affine,
    resample_case,
    resample_volume,
)

SHAPE = (24, 24, 12)
SMALL = PreprocessConfig(shape=(32, 32, 16))
BRATS_TRAIN = Path(__file__).parents[2].parent / "shared/data/brats2015-deepmedic/train"


def world(affine: np.ndarray, index: np.ndarray) -> np.ndarray:
    return affine[:3, :3] @ index + affine[:3, 3]


# ----------------------------------------------------------------------------------------- geometry


def test_resampled_affine_keeps_the_volume_centre_and_field_of_view() -> None:
    rotation, _ = np.linalg.qr(np.random.default_rng(0).standard_normal((3, 3)))
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([0.9, 1.1, 2.5])
    affine[:3, 3] = [-120.0, 17.0, 33.0]
    old, new = (240, 240, 155), (128, 128, 64)
    new_affine = resample_affine(affine, old, new)
    centre = lambda shape: (np.asarray(shape) - 1) / 2.0  # noqa: E731
    np.testing.assert_allclose(world(new_affine, centre(new)), world(affine, centre(old)), atol=1e-9)
    # the outer corner of the first voxel (index -0.5) is the same point: same field of view
    np.testing.assert_allclose(
        world(new_affine, -0.5 * np.ones(3)), world(affine, -0.5 * np.ones(3)), atol=1e-9
    )
    # voxel sizes scale by old / new
    np.testing.assert_allclose(
        np.linalg.norm(new_affine[:3, :3], axis=0), [0.9 * 240 / 128, 1.1 * 240 / 128, 2.5 * 155 / 64]
    )


def test_resampling_a_linear_ramp_follows_the_grid_transform() -> None:
    ramp = np.broadcast_to(np.arange(40, dtype=np.float32)[:, None, None], (40, 10, 10)).copy()
    out = resample_volume(ramp, (16, 10, 10))
    expected = (
        grid_transform((40, 10, 10), (16, 10, 10))[0, 0] * np.arange(16)
        + grid_transform((40, 10, 10), (16, 10, 10))[0, 3]
    )
    np.testing.assert_allclose(out[:, 5, 5], expected, atol=1e-5)  # linear interpolation is exact on a ramp


def test_resampled_tumour_overlays_the_original(tmp_path: Path) -> None:
    """The tumour's centre of mass, in world mm, survives reorientation + resampling (exporter overlay)."""
    cohort = read_cohort(make_phantom_cohort(tmp_path / "c", 1, (40, 36, 20)))  # LPS-like affine
    image = nib.load(cohort.cases[0].image_path)
    mask = (np.asarray(nib.load(cohort.cases[0].label_path).dataobj) > 0).astype(np.uint8)
    out = resample_case(
        "x", np.asarray(image.dataobj), mask, image.affine, PreprocessConfig(shape=(64, 64, 32))
    )
    before = world(image.affine, np.argwhere(mask).mean(axis=0))
    after = world(out.affine, np.argwhere(out.mask).mean(axis=0))
    np.testing.assert_allclose(after, before, atol=2.0)  # within a voxel (6 mm x 6.7 mm x 7.75 mm)
    assert np.all(np.diag(out.affine)[:3] > 0), "reoriented to RAS+"


# -------------------------------------------------------------------------------------- intensities


def test_minmax_per_slice_handles_negative_background_and_constant_slices() -> None:
    volume = np.full((16, 16, 3), -1.7, dtype=np.float32)  # z-scored BraTS: constant negative background
    volume[4:12, 4:12, 0] = np.linspace(-0.5, 3.0, 64).reshape(8, 8)
    out = normalise_minmax_per_slice(volume)
    assert out[0, 0, 0] == 0.0 and out[:, :, 0].max() == 1.0
    assert np.all(out[:, :, 1:] == 0.0)  # constant slices -> zeros


def test_pet_percentile_normalisation_is_in_unit_interval(tmp_path: Path) -> None:
    cfg = PreprocessConfig(shape=(32, 32, 16), normalisation="pet_percentile")
    result = preprocess_cohort(read_cohort(make_phantom_cohort(tmp_path / "c", 2, SHAPE, "pet")), None, cfg)
    assert result.slices.min() >= 0.0 and result.slices.max() <= 1.0
    for case in result.cases:
        assert case.image.min() == 0.0 and case.image.max() == 1.0
    hot = np.zeros(1000, dtype=np.float32)
    hot[0] = 1e6  # one absurdly hot voxel does not squash the rest
    assert normalise_pet_percentile(hot + np.linspace(0, 1, 1000, dtype=np.float32))[500] > 0.4


# ---------------------------------------------------------------------------------------- balancing


def test_balancing_respects_floor_and_cap_and_is_deterministic() -> None:
    rng = np.random.default_rng(1)
    areas = np.concatenate([rng.integers(0, 200, 50), rng.integers(200, 225, 40), rng.integers(225, 600, 30)])
    keep, cap = balance_by_area(areas, floor=200, bin_width=25, cap=5, n_cases=2, depth=64, seed=0)
    assert cap == 5 and np.all(areas[keep] >= 200)
    counts = np.bincount(((areas[keep] - 200) // 25).astype(int))
    assert counts.max() <= 5 and counts[0] == 5
    full = np.bincount(((areas[areas >= 200] - 200) // 25).astype(int))
    np.testing.assert_array_equal(counts, np.minimum(full, 5))  # bins under the cap keep everything
    again, _ = balance_by_area(areas, floor=200, bin_width=25, cap=5, n_cases=2, depth=64, seed=0)
    np.testing.assert_array_equal(keep, again)
    assert list(keep) == sorted(keep)


def test_default_cap_is_the_authors_rule() -> None:
    areas = np.array([200] * 50 + [299])  # 4 bins: [200, 225), ..., [275, 300)
    _, cap = balance_by_area(areas, floor=200, bin_width=25, cap=None, n_cases=2, depth=16, seed=0)
    assert cap == 2 * 16 // 4


def test_floor_scales_with_in_plane_size() -> None:
    assert PreprocessConfig().floor_px == 200.0
    assert PreprocessConfig(shape=(64, 64, 32)).floor_px == 50.0
    assert PreprocessConfig(shape=(256, 256, 64)).bin_px == 100.0


def test_preprocessed_slices_obey_floor_and_cap(tmp_path: Path) -> None:
    cohort = read_cohort(make_phantom_cohort(tmp_path / "c", 3, SHAPE))
    result = preprocess_cohort(cohort, None, PreprocessConfig(shape=(32, 32, 16), cap_per_bin=2))
    n, channels, h, w = result.slices.shape
    assert (channels, h, w) == (2, 32, 32) and n == len(result.case_ids) == len(result.slice_index) > 0
    areas = result.slices[:, 1].sum(axis=(1, 2))
    assert np.all(areas >= SMALL.floor_px)
    assert np.bincount(((areas - SMALL.floor_px) // SMALL.bin_px).astype(int)).max() <= 2
    assert result.tumour_slices >= n and result.cap_per_bin == 2
    assert set(np.unique(result.slices[:, 1])) <= {0.0, 1.0}
    for row in range(n):  # each slice is the stated slice of the stated case
        case = next(c for c in result.cases if c.case_id == result.case_ids[row])
        np.testing.assert_array_equal(result.slices[row, 0], case.image[:, :, result.slice_index[row]])


def test_few_tumour_slices_warn_and_no_slice_over_the_floor_fails(tmp_path: Path) -> None:
    root = tmp_path / "c" / "case_a"
    root.mkdir(parents=True)
    image = np.random.default_rng(0).random((32, 32, 16)).astype(np.float32)
    labels = np.zeros((32, 32, 16), dtype=np.uint8)
    labels[4:24, 4:24, 7:9] = 1  # 400 px on two slices
    nib.save(nib.Nifti1Image(image, np.eye(4)), root / "flair.nii.gz")
    nib.save(nib.Nifti1Image(labels, np.eye(4)), root / "seg.nii.gz")
    cohort = read_cohort(tmp_path / "c")
    result = preprocess_cohort(
        cohort, None, PreprocessConfig(shape=(32, 32, 16), cap_per_bin=4)
    )  # identity grid
    assert result.slice_index == [7, 8] and result.tumour_slices == 2
    assert result.warnings == ["case_a: only 2 axial slice(s) with tumour after resampling to (32, 32, 16)"]
    with pytest.raises(CohortError, match="no axial slice has a tumour area of at least 500"):
        preprocess_cohort(cohort, None, PreprocessConfig(shape=(32, 32, 16), area_floor_px=8000))


# ------------------------------------------------------------------------------ determinism, cache


def test_preprocessing_is_deterministic(tmp_path: Path) -> None:
    cohort = read_cohort(make_phantom_cohort(tmp_path / "c", 2, SHAPE))
    a, b = preprocess_cohort(cohort, None, SMALL), preprocess_cohort(cohort, None, SMALL)
    np.testing.assert_array_equal(a.slices, b.slices)
    assert a.case_ids == b.case_ids and a.slice_index == b.slice_index


def test_second_call_is_served_from_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cohort = read_cohort(make_phantom_cohort(tmp_path / "c", 2, SHAPE))
    first = preprocess_cohort(cohort, None, SMALL, tmp_path / "cache")
    assert len(list((tmp_path / "cache").glob("slices-*.npz"))) == 1

    def boom(*args: object, **kwargs: object) -> None:
        raise AssertionError("recomputed despite the cache")

    monkeypatch.setattr(preprocess, "resample_volume", boom)
    monkeypatch.setattr(preprocess, "load_case", boom)
    second = preprocess_cohort(cohort, None, SMALL, tmp_path / "cache")
    np.testing.assert_array_equal(first.slices, second.slices)
    assert (first.case_ids, first.slice_index, first.tumour_slices) == (
        second.case_ids,
        second.slice_index,
        second.tumour_slices,
    )
    for a, b in zip(first.cases, second.cases, strict=True):
        assert a.case_id == b.case_id
        np.testing.assert_array_equal(a.image, b.image)
        np.testing.assert_array_equal(a.mask, b.mask)
        np.testing.assert_array_equal(a.affine, b.affine)
    # other settings, other label rule, or other file contents: a different key, so work is redone
    for spec, cfg in [
        (None, PreprocessConfig(shape=(32, 32, 16), seed=1)),
        (CohortSpec(label_rule="labels:2"), SMALL),
    ]:
        with pytest.raises(AssertionError, match="recomputed"):
            preprocess_cohort(cohort, spec, cfg, tmp_path / "cache")
    label = cohort.cases[0].label_path
    nib.save(nib.Nifti1Image(np.asarray(nib.load(label).dataobj)[::-1].copy(), nib.load(label).affine), label)
    with pytest.raises(AssertionError, match="recomputed"):
        preprocess_cohort(cohort, None, SMALL, tmp_path / "cache")


def test_corrupt_cache_file_is_recomputed(tmp_path: Path) -> None:
    cohort = read_cohort(make_phantom_cohort(tmp_path / "c", 1, SHAPE))
    first = preprocess_cohort(cohort, None, SMALL, tmp_path / "cache")
    (cache_file,) = (tmp_path / "cache").glob("slices-*.npz")
    cache_file.write_bytes(b"garbage")
    np.testing.assert_array_equal(
        preprocess_cohort(cohort, None, SMALL, tmp_path / "cache").slices, first.slices
    )


# ------------------------------------------------------------------------------------------ real data


@pytest.mark.slow
@pytest.mark.skipif(not BRATS_TRAIN.is_dir(), reason="../shared/data/brats2015-deepmedic is absent")
def test_brats_training_cases(tmp_path: Path) -> None:
    cohort = read_cohort(BRATS_TRAIN)
    assert cohort.layout == "folders" and len(cohort.cases) == 2 and cohort.channel == "flair"
    assert all(c.image_path.name == "Flair_subtrMeanDivStd.nii.gz" for c in cohort.cases)
    assert all(c.label_path.name == "OTMultiClass.nii.gz" for c in cohort.cases)
    start = time.perf_counter()
    result = preprocess_cohort(cohort, None, None, tmp_path / "cache")
    cold = time.perf_counter() - start
    start = time.perf_counter()
    cached = preprocess_cohort(cohort, None, None, tmp_path / "cache")
    warm = time.perf_counter() - start
    assert result.tumour_slices > 0 and result.slices.ndim == 4 and result.slices.shape[1:] == (2, 128, 128)
    assert result.slices.min() >= 0.0 and result.slices.max() <= 1.0
    assert [c.image.shape for c in result.cases] == [(128, 128, 64)] * 2
    np.testing.assert_array_equal(result.slices, cached.slices)
    assert warm < cold


def test_zero_background_keeps_the_brain_and_the_tumour():
    from imaging.preprocess import zero_background

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:64, :64]
    brain = (yy - 32) ** 2 + (xx - 32) ** 2 < 20**2
    img = np.where(brain, 0.6, 0.08) + rng.normal(0, 0.02, (64, 64))
    img[30:34, 30:34] = 0.1  # a dark spot inside the brain is a hole, filled: kept
    mask = np.zeros((64, 64), np.uint8)
    mask[10:14, 30:34] = 1  # a tumour on the brain's edge stays on tissue
    out = zero_background(img.astype(np.float32), mask)
    assert (out[~brain & (mask == 0)] == 0).mean() > 0.99
    assert np.array_equal(out[brain], img.astype(np.float32)[brain])
    assert (out[mask > 0] > 0).all()
