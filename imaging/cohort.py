"""Reading a user's cohort of 3D volumes and tumour label maps, and checking it before any work is done.

A cohort is a set of *cases* (patients). Each case gives one 3D image of the chosen channel (FLAIR for
MRI, PET, ...) and one 3D integer label map. Three on-disk layouts are understood:

``nnunet``  nnU-Net v2 raw: ``dataset.json`` (``channel_names``, ``labels``, ``file_ending``),
            ``imagesTr/CASE_XXXX.nii.gz`` (XXXX = channel index), ``labelsTr/CASE.nii.gz``.
``msd``     Medical Segmentation Decathlon: ``dataset.json`` with a ``training`` list of
            ``{"image", "label"}`` paths and a ``modality`` dict naming the channels; a multi-channel
            image is one 4D file whose last axis is the channel.
``folders`` One folder per case, one file per modality plus a label file, recognised by name
            (BraTS style: ``Flair_subtrMeanDivStd.nii.gz``, ``T1c_...``, ``OTMultiClass.nii.gz``).

The layout is detected from the folder. A single folder wrapping the cohort (a zip extracted with one
top-level directory) is descended into.

Validation happens in two passes, each collecting *every* problem before raising one
:class:`~imaging.errors.CohortError`:

1. :func:`read_cohort` reads file names and NIfTI headers only (fast, bounded memory): unknown layout,
   missing label or channel, non-NIfTI or unreadable files, wrong dimensionality, absurd dimensions
   (checked before any voxel is read), image/label shape or affine mismatch.
2. :func:`load_case` reads the voxels of one case: non-finite values, non-integer or negative labels,
   a mask that is empty under the chosen label rule.

This module imports numpy and nibabel only (no torch): the API server validates uploads with it.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import nibabel as nib
import numpy as np

from .errors import CohortError, Problem

log = logging.getLogger(__name__)

Layout = Literal["nnunet", "msd", "folders"]

# A name token is delimited by anything that is not a letter or a digit ("_", "-", ".", start, end),
# so that "t1" matches "T1.nii.gz" and "pat_t1_x" but not "T1c" or "t1ce".
_B = r"(?<![a-z0-9])"
_E = r"(?![a-z0-9])"

#: Channel name -> regular expressions searched (case-insensitively) in a file name without its
#: ``.nii``/``.nii.gz`` suffix. Order matters: the first channel whose pattern matches wins, so
#: ``t2_flair`` is FLAIR, not T2.
DEFAULT_CHANNEL_PATTERNS: dict[str, tuple[str, ...]] = {
    "flair": (r"flair",),
    "t1c": (rf"{_B}t1[-_]?(?:c|ce|gd|post|contrast){_E}",),
    "t1": (rf"{_B}t1w?{_E}",),
    "t2": (rf"{_B}t2w?{_E}",),
    "pet": (rf"{_B}(?:pet|pt|suv){_E}",),
    "ct": (rf"{_B}ct{_E}",),
}

#: Label-map file names (checked before the channel patterns, so ``flair_seg`` is a label).
DEFAULT_LABEL_PATTERNS: tuple[str, ...] = (
    rf"{_B}(?:seg|segmentation|label|labels|gt|truth|groundtruth|ground_truth){_E}",
    r"otmulticlass",
    rf"{_B}ot{_E}",
    rf"{_B}gtv[a-z]*{_E}",
    rf"{_B}(?:tumou?r|lesion)[-_]?mask{_E}",
)

#: Files skipped silently: hidden files, macOS zip debris, brain masks (neither a label nor a channel
#: to model), licences and documentation.
DEFAULT_IGNORE_PATTERNS: tuple[str, ...] = (
    r"^\.",
    r"^__macosx$",
    r"brain[-_]?mask",
    r"licen[cs]e",
    r"readme",
    r"\.(?:txt|md|json|csv|tsv|pdf|html?|ya?ml|py)$",
)

_NIFTI_SUFFIXES = (".nii.gz", ".nii")


@dataclass
class CohortSpec:
    """What to read from a cohort and the limits that make an input absurd.

    Attributes:
        channel: channel to model, case-insensitive (``"flair"``, ``"t1c"``, ``"pet"``, or a channel
            name from ``dataset.json`` that no pattern knows, lower-cased). A cohort with a single channel
            uses that channel whatever is asked (a warning says so).
        label_rule: ``"whole"`` (whole tumour, label > 0) or ``"labels:1,4"`` (mask = label in {1, 4}).
        channel_patterns: channel -> regexes matched against file names (``folders`` layout) and against
            the channel names of ``dataset.json`` (other layouts).
        label_patterns: regexes recognising the label-map file of a case folder.
        ignore_patterns: regexes of files that are silently skipped in a case folder.
        max_dim: largest accepted size of any axis, voxels.
        max_voxels: largest accepted number of voxels of one 3D volume.
        min_inplane: smallest accepted size of the two in-plane axes (0 and 1), voxels.
        affine_tol_mm: largest accepted difference between the image and label affines, mm (per entry).
    """

    channel: str = "flair"
    label_rule: str = "whole"
    channel_patterns: dict[str, tuple[str, ...]] = field(
        default_factory=lambda: dict(DEFAULT_CHANNEL_PATTERNS)
    )
    label_patterns: tuple[str, ...] = DEFAULT_LABEL_PATTERNS
    ignore_patterns: tuple[str, ...] = DEFAULT_IGNORE_PATTERNS
    max_dim: int = 2048
    max_voxels: int = 512**3
    min_inplane: int = 8
    affine_tol_mm: float = 1e-3

    def __post_init__(self) -> None:
        self.channel = self.channel.strip().lower()
        self.label_values()  # fail now on a malformed rule, not after minutes of reading

    def label_values(self) -> tuple[int, ...] | None:
        """The label values forming the mask, or ``None`` for the whole tumour (every label > 0).

        Raises:
            CohortError: the rule is neither ``"whole"`` nor ``"labels:<int>,<int>,..."``.
        """
        rule = self.label_rule.strip().lower()
        if rule == "whole":
            return None
        match = re.fullmatch(r"labels:\s*(\d+(?:\s*,\s*\d+)*)", rule)
        if match is None:
            raise CohortError(
                [Problem("label_rule", f"'{self.label_rule}' is not 'whole' nor 'labels:1,4'-style")]
            )
        values = tuple(sorted({int(v) for v in match.group(1).split(",")}))
        if 0 in values:
            raise CohortError([Problem("label_rule", "label 0 is background and cannot be in the mask")])
        return values

    def mask_from_labels(self, labels: np.ndarray) -> np.ndarray:
        """Binary tumour mask of a label map under :attr:`label_rule`.

        Args:
            labels: integer-valued label map, any shape.

        Returns:
            uint8 array of the same shape, values in {0, 1}.
        """
        values = self.label_values()
        mask = labels > 0 if values is None else np.isin(labels, values)
        return mask.astype(np.uint8)

    def describe_label_rule(self) -> str:
        """Human-readable form of the rule, used in messages."""
        values = self.label_values()
        if values is None:
            return "whole tumour (label > 0)"
        return "label in {" + ", ".join(map(str, values)) + "}"


@dataclass
class Case:
    """One patient: where its image (of the chosen channel) and its label map are.

    Attributes:
        case_id: identifier, unique in the cohort (folder name, or nnU-Net / MSD case name).
        image_path: NIfTI file holding the image.
        image_index: index of the channel on the last axis of a 4D image (MSD), ``None`` for a 3D file.
        label_path: NIfTI file holding the integer label map.
        root: folder that error messages name files relative to (the root the user gave).
    """

    case_id: str
    image_path: Path
    image_index: int | None
    label_path: Path
    root: Path | None = None

    def rel(self, path: Path) -> str:
        """``path`` relative to :attr:`root` when possible, for messages."""
        return _relative(path, self.root)


@dataclass
class Cohort:
    """A validated cohort (headers checked; voxels are checked by :func:`load_case`).

    Attributes:
        root: the folder holding the cohort (after descending a lone wrapper folder).
        layout: ``"nnunet"``, ``"msd"`` or ``"folders"``.
        cases: cases sorted by ``case_id``.
        channels: channels available in every case, canonical lower-case names.
        channel: the channel that ``cases`` point at.
        warnings: non-fatal findings, one sentence each (ignored files, channel fallback, ...).
    """

    root: Path
    layout: Layout
    cases: list[Case]
    channels: list[str]
    channel: str
    warnings: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------------
# Public functions


def read_cohort(root: Path, spec: CohortSpec | None = None) -> Cohort:
    """Find the cases of a cohort and validate their file names and NIfTI headers.

    No voxel data is read: a header claiming absurd dimensions is rejected before its data is touched.

    Args:
        root: folder of the cohort, in any of the three layouts, possibly wrapped in one extra folder.
        spec: what to read; defaults to ``CohortSpec()`` (FLAIR, whole tumour).

    Returns:
        The cohort, cases sorted by id.

    Raises:
        CohortError: every problem found, each naming its file relative to ``root``.
    """
    spec = spec or CohortSpec()
    given_root = Path(root)
    if not given_root.is_dir():
        raise CohortError([Problem(str(given_root), "is not a folder")])
    top = _descend_wrappers(given_root, spec)
    scan = _Scan(given_root=given_root, spec=spec)
    layout = _detect_layout(top, scan)
    if layout == "nnunet":
        _scan_nnunet(top, scan)
    elif layout == "msd":
        _scan_msd(top, scan)
    elif layout == "folders":
        _scan_folders(top, scan)
    if scan.problems:  # structural problems (e.g. unreadable dataset.json) make the rest meaningless
        raise CohortError(scan.problems)

    channel = _choose_channel(scan, spec)
    cases = _resolve_cases(scan, channel)
    for case in cases:
        scan.problems += _check_headers(case, spec, n_channels=scan.n_channels_4d)
    if not cases and not scan.problems:
        scan.problems.append(Problem(_relative(top, given_root), _no_cases_message(top, layout, scan)))
    if scan.problems:
        raise CohortError(scan.problems)

    channels = sorted(set.intersection(*(set(c) for c in scan.case_channels.values())), key=scan.order)
    assert channel is not None  # otherwise a problem was raised above
    log.info("cohort %s: layout %s, %d cases, channel %s", top, layout, len(cases), channel)
    return Cohort(
        root=top, layout=layout, cases=cases, channels=channels, channel=channel, warnings=scan.warnings
    )


def load_case(case: Case, spec: CohortSpec | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Read and validate the voxels of one case.

    Args:
        case: a case of a cohort returned by :func:`read_cohort`.
        spec: gives the label rule and limits; defaults to ``CohortSpec()``.

    Returns:
        ``(image, mask, affine)``: image float32 ``(X, Y, Z)`` in the file's units; mask uint8
        ``(X, Y, Z)`` in {0, 1} under the label rule; affine float64 ``(4, 4)`` voxel -> world (mm)
        of the image.

    Raises:
        CohortError: every problem of this case (headers re-checked, then voxels).
    """
    spec = spec or CohortSpec()
    problems = _check_headers(case, spec, n_channels=None)
    if problems:
        raise CohortError(problems)

    image_rel, label_rel = case.rel(case.image_path), case.rel(case.label_path)
    image_nii = _load_nifti(case.image_path)
    label_nii = _load_nifti(case.label_path)
    image = _read_voxels(image_nii, case.image_index, image_rel, problems)
    labels = _read_voxels(label_nii, None, label_rel, problems)
    if problems:
        raise CohortError(problems)
    assert image is not None and labels is not None

    n_bad = int(np.size(image) - np.count_nonzero(np.isfinite(image)))
    if n_bad:
        problems.append(Problem(image_rel, f"{n_bad} non-finite voxels (NaN or infinite)"))
    if not np.all(np.isfinite(labels)):
        problems.append(Problem(label_rel, "non-finite label values (NaN or infinite)"))
    elif np.any(labels != np.round(labels)):
        example = labels[labels != np.round(labels)].flat[0]
        problems.append(
            Problem(label_rel, f"non-integer label values (e.g. {example:g}); a label map holds classes")
        )
    elif np.any(labels < 0):
        problems.append(Problem(label_rel, f"negative label values (min {labels.min():g})"))
    else:
        mask = spec.mask_from_labels(labels)
        if not mask.any():
            present = np.unique(labels).astype(np.int64).tolist()[:20]
            problems.append(
                Problem(
                    label_rel,
                    f"mask is empty under the label rule {spec.describe_label_rule()} "
                    f"(label values present: {present})",
                )
            )
    if problems:
        raise CohortError(problems)
    return image.astype(np.float32, copy=False), mask, np.asarray(image_nii.affine, dtype=np.float64)


