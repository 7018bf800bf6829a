"""Cohort reading: the three layouts, channel and label choice, and every rejected input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from imaging.cohort import (
    CohortSpec,
    canonical_channel,
    load_case,
    read_cohort,
)
from imaging.errors import CohortError
from imaging.phantoms import make_phantom_cohort
from imaging.preprocess import PreprocessConfig, preprocess_cohort

SHAPE = (24, 24, 12)  # tiny phantoms: each fixture is written in a few milliseconds
SMALL = PreprocessConfig(shape=(32, 32, 16))


def phantom(tmp_path: Path, layout: str = "folders", modality: str = "mri", n_cases: int = 2) -> Path:
    return make_phantom_cohort(
        tmp_path / "cohort", n_cases=n_cases, shape=SHAPE, modality=modality, layout=layout
    )


def save(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> None:
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), path)


def problems_of(root: Path, spec: CohortSpec | None = None) -> list[tuple[str, str]]:
    """Run both validation passes (headers, then voxels via preprocessing); the problems raised."""
    spec = spec or CohortSpec()
    with pytest.raises(CohortError) as info:
        preprocess_cohort(read_cohort(root, spec), spec, SMALL)
    return [(p.file, p.problem) for p in info.value.problems]


# ------------------------------------------------------------------------------------------ layouts


@pytest.mark.parametrize("layout", ["folders", "nnunet", "msd"])
def test_each_layout_reads_the_same_cases(tmp_path: Path, layout: str) -> None:
    cohort = read_cohort(phantom(tmp_path, layout))
    assert cohort.layout == layout
    assert [c.case_id for c in cohort.cases] == ["phantom_000", "phantom_001"]
    assert set(cohort.channels) == {"flair", "t1", "t1c"}
    assert cohort.channel == "flair"
    assert cohort.warnings == []  # brainmask.nii.gz of the folders layout is skipped silently
    image, mask, affine = load_case(cohort.cases[0])
    assert image.shape == mask.shape == SHAPE and image.dtype == np.float32 and mask.dtype == np.uint8
    assert set(np.unique(mask)) == {0, 1} and affine.shape == (4, 4)


@pytest.mark.parametrize("layout", ["folders", "nnunet", "msd"])
def test_layouts_give_identical_voxels(tmp_path: Path, layout: str) -> None:
    reference = load_case(read_cohort(make_phantom_cohort(tmp_path / "ref", 1, SHAPE)).cases[0])
    other = load_case(read_cohort(make_phantom_cohort(tmp_path / "x", 1, SHAPE, layout=layout)).cases[0])
    for a, b in zip(reference, other, strict=True):
        np.testing.assert_array_equal(a, b)


def test_lone_wrapper_folder_is_descended_and_paths_stay_relative_to_the_given_root(tmp_path: Path) -> None:
    make_phantom_cohort(tmp_path / "upload" / "my_cohort", 2, SHAPE)
    cohort = read_cohort(tmp_path / "upload")
    assert cohort.root == tmp_path / "upload" / "my_cohort" and len(cohort.cases) == 2
    (tmp_path / "upload" / "my_cohort" / "phantom_001" / "phantom_001_seg.nii.gz").unlink()
    with pytest.raises(CohortError) as info:
        read_cohort(tmp_path / "upload")
    assert info.value.problems[0].file == "my_cohort/phantom_001"


def test_a_folder_holding_one_case_directly_is_a_one_case_cohort(tmp_path: Path) -> None:
    root = phantom(tmp_path, n_cases=1) / "phantom_000"
    cohort = read_cohort(root)
    assert [c.case_id for c in cohort.cases] == ["phantom_000"]


# ------------------------------------------------------------------------------- channels, labels


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("Flair_subtrMeanDivStd.nii.gz", "flair"),
        ("T1c_subtrMeanDivStd.nii.gz", "t1c"),
        ("BraTS2021_00000_t1ce.nii.gz", "t1c"),
        ("BraTS2021_00000_t1.nii.gz", "t1"),
        ("sub-01_T1w.nii.gz", "t1"),
        ("t2_flair.nii.gz", "flair"),
        ("T2.nii", "t2"),
        ("CHUM-001__PT.nii.gz", "pet"),
        ("CHUM-001__CT.nii.gz", "ct"),
        ("OTMultiClass.nii.gz", "label"),
        ("BraTS2021_00000_seg.nii.gz", "label"),
        ("CHUM-001__gtvt.nii.gz", "label"),
        ("brainmask.nii.gz", "ignored"),
        ("License_CC_BY_NC_SA_3.0.txt", "ignored"),
        ("notes.nii.gz", "unknown"),
    ],
)
def test_file_names_are_recognised(tmp_path: Path, name: str, expected: str) -> None:
    from imaging.cohort import _is_ignored, _is_label_name, _match_channel, _strip_nifti_suffix

    spec = CohortSpec()
    stem = _strip_nifti_suffix(name)
    if _is_ignored(name, spec):
        found = "ignored"
    elif _is_label_name(stem, spec):
        found = "label"
    else:
        found = _match_channel(stem, spec) or "unknown"
    assert found == expected


@pytest.mark.parametrize(
    ("name", "canonical"), [("FLAIR", "flair"), ("t1gd", "t1c"), ("T2w", "t2"), ("DWI", "dwi")]
)
def test_dataset_json_channel_names_are_canonicalised(name: str, canonical: str) -> None:
    assert canonical_channel(name) == canonical


@pytest.mark.parametrize(
    ("layout", "channel", "file_part", "index"),
    [
        ("folders", "t1", "_t1.nii.gz", None),
        ("folders", "T1C", "_t1ce.nii.gz", None),
        ("nnunet", "t1", "_0001.nii.gz", None),
        ("nnunet", "t1c", "_0002.nii.gz", None),
        ("msd", "t1c", "phantom_000.nii.gz", 2),
        ("msd", "flair", "phantom_000.nii.gz", 0),
    ],
)
def test_channel_pick(tmp_path: Path, layout: str, channel: str, file_part: str, index: int | None) -> None:
    case = read_cohort(phantom(tmp_path, layout), CohortSpec(channel=channel)).cases[0]
    assert case.image_path.name.endswith(file_part) and case.image_index == index


@pytest.mark.parametrize("layout", ["folders", "nnunet", "msd"])
def test_single_channel_cohort_uses_its_only_channel(tmp_path: Path, layout: str) -> None:
    cohort = read_cohort(phantom(tmp_path, layout, modality="pet"))
    assert cohort.channel == "pet" and cohort.channels == ["pet"]
    assert any("only channel 'pet'" in w for w in cohort.warnings)


def test_absent_channel_of_a_multichannel_cohort_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(CohortError) as info:
        read_cohort(phantom(tmp_path), CohortSpec(channel="t2"))
    assert "'t2' not found" in info.value.problems[0].problem and "flair" in info.value.problems[0].problem


@pytest.mark.parametrize(
    ("rule", "values"), [("whole", (1, 2, 3)), ("labels:1,3", (1, 3)), ("labels: 2", (2,))]
)
def test_label_rule(tmp_path: Path, rule: str, values: tuple[int, ...]) -> None:
    spec = CohortSpec(label_rule=rule)
    case = read_cohort(phantom(tmp_path), spec).cases[0]
    _, mask, _ = load_case(case, spec)
    labels = np.asarray(nib.load(case.label_path).dataobj)
    np.testing.assert_array_equal(mask, np.isin(labels, values))


@pytest.mark.parametrize("rule", ["labels:", "labels:a,b", "tumour", "labels:0,1"])
def test_malformed_label_rule_is_rejected(rule: str) -> None:
    with pytest.raises(CohortError) as info:
        CohortSpec(label_rule=rule)
    assert info.value.problems[0].file == "label_rule"


def test_unrecognised_files_are_warned_about(tmp_path: Path) -> None:
    root = phantom(tmp_path)
    save(root / "phantom_000" / "notes.nii.gz", np.zeros((8, 8, 8), np.float32))
    cohort = read_cohort(root)
    assert cohort.warnings == [
        "phantom_000: ignored notes.nii.gz (no modality or label name pattern matches)"
    ]


# ----------------------------------------------------------------------------------- bad inputs

C0 = "phantom_000"
FLAIR, SEG = f"{C0}/{C0}_flair.nii.gz", f"{C0}/{C0}_seg.nii.gz"


def _rewrite(
    rel: str, fn: Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]
) -> Callable[[Path], None]:
    """A mutation that rewrites one file as ``(data, affine) = fn(data, affine)``."""

    def mutate(root: Path) -> None:
        img = nib.load(root / rel)
        data, affine = fn(np.asarray(img.dataobj), img.affine)
        save(root / rel, data, affine)

    return mutate


def _replace_bytes(rel: str, content: bytes, new_name: str | None = None) -> Callable[[Path], None]:
    def mutate(root: Path) -> None:
        (root / rel).unlink()
        (root / (new_name or rel)).write_bytes(content)

    return mutate


def _truncate(rel: str) -> Callable[[Path], None]:
    def mutate(root: Path) -> None:
        raw = (root / rel).read_bytes()
        (root / rel).write_bytes(raw[: len(raw) // 2])

    return mutate


def _set(
    value: float, where: tuple[int, int, int] = (12, 12, 6)
) -> Callable[[np.ndarray, np.ndarray], tuple]:
    def fn(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        data = data.astype(np.float32)
        data[where] = value
        return data, affine

    return fn


def _huge_header(root: Path) -> None:
    """A 352-byte .nii claiming 30000^3 float32 voxels (100 TB): only a header-first check survives it."""
    header = nib.Nifti1Header()
    header.set_data_dtype(np.float32)
    header.set_data_shape((30000, 30000, 30000))
    (root / FLAIR).unlink()
    (root / f"{C0}/{C0}_flair.nii").write_bytes(header.binaryblock + b"\0" * 4)


def _delete(rel: str) -> Callable[[Path], None]:
    return lambda root: (root / rel).unlink()


BAD_INPUTS = [
    # (id, mutation, spec, file named, words in the problem)
    ("garbage", _replace_bytes(FLAIR, b"this is not a nifti file"), None, FLAIR, "unreadable"),
    (
        "not-nifti",
        _replace_bytes(FLAIR, b"ObjectType = Image", f"{C0}/{C0}_flair.mha"),
        None,
        f"{C0}/{C0}_flair.mha",
        "not a NIfTI",
    ),
    ("truncated", _truncate(FLAIR), None, FLAIR, "unreadable voxel data"),
    ("shape", _rewrite(SEG, lambda d, a: (d[:-2], a)), None, SEG, "shape (22, 24, 12) differs"),
    (
        "affine",
        _rewrite(SEG, lambda d, a: (d, a + np.pad(np.ones((3, 1)) * 5, ((0, 1), (3, 0))))),
        None,
        SEG,
        "affine differs",
    ),
    ("4d", _rewrite(FLAIR, lambda d, a: (np.stack([d, d], -1), a)), None, FLAIR, "expected a 3D volume"),
    ("2d", _rewrite(SEG, lambda d, a: (d[:, :, 0], a)), None, SEG, "expected a 3D volume"),
    ("nan", _rewrite(FLAIR, _set(np.nan)), None, FLAIR, "1 non-finite voxels"),
    ("inf", _rewrite(FLAIR, _set(np.inf)), None, FLAIR, "non-finite"),
    ("non-integer", _rewrite(SEG, _set(0.5)), None, SEG, "non-integer label values (e.g. 0.5)"),
    ("negative", _rewrite(SEG, _set(-1)), None, SEG, "negative label"),
    ("empty", _rewrite(SEG, lambda d, a: (np.zeros_like(d), a)), None, SEG, "mask is empty"),
    (
        "empty-rule",
        lambda root: None,
        CohortSpec(label_rule="labels:4"),
        SEG,
        "empty under the label rule label in {4}",
    ),
    ("huge-dims", _huge_header, None, f"{C0}/{C0}_flair.nii", "absurd dimensions"),
    (
        "too-many-voxels",
        _rewrite(FLAIR, lambda d, a: (d, a)),
        CohortSpec(max_voxels=1000),
        FLAIR,
        "exceed the limit",
    ),
    ("tiny-inplane", _rewrite(FLAIR, lambda d, a: (d[:4, :4], a)), None, FLAIR, "in-plane size below 8"),
    ("missing-channel", _delete(FLAIR), None, C0, "missing channel: no file for 'flair'"),
    ("missing-label", _delete(SEG), None, C0, "has no label file"),
    (
        "two-labels",
        lambda root: shutil.copy(root / SEG, root / C0 / "OTMultiClass.nii.gz"),
        None,
        C0,
        "ambiguous",
    ),
]


@pytest.mark.parametrize(
    ("mutate", "spec", "file", "words"), [b[1:] for b in BAD_INPUTS], ids=[b[0] for b in BAD_INPUTS]
)
def test_bad_input_is_rejected_naming_the_file(
    tmp_path: Path, mutate: Callable[[Path], None], spec: CohortSpec | None, file: str, words: str
) -> None:
    root = phantom(tmp_path)
    mutate(root)
    problems = problems_of(root, spec)
    assert any(f == file and words in p for f, p in problems), problems
    if spec is None:  # (a stricter spec applies to both cases)
        assert all(f.startswith(C0) for f, _ in problems), "the healthy case must not be blamed"


def test_all_problems_are_collected_before_raising(tmp_path: Path) -> None:
    root = phantom(tmp_path, n_cases=3)
    _rewrite(FLAIR, _set(np.nan))(root)
    _rewrite("phantom_002/phantom_002_seg.nii.gz", _set(0.5))(root)
    _rewrite("phantom_001/phantom_001_seg.nii.gz", lambda d, a: (d[:-1], a))(root)
    # The header pass already reports the shape problem alone ...
    with pytest.raises(CohortError) as info:
        read_cohort(root)
    assert [p.file for p in info.value.problems] == ["phantom_001/phantom_001_seg.nii.gz"]
    # ... and once it is fixed, both voxel problems come together.
    _rewrite("phantom_001/phantom_001_seg.nii.gz", lambda d, a: (np.pad(d, ((0, 1), (0, 0), (0, 0))), a))(
        root
    )
    assert {f for f, _ in problems_of(root)} == {FLAIR, "phantom_002/phantom_002_seg.nii.gz"}


def test_absurd_header_is_rejected_without_reading_voxels(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = phantom(tmp_path)
    _huge_header(root)
    assert (root / f"{C0}/{C0}_flair.nii").stat().st_size == 352  # there are no voxels to read

    def no_voxels(*args: object, **kwargs: object) -> None:
        raise AssertionError("voxel data was read")

    monkeypatch.setattr(nib.arrayproxy.ArrayProxy, "__array__", no_voxels)
    monkeypatch.setattr(nib.arrayproxy.ArrayProxy, "__getitem__", no_voxels)
    with pytest.raises(CohortError) as info:
        read_cohort(root)
    assert "absurd dimensions (30000, 30000, 30000)" in info.value.problems[0].problem


@pytest.mark.parametrize(
    ("layout", "mutate", "file", "words"),
    [
        (
            "nnunet",
            _delete("labelsTr/phantom_000.nii.gz"),
            "labelsTr/phantom_000.nii.gz",
            "has no label file",
        ),
        (
            "nnunet",
            _delete("imagesTr/phantom_000_0000.nii.gz"),
            "imagesTr/phantom_000_0000.nii.gz",
            "no file for channel 'flair'",
        ),
        ("nnunet", lambda r: (r / "dataset.json").write_text("{not json"), "dataset.json", "unreadable JSON"),
        (
            "nnunet",
            lambda r: (r / "dataset.json").write_text(
                json.dumps({"channel_names": {"0": "FLAIR"}, "labels": {}, "file_ending": ".mha"})
            ),
            "dataset.json",
            "not NIfTI",
        ),
        ("nnunet", _delete("dataset.json"), "dataset.json", "missing"),
        (
            "msd",
            _delete("labelsTr/phantom_001.nii.gz"),
            "labelsTr/phantom_001.nii.gz",
            "listed in dataset.json",
        ),
        (
            "msd",
            _rewrite("imagesTr/phantom_000.nii.gz", lambda d, a: (d[..., :2], a)),
            "imagesTr/phantom_000.nii.gz",
            "has 2 channels on its last axis, dataset.json names 3",
        ),
        (
            "msd",
            _rewrite("labelsTr/phantom_000.nii.gz", lambda d, a: (np.stack([d, d], -1), a)),
            "labelsTr/phantom_000.nii.gz",
            "expected a 3D volume",
        ),
    ],
)
def test_bad_nnunet_and_msd_inputs(
    tmp_path: Path, layout: str, mutate: Callable[[Path], None], file: str, words: str
) -> None:
    root = phantom(tmp_path, layout)
    mutate(root)
    with pytest.raises(CohortError) as info:
        read_cohort(root)
    assert any(p.file == file and words in p.problem for p in info.value.problems), info.value.problems


def test_no_cases(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(CohortError, match="no cases found"):
        read_cohort(tmp_path / "empty")
    with pytest.raises(CohortError, match="is not a folder"):
        read_cohort(tmp_path / "nowhere")


def test_a_folder_of_splits_asks_for_one_split(tmp_path: Path) -> None:
    for split in ("train", "test"):
        make_phantom_cohort(tmp_path / "data" / split, 1, SHAPE)
    with pytest.raises(CohortError) as info:
        read_cohort(tmp_path / "data")
    assert "test, train hold no files" in info.value.problems[0].problem


def test_cohort_modules_do_not_import_torch() -> None:
    code = (
        "import sys, imaging.cohort, imaging.preprocess, imaging.phantoms; sys.exit('torch' in sys.modules)"
    )
    root = Path(__file__).parents[2]
    assert subprocess.run([sys.executable, "-c", code], cwd=root).returncode == 0


def test_fold_training_patients():
    from imaging.cohort import fold_training_patients

    assert fold_training_patients(6, 3) == 4 and fold_training_patients(7, 3) == 4
    assert fold_training_patients(3, 5) == 0  # fewer patients than folds: no fold at all
