"""Tests of imaging/nifti.py: the streaming, atomic, deterministic .nii.gz writer."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from imaging.nifti import StreamingNiftiWriter, partial_path, write_volume

# an oblique-ish, anisotropic, LPS-flipped affine: catches axis-order and qform/sform mistakes
AFFINE = np.array(
    [
        [-1.5, 0.0, 0.0, 90.0],
        [0.0, 1.2, 0.0, -110.0],
        [0.0, 0.0, 2.5, -60.0],
        [0.0, 0.0, 0.0, 1.0],
    ]
)


def _volume(shape: tuple[int, int, int] = (7, 5, 4), seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random(shape, dtype=np.float32)


@pytest.mark.parametrize(
    ("dtype", "make"),
    [
        (np.float32, lambda v: v),
        (np.uint8, lambda v: (v > 0.5).astype(np.uint8)),
        (np.uint8, lambda v: v > 0.5),  # bool masks are stored as uint8 {0, 1}
        (np.float32, lambda v: v.astype(np.float64)),  # float64 input cast down to the declared type
    ],
)
def test_round_trip_with_nibabel(tmp_path: Path, dtype: type, make) -> None:
    data = make(_volume())
    path = write_volume(tmp_path / "v.nii.gz", data, AFFINE, dtype)

    img = nib.load(path)
    loaded = np.asanyarray(img.dataobj)
    assert loaded.dtype == np.dtype(dtype)
    assert loaded.shape == data.shape
    np.testing.assert_array_equal(loaded, np.asarray(data).astype(dtype))
    np.testing.assert_allclose(img.affine, AFFINE, atol=1e-6)
    np.testing.assert_allclose(img.header.get_zooms(), (1.5, 1.2, 2.5), rtol=1e-6)
    assert img.header.get_xyzt_units()[0] == "mm"
    assert int(img.header["sform_code"]) == 1 and int(img.header["qform_code"]) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.nii.gz"]


def test_same_data_gives_identical_bytes(tmp_path: Path) -> None:
    data = _volume()
    a = write_volume(tmp_path / "a.nii.gz", data, AFFINE, np.float32)
    b = write_volume(tmp_path / "b.nii.gz", data, AFFINE, np.float32)  # different name, same bytes
    assert a.read_bytes() == b.read_bytes()
    c = write_volume(tmp_path / "c.nii.gz", data + 1e-3, AFFINE, np.float32)
    assert c.read_bytes() != a.read_bytes()


def test_exception_inside_block_removes_partial_file(tmp_path: Path) -> None:
    path = tmp_path / "v.nii.gz"
    with pytest.raises(RuntimeError, match="boom"):
        with StreamingNiftiWriter(path, (4, 3, 2), np.float32, AFFINE) as writer:
            writer.write_slice(np.zeros((4, 3)))
            assert partial_path(path).exists()
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_missing_slices_is_an_error_and_publishes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "v.nii.gz"
    writer = StreamingNiftiWriter(path, (4, 3, 3), np.float32, AFFINE)
    writer.write_slice(np.zeros((4, 3)))
    with pytest.raises(ValueError, match="1 of 3 slices"):
        writer.close()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("dtype", "bad_slice", "message"),
    [
        (np.float32, np.zeros((3, 4)), "shape"),  # transposed
        (np.float32, np.zeros((4, 3, 1)), "shape"),
        (np.uint8, np.full((4, 3), 0.7), "cannot hold exactly"),  # would silently truncate to 0
        (np.uint8, np.full((4, 3), 300), "cannot hold exactly"),
    ],
)
def test_bad_slice_raises_and_leaves_no_file(tmp_path: Path, dtype: type, bad_slice, message: str) -> None:
    path = tmp_path / "v.nii.gz"
    with pytest.raises(ValueError, match=message):
        with StreamingNiftiWriter(path, (4, 3, 2), dtype, AFFINE) as writer:
            writer.write_slice(bad_slice)
    assert list(tmp_path.iterdir()) == []


def test_too_many_slices_raises(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="already written"):
        with StreamingNiftiWriter(tmp_path / "v.nii.gz", (4, 3, 1), np.float32, AFFINE) as writer:
            writer.write_slice(np.zeros((4, 3)))
            writer.write_slice(np.zeros((4, 3)))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("shape", "affine"),
    [((4, 3), AFFINE), ((4, 0, 2), AFFINE), ((4, 3, 2), np.eye(3)), ((4, 3, 2), np.full((4, 4), np.nan))],
)
def test_bad_geometry_is_rejected_before_any_file_is_created(tmp_path: Path, shape, affine) -> None:
    with pytest.raises(ValueError):
        StreamingNiftiWriter(tmp_path / "v.nii.gz", shape, np.float32, affine)
    assert list(tmp_path.iterdir()) == []


def _peak_traced_bytes_while_streaming(path: Path, base: np.ndarray, nz: int) -> int:
    tracemalloc.start()
    try:
        with StreamingNiftiWriter(path, (*base.shape, nz), np.float32, np.eye(4)) as writer:
            for k in range(nz):
                writer.write_slice(base * (k / nz))  # a fresh slice each time, as a generator would give
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.slow  # seconds of training or of a large volume: CI runs it (make test)
def test_memory_does_not_grow_with_the_volume(tmp_path: Path) -> None:
    nx, ny, nz = 256, 256, 400  # 100 MiB of float32 if it were held in memory
    slice_bytes = nx * ny * 4
    base = np.linspace(0.0, 1.0, nx * ny, dtype=np.float32).reshape(nx, ny)

    peak_short = _peak_traced_bytes_while_streaming(tmp_path / "short.nii.gz", base, nz // 10)
    peak_long = _peak_traced_bytes_while_streaming(tmp_path / "long.nii.gz", base, nz)

    # the caller's slice + zlib's fixed state (~256 KiB at level 6) + one 64 KiB chunk
    assert peak_long < 4 * slice_bytes, f"peak {peak_long / 2**20:.2f} MiB for a 100 MiB volume"
    assert peak_long < peak_short + 64 * 1024, "peak memory grew with the number of slices"
    img = nib.load(tmp_path / "long.nii.gz")
    assert img.shape == (nx, ny, nz)
    np.testing.assert_array_equal(np.asanyarray(img.dataobj[:, :, 123]), base * (123 / nz))