def split_sizes(n_patients: int, test_fraction: float) -> tuple[int, int]:
    """``(training, test)`` patients of a patient-level split by ``test_fraction``: rounded, at least one
    patient on each side when there are two or more. The engine's split (``efficacy.segmenter``) and the
    API's warnings about small splits (``service/routes/evaluations.py``) both count with it."""
    n_test = min(max(1, round(test_fraction * n_patients)), n_patients - 1)
    return n_patients - n_test, n_test


def fold_training_patients(n_patients: int, folds: int) -> int:
    """Training patients of the smallest fold when ``n_patients`` are cut into ``folds`` test groups
    (0 when there are fewer patients than folds). The engine's folds (``efficacy.crossval.make_folds``)
    and the API's check of a cross-validated evaluation (``service/routes/evaluations.py``) both count
    with it."""
    return 0 if n_patients < folds else n_patients - math.ceil(n_patients / folds)


def canonical_channel(name: str, spec: CohortSpec | None = None) -> str:
    """Canonical name of a channel named in ``dataset.json`` (``"FLAIR"`` -> ``"flair"``,
    ``"t1gd"`` -> ``"t1c"``, ``"T2w"`` -> ``"t2"``); an unknown name is returned lower-cased."""
    spec = spec or CohortSpec()
    lowered = name.strip().lower()
    return _match_channel(lowered, spec) or lowered


