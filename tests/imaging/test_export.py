"""Tests of imaging/export.py: the augmented dataset in nnU-Net v2 raw layout, its manifest, resume."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from imaging.export import (
    DatasetError,
    NnUNetExporter,
    find_dataset_problems,
    grid_affine,
    sanitise_case_id,
    synthetic_case_id,
    verify_dataset,
)
from imaging.files import partial_path
from imaging.journal import completed_synthetic_indices

H, W, D = 8, 6, 5
GRID = np.array(
    [
        [-1.25, 0.0, 0.0, 80.0],
        [0.0, 1.25, 0.0, -100.0],
        [0.0, 0.0, 3.0, -40.0],
        [0.0, 0.0, 0.0, 1.0],
    ]
)


@dataclass
class StandInCase:
    """Duck-typed stand-in for imaging.preprocess.ResampledCase."""

    case_id: str
    image: np.ndarray  # (H, W, D) float32 in [0, 1]
    mask: np.ndarray  # (H, W, D) uint8 {0, 1}
    affine: np.ndarray


def _real_case(case_id: str, seed: int) -> StandInCase:
    rng = np.random.default_rng(seed)
    image = rng.random((H, W, D), dtype=np.float32)
    return StandInCase(case_id, image, (image > 0.7).astype(np.uint8), GRID.copy())


def _synthetic_slice(index: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1000 * index + k)  # seeded per pair and slice, as the generator is
    image = rng.random((H, W), dtype=np.float32)
    return image, (image > 0.5).astype(np.uint8)


def _export(out_dir: Path, n_synthetic: int = 3, slices: int = 2) -> Path:
    exporter = NnUNetExporter(out_dir, channel_name="FLAIR")
    exporter.add_real_case(_real_case("BRATS 001/flair", 1))
    exporter.add_real_case(_real_case("brats_002", 2))
    for index in range(n_synthetic):
        with exporter.open_synthetic(index, n_slices=slices) as pair:
            for k in range(slices):
                pair.write(*_synthetic_slice(index, k))
    return exporter.finalize({"model": {"preset": "tiny"}, "seed": np.int64(7), "n_pairs": n_synthetic})


def _load(path: Path) -> tuple[np.ndarray, nib.Nifti1Image]:
    img = nib.load(path)
    return np.asanyarray(img.dataobj), img


def test_export_layout_volumes_and_json(tmp_path: Path) -> None:
    out = tmp_path / "aug"
    _export(out)

    images = sorted(p.name for p in (out / "imagesTr").iterdir())
    labels = sorted(p.name for p in (out / "labelsTr").iterdir())
    assert images == [
        "BRATS_001_flair_0000.nii.gz",
        "brats_002_0000.nii.gz",
        "synth_00000_0000.nii.gz",
        "synth_00001_0000.nii.gz",
        "synth_00002_0000.nii.gz",
    ]
    assert labels == [name.replace("_0000.nii.gz", ".nii.gz") for name in images]

    for name in images:
        case = name.removesuffix("_0000.nii.gz")
        image, image_nii = _load(out / "imagesTr" / name)
        mask, mask_nii = _load(out / "labelsTr" / f"{case}.nii.gz")
        expected_shape = (H, W, 2) if case.startswith("synth_") else (H, W, D)
        assert image.shape == mask.shape == expected_shape
        assert image.dtype == np.float32 and mask.dtype == np.uint8
        assert set(np.unique(mask).tolist()) <= {0, 1}
        for nii in (image_nii, mask_nii):
            np.testing.assert_allclose(nii.affine, GRID, atol=1e-6)
            np.testing.assert_allclose(nii.header.get_zooms(), (1.25, 1.25, 3.0), rtol=1e-6)

    # the synthetic slices are stored in order, bit for bit
    image, _ = _load(out / "imagesTr" / "synth_00001_0000.nii.gz")
    mask, _ = _load(out / "labelsTr" / "synth_00001.nii.gz")
    np.testing.assert_array_equal(image[:, :, 1], _synthetic_slice(1, 1)[0])
    np.testing.assert_array_equal(mask[:, :, 0], _synthetic_slice(1, 0)[1])
    real, _ = _load(out / "imagesTr" / "brats_002_0000.nii.gz")
    np.testing.assert_array_equal(real, _real_case("brats_002", 2).image)

    dataset = json.loads((out / "dataset.json").read_text())
    assert dataset["numTraining"] == 5
    assert dataset["channel_names"] == {"0": "FLAIR"}
    assert dataset["labels"] == {"background": 0, "tumour": 1}
    assert dataset["file_ending"] == ".nii.gz"
    assert (dataset["real_cases"], dataset["synthetic_cases"]) == (2, 3)

    manifest = verify_dataset(out)
    assert manifest["seed"] == 7 and manifest["model"] == {"preset": "tiny"}
    assert manifest["created_by"].startswith("dhvae-augment ")
    assert manifest["real_case_ids"] == {"BRATS_001_flair": "BRATS 001/flair", "brats_002": "brats_002"}
    assert len(manifest["files"]) == 11  # 5 images + 5 labels + dataset.json
    assert "manifest.json" not in manifest["files"]
    assert not list(out.rglob("*.partial"))


def test_same_inputs_give_byte_identical_datasets(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    _export(a)
    _export(b)
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert files_a == files_b
    for rel in files_a:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel


def test_resume_listing_counts_only_published_pairs(tmp_path: Path) -> None:
    out = tmp_path / "aug"
    exporter = NnUNetExporter(out, grid=GRID, slice_shape=(H, W))
    assert completed_synthetic_indices(out) == []
    for index in (0, 2):
        with exporter.open_synthetic(index) as pair:
            pair.write(*_synthetic_slice(index, 0))

    # index 1 is mid-write (partial files only); index 3 has an image but lost its label
    unfinished = exporter.open_synthetic(1, n_slices=2)
    unfinished.write(*_synthetic_slice(1, 0))
    assert partial_path(out / "labelsTr" / "synth_00001.nii.gz").exists()
    (out / "imagesTr" / "synth_00003_0000.nii.gz").write_bytes(b"")

    assert completed_synthetic_indices(out) == [0, 2]
    unfinished.abort()
    assert completed_synthetic_indices(out) == [0, 2]


def test_interrupted_pair_leaves_no_files(tmp_path: Path) -> None:
    exporter = NnUNetExporter(tmp_path, grid=GRID, slice_shape=(H, W))
    with pytest.raises(RuntimeError, match="cancelled"):
        with exporter.open_synthetic(0, n_slices=3) as pair:
            pair.write(*_synthetic_slice(0, 0))
            raise RuntimeError("cancelled")
    with pytest.raises(ValueError, match="1 of 2 slices"):
        with exporter.open_synthetic(1, n_slices=2) as pair:
            pair.write(*_synthetic_slice(1, 0))
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


def test_finalize_removes_stale_partials_from_a_crashed_run(tmp_path: Path) -> None:
    exporter = NnUNetExporter(tmp_path, grid=GRID, slice_shape=(H, W))
    with exporter.open_synthetic(0) as pair:
        pair.write(*_synthetic_slice(0, 0))
    stale = partial_path(tmp_path / "imagesTr" / "synth_00001_0000.nii.gz")
    stale.write_bytes(b"half a volume")
    exporter.finalize()
    assert not stale.exists()
    verify_dataset(tmp_path)


@pytest.mark.parametrize(
    ("tamper", "message"),
    [
        (lambda out: (out / "labelsTr" / "synth_00001.nii.gz").write_bytes(b"not a volume"), "size"),
        (lambda out: _flip_last_byte(out / "imagesTr" / "brats_002_0000.nii.gz"), "sha256"),
        (lambda out: (out / "imagesTr" / "synth_00000_0000.nii.gz").unlink(), "missing"),
        (lambda out: (out / "labelsTr" / "extra.nii.gz").write_bytes(b""), "not listed"),
        (lambda out: (out / "manifest.json").unlink(), "missing"),
    ],
)
def test_verify_dataset_detects_tampering(tmp_path: Path, tamper, message: str) -> None:
    out = tmp_path / "aug"
    _export(out)
    verify_dataset(out)
    tamper(out)
    assert find_dataset_problems(out)
    with pytest.raises(DatasetError, match=message):
        verify_dataset(out)


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def test_verify_dataset_reports_unpaired_files(tmp_path: Path) -> None:
    out = tmp_path / "aug"
    _export(out, n_synthetic=1, slices=1)
    (out / "labelsTr" / "synth_00000.nii.gz").unlink()
    problems = find_dataset_problems(out)
    assert any("has no label" in p.problem for p in problems)
    with pytest.raises(DatasetError):
        NnUNetExporter(out, grid=GRID, slice_shape=(H, W)).finalize()


@pytest.mark.parametrize(
    ("name", "safe"),
    [
        ("brats_001", "brats_001"),
        ("BRATS 001/flair", "BRATS_001_flair"),
        ("pat.01 (PET)", "pat_01_PET"),
        ("__-x-__", "x"),
        ("???", "case"),
        ("synth_00001", "real_synth_00001"),  # must never collide with generated pairs
    ],
)
def test_sanitise_case_id(name: str, safe: str) -> None:
    assert sanitise_case_id(name) == safe


def test_real_case_ids_are_made_unique(tmp_path: Path) -> None:
    exporter = NnUNetExporter(tmp_path)
    ids = [exporter.add_real_case(_real_case(name, i)) for i, name in enumerate(["a b", "a/b", "A_B"])]
    assert ids == ["a_b", "a_b_2", "A_B_3"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda c: setattr(c, "mask", c.mask * 2), "mask values"),
        (lambda c: c.image.__setitem__((0, 0, 0), np.nan), "NaN"),
        (lambda c: setattr(c, "mask", c.mask[:, :, :2]), "3D shape"),
    ],
)
def test_bad_real_case_is_rejected(tmp_path: Path, change, message: str) -> None:
    case = _real_case("c", 0)
    change(case)
    with pytest.raises(ValueError, match=message):
        NnUNetExporter(tmp_path).add_real_case(case)
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


def test_bad_synthetic_slices_are_rejected(tmp_path: Path) -> None:
    exporter = NnUNetExporter(tmp_path, grid=GRID, slice_shape=(H, W))
    image, mask = _synthetic_slice(0, 0)
    for bad in [(image, mask * 0.5), (image[:-1], mask[:-1]), (image * np.nan, mask)]:
        with pytest.raises(ValueError), exporter.open_synthetic(0) as pair:
            pair.write(*bad)
    assert completed_synthetic_indices(tmp_path) == []


def test_synthetic_grid_needs_real_cases_or_an_explicit_grid(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no grid"):
        NnUNetExporter(tmp_path).open_synthetic(0)


def test_grid_affine_keeps_orientation_and_takes_median_spacing() -> None:
    other = GRID.copy()
    other[:3, :3] *= 2.0  # a case resampled at twice the spacing
    grid = grid_affine([GRID, GRID, other])
    np.testing.assert_allclose(grid, GRID)
    np.testing.assert_allclose(grid_affine([other]), other)


def test_synthetic_case_id_bounds() -> None:
    assert synthetic_case_id(0) == "synth_00000"
    assert synthetic_case_id(99_999) == "synth_99999"
    with pytest.raises(ValueError):
        synthetic_case_id(100_000)


def test_manifest_extras_cannot_overwrite_files(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="files"):
        NnUNetExporter(tmp_path).finalize({"files": {}})


def test_dataset_json_is_a_monai_datalist_too(tmp_path):
    """``monai.data.load_decathlon_datalist`` reads the export's dataset.json (nnU-Net ignores the list),
    and the description says what the dataset holds."""
    from monai.data import load_decathlon_datalist

    exporter = NnUNetExporter(tmp_path, "FLAIR", grid=np.eye(4), slice_shape=(8, 8))
    for index in range(2):
        with exporter.open_synthetic(index, 1) as writer:
            writer.write(np.full((8, 8), 0.5, np.float32), np.eye(8, dtype=np.uint8))
    exporter.finalize()
    items = load_decathlon_datalist(tmp_path / "dataset.json", data_list_key="training", base_dir=tmp_path)
    assert [Path(i["label"]).name for i in items] == ["synth_00000.nii.gz", "synth_00001.nii.gz"]
    assert all(Path(i["image"]).is_file() and Path(i["label"]).is_file() for i in items)
    dataset = json.loads((tmp_path / "dataset.json").read_text())
    assert dataset["description"] == "Synthetic image/mask pairs" and dataset["numTraining"] == 2
    assert verify_dataset(tmp_path)["files"]