# --------------------------------------------------------------------------------------------------
# Layout detection and scanning


@dataclass
class _RawCase:
    """A case as found on disk, before the channel is chosen."""

    case_id: str
    images: dict[str, tuple[Path, int | None]]  # channel -> (file, index in a 4D file)
    label: Path | None
    where: Path  # file or folder named when something is missing


@dataclass
class _Scan:
    """What the scanners found, and every problem and warning so far."""

    given_root: Path
    spec: CohortSpec
    raw: list[_RawCase] = field(default_factory=list)
    channel_order: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)  # parsed dataset.json (nnunet, msd)
    n_channels_4d: int | None = None  # MSD: number of channels on the last axis of a 4D image
    problems: list[Problem] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    # Per case, channels whose file is missing or unusable are left out (for "available channels").
    case_channels: dict[str, list[str]] = field(default_factory=dict)
    # Folders layout: problems that only matter if the channel in question is the one chosen.
    channel_problems: dict[tuple[str, str], Problem] = field(default_factory=dict)

    def rel(self, path: Path) -> str:
        return _relative(path, self.given_root)

    def order(self, channel: str) -> int:
        return self.channel_order.index(channel) if channel in self.channel_order else len(self.channel_order)


def _relative(path: Path, root: Path | None) -> str:
    if root is not None:
        try:
            return str(path.relative_to(root)) or "."
        except ValueError:
            pass
    return path.name


def _is_ignored(name: str, spec: CohortSpec) -> bool:
    return any(re.search(p, name.lower()) for p in spec.ignore_patterns)


def _strip_nifti_suffix(name: str) -> str:
    lowered = name.lower()
    for suffix in _NIFTI_SUFFIXES:
        if lowered.endswith(suffix):
            return lowered[: -len(suffix)]
    return lowered


def _is_nifti(path: Path) -> bool:
    return path.name.lower().endswith(_NIFTI_SUFFIXES)


def _match_channel(name: str, spec: CohortSpec) -> str | None:
    for channel, patterns in spec.channel_patterns.items():
        if any(re.search(p, name) for p in patterns):
            return channel
    return None


def _is_label_name(name: str, spec: CohortSpec) -> bool:
    return any(re.search(p, name) for p in spec.label_patterns)


def _descend_wrappers(root: Path, spec: CohortSpec) -> Path:
    """Follow lone sub-folders (``cohort.zip`` -> ``cohort/``) until something else is found."""
    current = root
    for _ in range(8):  # a bounded walk: wrappers are one or two levels deep in practice
        if (current / "dataset.json").exists():
            return current
        children = [
            p
            for p in current.iterdir()
            if not p.name.startswith(".") and p.name.lower() != "__macosx" and not _is_ignored(p.name, spec)
        ]
        dirs = [p for p in children if p.is_dir()]
        if len(dirs) == 1 and len(children) == 1:
            current = dirs[0]
        else:
            return current
    return current


def _detect_layout(root: Path, scan: _Scan) -> Layout:
    """``nnunet`` or ``msd`` when ``dataset.json`` says so, else ``folders``."""
    meta_path = root / "dataset.json"
    if not meta_path.exists():
        if (root / "imagesTr").is_dir() or (root / "labelsTr").is_dir():
            scan.problems.append(
                Problem(scan.rel(meta_path), "missing: an nnU-Net or Decathlon layout needs dataset.json")
            )
        return "folders"
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        scan.problems.append(Problem(scan.rel(meta_path), f"unreadable JSON: {exc}"))
        return "folders"
    if not isinstance(meta, dict):
        scan.problems.append(Problem(scan.rel(meta_path), "must hold a JSON object"))
        return "folders"
    scan.meta = meta
    if "channel_names" in meta:
        return "nnunet"
    if isinstance(meta.get("training"), list):
        return "msd"
    scan.problems.append(
        Problem(
            scan.rel(meta_path),
            "neither nnU-Net v2 ('channel_names', 'file_ending') nor Decathlon ('training' list) format",
        )
    )
    return "folders"


def _named_channels(mapping: Any, key: str, scan: _Scan, meta_rel: str) -> list[str] | None:
    """Canonical channel names of a ``{"0": "FLAIR", ...}`` dict, in index order."""
    if not isinstance(mapping, dict) or not mapping:
        scan.problems.append(Problem(meta_rel, f'\'{key}\' must be a non-empty object like {{"0": "FLAIR"}}'))
        return None
    try:
        indexed = sorted((int(k), str(v)) for k, v in mapping.items())
    except ValueError:
        scan.problems.append(Problem(meta_rel, f'\'{key}\' keys must be channel indices "0", "1", ...'))
        return None
    if [i for i, _ in indexed] != list(range(len(indexed))):
        scan.problems.append(Problem(meta_rel, f"'{key}' indices must be 0..{len(indexed) - 1}"))
        return None
    names = [canonical_channel(v, scan.spec) for _, v in indexed]
    if len(set(names)) != len(names):
        scan.problems.append(Problem(meta_rel, f"'{key}' names channels ambiguously: {names}"))
        return None
    return names


def _scan_nnunet(root: Path, scan: _Scan) -> None:
    meta = scan.meta
    meta_rel = scan.rel(root / "dataset.json")
    channels = _named_channels(meta.get("channel_names"), "channel_names", scan, meta_rel)
    ending = meta.get("file_ending")
    if not isinstance(ending, str):
        scan.problems.append(Problem(meta_rel, "'file_ending' missing (e.g. \".nii.gz\")"))
    elif ending.lower() not in _NIFTI_SUFFIXES:
        scan.problems.append(
            Problem(meta_rel, f"file_ending '{ending}' is not NIfTI; only .nii and .nii.gz are read")
        )
    images_dir, labels_dir = root / "imagesTr", root / "labelsTr"
    for folder in (images_dir, labels_dir):
        if not folder.is_dir():
            scan.problems.append(Problem(scan.rel(folder), "missing folder"))
    if scan.problems or channels is None or not isinstance(ending, str):
        return
    scan.channel_order = channels

    pattern = re.compile(rf"^(?P<case>.+)_(?P<index>\d{{4}}){re.escape(ending)}$")
    found: dict[str, dict[int, Path]] = {}
    for path in sorted(images_dir.iterdir()):
        if _is_ignored(path.name, scan.spec) or path.is_dir():
            continue
        match = pattern.match(path.name)
        if match is None:
            scan.warnings.append(f"{scan.rel(path)}: ignored (not CASE_XXXX{ending})")
            continue
        found.setdefault(match["case"], {})[int(match["index"])] = path
    labels = {p.name[: -len(ending)]: p for p in sorted(labels_dir.iterdir()) if p.name.endswith(ending)}
    for case_id, by_index in sorted(found.items()):
        images: dict[str, tuple[Path, int | None]] = {
            channels[i]: (p, None) for i, p in by_index.items() if i < len(channels)
        }
        for i, p in by_index.items():
            if i >= len(channels):
                scan.warnings.append(f"{scan.rel(p)}: ignored (channel {i} not in dataset.json)")
        expected_label = labels_dir / f"{case_id}{ending}"
        scan.raw.append(_RawCase(case_id, images, labels.get(case_id), expected_label))
        scan.case_channels[case_id] = list(images)
        for i, name in enumerate(channels):
            if name not in images:
                scan.channel_problems[(case_id, name)] = Problem(
                    scan.rel(images_dir / f"{case_id}_{i:04d}{ending}"),
                    f"missing: case '{case_id}' has no file for channel '{name}'",
                )
    for case_id, path in labels.items():
        if case_id not in found:
            scan.warnings.append(f"{scan.rel(path)}: ignored (label without any image)")


def _scan_msd(root: Path, scan: _Scan) -> None:
    meta = scan.meta
    meta_rel = scan.rel(root / "dataset.json")
    if "modality" in meta:
        channels = _named_channels(meta["modality"], "modality", scan, meta_rel)
    else:
        channels = ["image"]
        scan.warnings.append(f"{meta_rel}: no 'modality'; assuming a single channel named 'image'")
    if channels is None:
        return
    scan.channel_order = channels
    scan.n_channels_4d = len(channels)

    for i, entry in enumerate(meta["training"]):
        if not isinstance(entry, dict) or not isinstance(entry.get("image"), str):
            scan.problems.append(Problem(meta_rel, f"training[{i}] has no 'image' path"))
            continue
        image = root / entry["image"]
        case_id = _strip_nifti_suffix(Path(entry["image"]).name)
        label = root / entry["label"] if isinstance(entry.get("label"), str) else None
        if not image.exists():
            scan.problems.append(
                Problem(scan.rel(image), f"listed in dataset.json training[{i}] but missing")
            )
            continue
        if label is not None and not label.exists():
            scan.problems.append(
                Problem(scan.rel(label), f"listed in dataset.json training[{i}] but missing")
            )
            continue
        multi = len(channels) > 1
        images = {name: (image, c if multi else None) for c, name in enumerate(channels)}
        scan.raw.append(_RawCase(case_id, images, label, image))
        scan.case_channels[case_id] = list(channels)
    ids = [r.case_id for r in scan.raw]
    for dup in sorted({i for i in ids if ids.count(i) > 1}):
        scan.problems.append(Problem(meta_rel, f"case '{dup}' listed more than once in 'training'"))


def _scan_folders(root: Path, scan: _Scan) -> None:
    spec = scan.spec
    subdirs = [p for p in sorted(root.iterdir()) if p.is_dir() and not _is_ignored(p.name, spec)]
    loose = [p for p in sorted(root.iterdir()) if p.is_file() and _is_nifti(p)]
    case_dirs = [
        d for d in subdirs if any(f.is_file() and not _is_ignored(f.name, spec) for f in d.iterdir())
    ]
    if loose and not case_dirs:
        case_dirs = [root]  # the root itself is the folder of a single case
    elif loose:
        for p in loose:
            scan.warnings.append(f"{scan.rel(p)}: ignored (a file beside the case folders)")
    scan.channel_order = list(spec.channel_patterns)
    for folder in case_dirs:
        _scan_case_folder(folder, scan)


def _scan_case_folder(folder: Path, scan: _Scan) -> None:
    spec = scan.spec
    case_id = folder.name
    labels: list[Path] = []
    by_channel: dict[str, list[Path]] = {}
    unknown: list[str] = []
    for path in sorted(folder.iterdir()):
        if _is_ignored(path.name, spec):
            continue
        if path.is_dir():
            unknown.append(path.name + "/")
            continue
        name = _strip_nifti_suffix(path.name)
        if _is_label_name(name, spec):
            labels.append(path)
        elif (channel := _match_channel(name, spec)) is not None:
            by_channel.setdefault(channel, []).append(path)
        else:
            unknown.append(path.name)
    if unknown:
        scan.warnings.append(
            f"{scan.rel(folder)}: ignored {', '.join(unknown)} (no modality or label name pattern matches)"
        )

    images: dict[str, tuple[Path, int | None]] = {}
    for channel, paths in by_channel.items():
        chosen = _one_nifti(paths, f"channel '{channel}'", scan)
        if isinstance(chosen, Problem):
            scan.channel_problems[(case_id, channel)] = chosen
        else:
            images[channel] = (chosen, None)
    label: Path | None = None
    if labels:
        chosen_label = _one_nifti(labels, "the label map", scan)
        if isinstance(chosen_label, Problem):
            scan.problems.append(chosen_label)
            label = labels[0]  # keeps the case from also being reported as "no label"
        else:
            label = chosen_label
    scan.raw.append(_RawCase(case_id, images, label, folder))
    scan.case_channels[case_id] = list(images)


def _one_nifti(paths: list[Path], what: str, scan: _Scan) -> Path | Problem:
    """The single NIfTI file among ``paths`` (all recognised as ``what``), or the problem."""
    niftis = [p for p in paths if _is_nifti(p)]
    if len(niftis) == 1:
        return niftis[0]
    if not niftis:
        return Problem(
            scan.rel(paths[0]), f"{what} is not a NIfTI file; convert it to .nii.gz (only NIfTI is read)"
        )
    names = ", ".join(p.name for p in niftis)
    return Problem(scan.rel(niftis[0].parent), f"ambiguous: several files match {what}: {names}")


def _choose_channel(scan: _Scan, spec: CohortSpec) -> str | None:
    """The channel to model: the requested one, or the only one of a single-channel cohort.

    Returns ``None`` (and records the problem) when the cohort has several channels, none requested.
    """
    present = sorted(
        {c for cs in scan.case_channels.values() for c in cs} | {c for _, c in scan.channel_problems},
        key=scan.order,
    )
    if spec.channel in present or not present:
        return spec.channel
    if len(present) == 1:
        scan.warnings.append(
            f"channel '{spec.channel}' not in the cohort; using its only channel '{present[0]}'"
        )
        return present[0]
    scan.problems.append(
        Problem(
            ".",
            f"channel '{spec.channel}' not found; the cohort has {', '.join(present)} (choose one of them)",
        )
    )
    return None


def _resolve_cases(scan: _Scan, channel: str | None) -> list[Case]:
    """Cases pointing at ``channel``; a case without label or without that channel is a problem."""
    cases: list[Case] = []
    for raw in sorted(scan.raw, key=lambda r: r.case_id):
        ok = True
        if raw.label is None:
            scan.problems.append(Problem(scan.rel(raw.where), f"case '{raw.case_id}' has no label file"))
            ok = False
        if channel is None:
            continue  # the cohort-wide "channel not found" problem is already recorded
        if channel not in raw.images:
            found = ", ".join(raw.images) or "none"
            scan.problems.append(
                scan.channel_problems.get((raw.case_id, channel))
                or Problem(scan.rel(raw.where), f"missing channel: no file for '{channel}' (found: {found})")
            )
            ok = False
        if ok:
            assert raw.label is not None
            path, index = raw.images[channel]
            cases.append(Case(raw.case_id, path, index, raw.label, scan.given_root))
    return cases


def _no_cases_message(top: Path, layout: str, scan: _Scan) -> str:
    if layout != "folders":
        return f"no cases found ({layout} layout: the training list / imagesTr is empty)"
    groups = [p.name for p in sorted(top.iterdir()) if p.is_dir() and not _is_ignored(p.name, scan.spec)]
    if groups:
        return (
            "no cases found: the sub-folders " + ", ".join(groups[:5]) + " hold no files; point at the "
            "folder that directly contains the case folders (e.g. the training split only)"
        )
    return "no cases found: expected dataset.json (nnU-Net / Decathlon) or one folder per case"


# --------------------------------------------------------------------------------------------------
# Header and voxel checks


def _check_headers(case: Case, spec: CohortSpec, n_channels: int | None) -> list[Problem]:
    """Header-only checks of a case: readable NIfTI, dimensionality, sizes, image/label agreement.

    Args:
        n_channels: number of channels of a 4D (MSD) image; ``None`` means: infer from ``image_index``.
    """
    problems: list[Problem] = []
    four_d = n_channels if n_channels and n_channels > 1 else None
    if four_d is None and case.image_index is not None:
        four_d = -1  # any channel count that contains image_index
    image = _header(case.image_path, case.rel(case.image_path), spec, problems, four_d, case.image_index)
    label = _header(case.label_path, case.rel(case.label_path), spec, problems, None, None)
    if image is None or label is None:
        return problems
    (image_shape, image_affine), (label_shape, label_affine) = image, label
    label_rel, image_rel = case.rel(case.label_path), case.rel(case.image_path)
    if image_shape != label_shape:
        problems.append(
            Problem(label_rel, f"shape {label_shape} differs from the image {image_rel} {image_shape}")
        )
    elif not np.allclose(image_affine, label_affine, rtol=0.0, atol=spec.affine_tol_mm):
        diff = float(np.max(np.abs(image_affine - label_affine)))
        problems.append(
            Problem(
                label_rel,
                f"affine differs from the image {image_rel} by up to {diff:.4g} mm "
                f"(tolerance {spec.affine_tol_mm:g} mm): the label is not on the image grid",
            )
        )
    return problems


def _header(
    path: Path,
    rel: str,
    spec: CohortSpec,
    problems: list[Problem],
    four_d: int | None,
    index: int | None,
) -> tuple[tuple[int, int, int], np.ndarray] | None:
    """Spatial shape ``(X, Y, Z)`` and affine from a NIfTI header, or ``None`` with a problem added.

    Args:
        four_d: ``None``: a 3D volume is expected (trailing axes of size 1 are tolerated); ``n > 1``: a
            4D volume of ``n`` channels is expected; ``-1``: 4D with at least ``index + 1`` channels.
    """
    if not _is_nifti(path):
        problems.append(Problem(rel, "not a NIfTI file (.nii or .nii.gz expected)"))
        return None
    try:
        nii = nib.load(path)
    except Exception as exc:  # nibabel raises many types for corrupt files; all mean "unreadable"
        problems.append(Problem(rel, f"unreadable NIfTI header: {_without_path(exc, path, rel)}"))
        return None
    if not isinstance(nii, nib.Nifti1Image | nib.Nifti2Image):
        problems.append(Problem(rel, f"not a NIfTI image ({type(nii).__name__})"))
        return None
    shape = tuple(int(d) for d in nii.shape)
    dtype = nii.get_data_dtype()
    if dtype.kind not in "biuf" or dtype.fields is not None:
        problems.append(Problem(rel, f"unsupported voxel type {dtype} (expected integer or float)"))
        return None

    spatial = shape[:3]
    extra = shape[3:]
    if four_d is None:
        if len(shape) < 3 or any(d != 1 for d in extra):
            problems.append(Problem(rel, f"expected a 3D volume, got {len(shape)}D shape {shape}"))
            return None
    else:
        if len(shape) != 4:
            problems.append(Problem(rel, f"expected a 4D volume (X, Y, Z, channel), got shape {shape}"))
            return None
        if four_d > 0 and shape[3] != four_d:
            problems.append(
                Problem(rel, f"has {shape[3]} channels on its last axis, dataset.json names {four_d}")
            )
            return None
        if index is not None and index >= shape[3]:
            problems.append(Problem(rel, f"has {shape[3]} channels, channel index {index} requested"))
            return None

    # Sizes come from the header alone: a file claiming 100000^3 voxels is never read.
    if any(d > spec.max_dim for d in shape):
        problems.append(Problem(rel, f"absurd dimensions {shape}: an axis exceeds {spec.max_dim} voxels"))
        return None
    n_voxels = int(np.prod(spatial, dtype=np.int64))
    if n_voxels > spec.max_voxels:
        problems.append(
            Problem(rel, f"absurd dimensions {shape}: {n_voxels} voxels exceed the limit {spec.max_voxels}")
        )
        return None
    if min(spatial[:2]) < spec.min_inplane or spatial[2] < 1:
        problems.append(
            Problem(rel, f"absurd dimensions {shape}: in-plane size below {spec.min_inplane} voxels")
        )
        return None
    affine = np.asarray(nii.affine, dtype=np.float64)
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        problems.append(Problem(rel, "invalid affine (non-finite or singular voxel-to-world matrix)"))
        return None
    return (spatial[0], spatial[1], spatial[2]), affine


def _without_path(exc: BaseException, path: Path, rel: str) -> str:
    """A library's error message with the file's server path replaced by its name inside the cohort
    (nibabel and gzip name the absolute path; a user must never see where the server keeps files)."""
    text = str(exc)
    for form in (str(path), str(Path(path).resolve())):
        text = text.replace(form, rel)
    return text


def _load_nifti(path: Path) -> nib.Nifti1Image:
    """A NIfTI-1 or -2 image whose header was already checked (:func:`_header_info`)."""
    nii = nib.load(path)
    if not isinstance(nii, nib.Nifti1Image):  # Nifti2Image is a subclass
        raise CohortError([Problem(path.name, f"not a NIfTI image ({type(nii).__name__})")])
    return nii


def _read_voxels(
    nii: nib.Nifti1Image, index: int | None, rel: str, problems: list[Problem]
) -> np.ndarray | None:
    """The 3D voxel array (one channel of a 4D file when ``index`` is given), or ``None`` + problem."""
    try:
        data = nii.dataobj[..., index] if index is not None else nii.dataobj[...]
        data = np.asarray(data)
    except Exception as exc:  # truncated gzip, short file, ...: "unreadable" is what the user needs
        where = Path(nii.get_filename() or rel)
        problems.append(
            Problem(
                rel, f"unreadable voxel data (truncated or corrupt file?): {_without_path(exc, where, rel)}"
            )
        )
        return None
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    return data
