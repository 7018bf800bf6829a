"""Write the augmented dataset in nnU-Net v2 "raw" layout, with a manifest that pins every byte.

Layout (https://github.com/MIC-DKFZ/nnUNet/blob/master/documentation/dataset_format.md)::

    out_dir/
        imagesTr/{case}_0000.nii.gz       float32 image, one channel (the modelled one)
        labelsTr/{case}.nii.gz            uint8 mask, values {0, 1}
        imagesTr/synth_00000_0000.nii.gz  synthetic pairs, numbered from 0 with five digits
        labelsTr/synth_00000.nii.gz
        dataset.json                      what nnU-Net reads (channel names, labels, numTraining, ...)
        manifest.json                     provenance + sha256 and size of every other file

Real cases are the cohort resampled to the model's grid (whole ``(H, W, D)`` volumes). A synthetic
volume stacks ``n_slices`` independently generated ``(H, W)`` slices on the same grid: the in-plane
spacing and orientation of the real resampled cases, and their through-plane spacing.

Every volume is written with :class:`imaging.nifti.StreamingNiftiWriter` (temporary name, renamed when
complete), so a file under its final name is always whole; that is what lets generation resume
(:mod:`imaging.journal`) and a running job's dataset be streamed (:func:`published_pairs`). JSON files are written with sorted keys and no timestamps, so the
same inputs and seed give byte-identical datasets.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import nibabel as nib
import numpy as np
from numpy.typing import ArrayLike

from . import __version__
from .errors import DHVAEError, Problem
from .files import PARTIAL_SUFFIX, PublishOnExit, sha256_file, write_json_atomic
from .nifti import DEFAULT_COMPRESSLEVEL, StreamingNiftiWriter, write_volume

log = logging.getLogger(__name__)

IMAGES_DIR = "imagesTr"
# What the real cases of an export are (``dataset.json``'s ``real_cases_geometry``).
REAL_CASES = {
    "resampled": "resampled to the model's grid (e.g. 128 x 128 x 64 voxels for BraTS), intensities min-max "
    "normalised to [0, 1] per case, masks {0, 1}: what the generator was trained on",
    "uploaded": "as uploaded: the original voxel grid, spacing and intensities of the chosen channel; masks "
    "{0, 1} on the same grid (label_mapping)",
}
LABELS_DIR = "labelsTr"
FILE_ENDING = ".nii.gz"
CHANNEL_SUFFIX = "_0000"  # the single exported channel is nnU-Net channel 0
DATASET_JSON = "dataset.json"
MANIFEST_JSON = "manifest.json"
SYNTHETIC_PREFIX = "synth_"
MAX_SYNTHETIC = 100_000  # five digits
LABELS = {"background": 0, "tumour": 1}
PACKAGE = "dhvae-augment"

_SYNTHETIC_ID = re.compile(r"synth_(\d{5})")
_CHANNEL_IMAGE = re.compile(r"([^.].*)_\d{4}\.nii\.gz")
_UNSAFE_CHARS = re.compile(r"[^A-Za-z0-9_-]+")
_MANIFEST_RESERVED = ("files", "created_by", "real_case_ids")


class DatasetError(DHVAEError):
    """An exported dataset is incomplete or was changed after export; ``problems`` lists every file."""

    def __init__(self, out_dir: Path, problems: list[Problem]):
        self.out_dir = out_dir
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"dataset {out_dir} failed verification ({len(self.problems)} problem(s)):\n{lines}")


class CaseLike(Protocol):
    """What :meth:`NnUNetExporter.add_real_case` needs (``imaging.preprocess.ResampledCase`` has it)."""

    case_id: str
    image: np.ndarray  # (H, W, D) float32 in [0, 1]
    mask: np.ndarray  # (H, W, D) uint8 {0, 1}
    affine: np.ndarray  # (4, 4) voxel -> world, mm


# -- names and paths ---------------------------------------------------------------------------------


def synthetic_case_id(index: int) -> str:
    """nnU-Net case identifier of synthetic pair ``index``: ``synth_00042``."""
    if not 0 <= index < MAX_SYNTHETIC:
        raise ValueError(f"synthetic index must be in [0, {MAX_SYNTHETIC}), got {index}")
    return f"{SYNTHETIC_PREFIX}{index:05d}"


def image_path(out_dir: Path, case_id: str) -> Path:
    """``out_dir/imagesTr/{case_id}_0000.nii.gz``."""
    return Path(out_dir) / IMAGES_DIR / f"{case_id}{CHANNEL_SUFFIX}{FILE_ENDING}"


def label_path(out_dir: Path, case_id: str) -> Path:
    """``out_dir/labelsTr/{case_id}.nii.gz``."""
    return Path(out_dir) / LABELS_DIR / f"{case_id}{FILE_ENDING}"


def sanitise_case_id(name: str) -> str:
    """Turn a cohort case name into an nnU-Net-safe identifier: letters, digits, ``_`` and ``-`` only.

    Runs of other characters become one ``_``; leading/trailing ``_``/``-`` are dropped; an empty result
    becomes ``case``; names that look synthetic get a ``real_`` prefix so they cannot collide with
    ``synth_XXXXX``. Uniqueness across a cohort is :class:`NnUNetExporter`'s job.
    """
    safe = _UNSAFE_CHARS.sub("_", name).strip("_-") or "case"
    if safe.startswith(SYNTHETIC_PREFIX):
        safe = "real_" + safe
    return safe


def grid_affine(affines: Sequence[ArrayLike]) -> np.ndarray:
    """The cohort's resampled grid as one 4x4 affine, for the synthetic volumes.

    Orientation (direction cosines) and origin come from the first case; the voxel size along each axis
    is the median over the cases (they agree when the cohort was resampled to a common spacing).
    """
    mats = [np.asarray(a, dtype=np.float64) for a in affines]
    if not mats:
        raise ValueError("grid_affine needs at least one affine")
    for a in mats:
        if a.shape != (4, 4) or not np.all(np.isfinite(a)):
            raise ValueError(f"expected finite 4x4 affines, got shape {a.shape}")
    first = mats[0]
    zooms_first = np.linalg.norm(first[:3, :3], axis=0)
    directions = first[:3, :3] / zooms_first
    zooms = np.median([np.linalg.norm(a[:3, :3], axis=0) for a in mats], axis=0)
    orientations = {nib.orientations.aff2axcodes(a) for a in mats}
    if len(orientations) > 1:
        log.warning("real cases have different orientations %s; using the first", sorted(orientations))
    out = np.eye(4)
    out[:3, :3] = directions * zooms
    out[:3, 3] = first[:3, 3]
    return out


def published_pairs(out_dir: Path) -> list[tuple[str, list[str]]]:
    """``[(case, [image files..., label file])]`` (paths relative to ``out_dir``) for every case whose
    label and at least one channel image are on disk under their final names, sorted by case.

    Files only get their final names once complete (:mod:`imaging.files`), so partial files of an
    interrupted or running export never count; a case with only its image or only its label does not
    count either. The zip stream of a running job and the generation journal both read this.
    """
    labels, images = Path(out_dir) / LABELS_DIR, Path(out_dir) / IMAGES_DIR
    if not labels.is_dir() or not images.is_dir():
        return []
    by_case: dict[str, list[str]] = {}
    for name in sorted(p.name for p in images.iterdir()):
        match = _CHANNEL_IMAGE.fullmatch(name)
        if match:
            by_case.setdefault(match.group(1), []).append(f"{IMAGES_DIR}/{name}")
    pairs = []
    for name in sorted(p.name for p in labels.iterdir()):
        if name.endswith(FILE_ENDING) and not name.startswith("."):
            case = name[: -len(FILE_ENDING)]
            if case in by_case:
                pairs.append((case, [*by_case[case], f"{LABELS_DIR}/{name}"]))
    return pairs


def synthetic_index(case_id: str) -> int | None:
    """``synth_00042`` -> 42; None for a real case."""
    match = _SYNTHETIC_ID.fullmatch(case_id)
    return int(match.group(1)) if match else None


# -- writers -----------------------------------------------------------------------------------------


def _check_image(image: np.ndarray, what: str) -> None:
    if not np.all(np.isfinite(image)):
        raise ValueError(f"{what}: image has NaN or infinite values")


def _check_mask(mask: np.ndarray, what: str) -> None:
    if not np.all((mask == 0) | (mask == 1)):
        raise ValueError(f"{what}: mask values must be 0 or 1, got {np.unique(mask)[:10].tolist()}")


class SyntheticPairWriter(PublishOnExit):
    """Streams one synthetic image + mask pair slice by slice; a context manager.

    Both files are published together on ``close`` (image first, then label: a pair counts as complete
    only once its label exists). On error, or if fewer than ``n_slices`` pairs of slices were written,
    neither file is left under its final name.
    """

    def __init__(
        self,
        case_id: str,
        image_file: Path,
        label_file: Path,
        shape: tuple[int, int, int],
        affine: np.ndarray,
        compresslevel: int = DEFAULT_COMPRESSLEVEL,
    ) -> None:
        self.case_id = case_id
        self.shape = shape
        self._image = StreamingNiftiWriter(image_file, shape, np.float32, affine, compresslevel=compresslevel)
        try:
            self._label = StreamingNiftiWriter(
                label_file, shape, np.uint8, affine, compresslevel=compresslevel
            )
        except BaseException:
            self._image.abort()
            raise

    @property
    def slices_written(self) -> int:
        return self._label.slices_written

    @property
    def closed(self) -> bool:
        return self._image.closed and self._label.closed

    def write(self, image: ArrayLike, mask: ArrayLike) -> None:
        """Append one generated slice pair: ``image`` (H, W) float, ``mask`` (H, W) with values {0, 1}.

        The image is stored as float32 and must be finite (the range [0, 1] is the caller's contract and
        is not re-checked here); the mask may be bool, integer or float, and is stored as uint8.
        """
        img, msk = np.asarray(image), np.asarray(mask)
        what = f"{self.case_id} slice {self.slices_written}"
        _check_image(img, what)
        _check_mask(msk, what)
        # contents are checked above, so the two writes cannot fail on values and the writers stay in step
        self._image.write_slice(img)
        self._label.write_slice(msk)

    def close(self) -> None:
        """Publish both files (raises ``ValueError`` and publishes neither if slices are missing)."""
        try:
            self._image.close()
        except BaseException:
            self._label.abort()
            raise
        try:
            self._label.close()
        except BaseException:
            self._image.path.unlink(missing_ok=True)  # no orphan image without its label
            raise

    def abort(self) -> None:
        """Delete both partial files."""
        try:
            self._image.abort()
        finally:
            self._label.abort()


class NnUNetExporter:
    """Builds an augmented nnU-Net v2 raw dataset in ``out_dir``.

    Args:
        out_dir: dataset folder (created if missing). Existing complete synthetic pairs are kept.
        channel_name: the exported channel, e.g. ``"FLAIR"`` or ``"PET"`` (``dataset.json`` channel 0).
        grid: 4x4 affine of the synthetic volumes' grid; default: :func:`grid_affine` of the real cases
            added before the first :meth:`open_synthetic`.
        slice_shape: ``(H, W)`` of a synthetic slice; default: the real cases' in-plane shape.
        name, description: copied into ``dataset.json`` (default description: what the dataset holds).
        compresslevel: gzip level for every volume (fixed so bytes are reproducible).
        real_cases_geometry: what the real cases are, said in ``dataset.json`` (:data:`REAL_CASES`).
        label_rule: how the uploaded label maps became the {0, 1} masks (e.g. "label in {1, 2, 3, 4}"),
            said in ``dataset.json``'s ``label_mapping``.

    Typical use: ``add_real_case`` for each resampled case, ``open_synthetic`` for each generated pair
    not already in :func:`completed_synthetic_indices`, then ``finalize``.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike[str],
        channel_name: str = "FLAIR",
        *,
        grid: ArrayLike | None = None,
        slice_shape: tuple[int, int] | None = None,
        name: str = "dhvae_augmented",
        description: str | None = None,
        compresslevel: int = DEFAULT_COMPRESSLEVEL,
        real_cases_geometry: str = "resampled",
        label_rule: str = "whole tumour (label > 0)",
    ) -> None:
        if real_cases_geometry not in REAL_CASES:
            raise ValueError(f"real_cases_geometry must be one of {sorted(REAL_CASES)}")
        self.real_cases_geometry, self.label_rule = real_cases_geometry, label_rule
        self.out_dir = Path(out_dir)
        self.channel_name = channel_name
        self.name = name
        self.description = description
        self.compresslevel = compresslevel
        self._grid = None if grid is None else np.asarray(grid, dtype=np.float64)
        if self._grid is not None and self._grid.shape != (4, 4):
            raise ValueError(f"grid must be a 4x4 affine, got shape {self._grid.shape}")
        self._slice_shape = None if slice_shape is None else (int(slice_shape[0]), int(slice_shape[1]))
        self._real_ids: dict[str, str] = {}  # safe id -> original case_id
        self._real_affines: list[np.ndarray] = []
        self._real_shapes: set[tuple[int, int]] = set()
        self._writers: list[SyntheticPairWriter] = []
        (self.out_dir / IMAGES_DIR).mkdir(parents=True, exist_ok=True)
        (self.out_dir / LABELS_DIR).mkdir(parents=True, exist_ok=True)

    # -- real cases ------------------------------------------------------------------------------------

    def add_real_case(self, case: CaseLike) -> str:
        """Write one resampled real case (whole volumes); returns its nnU-Net case identifier."""
        image, mask = np.asarray(case.image), np.asarray(case.mask)
        affine = np.asarray(case.affine, dtype=np.float64)
        what = f"case {case.case_id!r}"
        if image.ndim != 3 or mask.shape != image.shape:
            raise ValueError(
                f"{what}: expected image and mask of one 3D shape, got {image.shape}, {mask.shape}"
            )
        if affine.shape != (4, 4):
            raise ValueError(f"{what}: affine must be 4x4, got {affine.shape}")
        _check_image(image, what)
        _check_mask(mask, what)

        case_id = self._unique_id(sanitise_case_id(str(case.case_id)))
        write_volume(
            image_path(self.out_dir, case_id), image, affine, np.float32, compresslevel=self.compresslevel
        )
        write_volume(
            label_path(self.out_dir, case_id), mask, affine, np.uint8, compresslevel=self.compresslevel
        )
        self._real_ids[case_id] = str(case.case_id)
        self._real_affines.append(affine)
        self._real_shapes.add((image.shape[0], image.shape[1]))
        log.debug("exported real case %s as %s", case.case_id, case_id)
        return case_id

    def _unique_id(self, safe: str) -> str:
        # compared case-insensitively: "A" and "a" are the same file on macOS and Windows
        taken = {k.lower() for k in self._real_ids}
        candidate, n = safe, 2
        while candidate.lower() in taken:
            candidate, n = f"{safe}_{n}", n + 1
        return candidate

    # -- synthetic pairs -------------------------------------------------------------------------------

    def synthetic_grid(self) -> tuple[np.ndarray, tuple[int, int]]:
        """``(affine 4x4, (H, W))`` of the synthetic volumes; fixed the first time it is needed."""
        if self._grid is None:
            if not self._real_affines:
                raise ValueError("no grid for synthetic volumes: pass grid= or add the real cases first")
            self._grid = grid_affine(self._real_affines)
        if self._slice_shape is None:
            if len(self._real_shapes) != 1:
                raise ValueError(
                    f"cannot infer the synthetic slice shape from real cases of in-plane shapes "
                    f"{sorted(self._real_shapes)}: pass slice_shape="
                )
            (self._slice_shape,) = self._real_shapes
        return self._grid.copy(), self._slice_shape

    def open_synthetic(self, index: int, n_slices: int = 1) -> SyntheticPairWriter:
        """Start writing synthetic pair ``index`` as a volume of ``n_slices`` slices (overwrites it)."""
        if n_slices < 1:
            raise ValueError(f"n_slices must be at least 1, got {n_slices}")
        case_id = synthetic_case_id(index)
        affine, (h, w) = self.synthetic_grid()
        writer = SyntheticPairWriter(
            case_id,
            image_path(self.out_dir, case_id),
            label_path(self.out_dir, case_id),
            (h, w, n_slices),
            affine,
            compresslevel=self.compresslevel,
        )
        self._writers = [wr for wr in self._writers if not wr.closed] + [writer]
        return writer

    # -- finishing -------------------------------------------------------------------------------------

    @staticmethod
    def _describe(n_synthetic: int, n_real: int) -> str:
        if n_real and n_synthetic:
            return "Real cases plus synthetic image/mask pairs"
        return "Synthetic image/mask pairs" if n_synthetic else "Real cases"

    def finalize(self, manifest_extras: Mapping[str, Any] | None = None) -> Path:
        """Write ``dataset.json`` and ``manifest.json``; returns the manifest's path.

        ``manifest_extras`` (model, config, seed, counts, ...) is stored as given at the top level of the
        manifest, next to ``files`` (sha256 and size of every file but the manifest), ``created_by`` and
        ``real_case_ids`` (exported id -> original name). Raises :class:`DatasetError` if an image has no
        label or the reverse; leftover partial files of interrupted writes are removed first.
        """
        extras = dict(manifest_extras or {})
        clash = sorted(set(extras) & set(_MANIFEST_RESERVED))
        if clash:
            raise ValueError(f"manifest_extras must not set {clash}: the exporter writes them")
        if any(not wr.closed for wr in self._writers):
            raise RuntimeError("finalize() called while synthetic pairs are still being written")

        for folder in (IMAGES_DIR, LABELS_DIR):
            for path in (self.out_dir / folder).glob(f".*{PARTIAL_SUFFIX}"):
                log.info("removing unfinished file %s", path)
                path.unlink()

        problems = _pairing_problems(self.out_dir)
        if problems:
            raise DatasetError(self.out_dir, problems)
        label_ids = _label_case_ids(self.out_dir)
        n_synthetic = sum(1 for c in label_ids if synthetic_index(c) is not None)

        dataset = {
            "channel_names": {"0": self.channel_name},
            "labels": dict(LABELS),
            "numTraining": len(label_ids),
            "file_ending": FILE_ENDING,
            "name": self.name,
            "description": self.description or self._describe(n_synthetic, len(label_ids) - n_synthetic),
            "synthetic_cases": n_synthetic,
            "real_cases": len(label_ids) - n_synthetic,
            "real_cases_geometry": REAL_CASES[self.real_cases_geometry],
            "synthetic_cases_geometry": (
                "axial slices of the model's grid (the resampled cases' in-plane spacing and orientation), "
                "intensities in [0, 1], 0 outside the brain unless the generation kept the background"
            ),
            "label_mapping": {
                "0": "background",
                "1": f"tumour: {self.label_rule} of the uploaded label maps",
            },
            # MONAI's datalist (``monai.data.load_decathlon_datalist(dataset.json)``); nnU-Net ignores it
            "training": [
                {
                    "image": f"./{image_path(Path(), case).as_posix()}",
                    "label": f"./{label_path(Path(), case).as_posix()}",
                }
                for case in label_ids
            ],
            "licence": (
                "Real cases keep the licence and terms of use of the cohort they come from; synthetic "
                "cases are derived from a model trained on that cohort and should be shared under the "
                "same terms."
            ),
        }
        write_json_atomic(self.out_dir / DATASET_JSON, dataset)

        manifest = {
            **extras,
            "created_by": f"{PACKAGE} {__version__}",
            "real_case_ids": dict(self._real_ids),
            "files": hash_files(self.out_dir),
        }
        path = write_json_atomic(self.out_dir / MANIFEST_JSON, manifest)
        log.info("dataset %s: %d real + %d synthetic cases", self.out_dir, dataset["real_cases"], n_synthetic)
        return path


# -- manifest and verification -----------------------------------------------------------------------


def dataset_files(out_dir: Path) -> list[str]:
    """Relative posix paths of the dataset's files, sorted. Hidden files (the generation journal,
    ``.NAME.partial`` files being written) are bookkeeping, not part of the dataset."""
    out_dir = Path(out_dir)
    rels = (p.relative_to(out_dir).as_posix() for p in out_dir.rglob("*") if p.is_file())
    return sorted(r for r in rels if not any(part.startswith(".") for part in r.split("/")))


def hash_files(out_dir: Path) -> dict[str, dict[str, Any]]:
    """``{relative posix path: {"sha256": hex, "bytes": size}}`` of every dataset file but ``manifest.json``."""
    out_dir = Path(out_dir)
    return {
        rel: {"sha256": sha256_file(out_dir / rel), "bytes": (out_dir / rel).stat().st_size}
        for rel in dataset_files(out_dir)
        if rel != MANIFEST_JSON
    }


def _label_case_ids(out_dir: Path) -> list[str]:
    folder = Path(out_dir) / LABELS_DIR
    names = sorted(p.name for p in folder.glob(f"*{FILE_ENDING}") if not p.name.startswith("."))
    return [n[: -len(FILE_ENDING)] for n in names]


def _pairing_problems(out_dir: Path) -> list[Problem]:
    """Every label needs ``{case}_0000`` in imagesTr and every image a label (one channel)."""
    out_dir = Path(out_dir)
    problems = []
    labels = set(_label_case_ids(out_dir))
    images_dir = out_dir / IMAGES_DIR
    image_suffix = CHANNEL_SUFFIX + FILE_ENDING
    images = set()
    for path in sorted(images_dir.glob(f"*{FILE_ENDING}")):
        if path.name.startswith("."):
            continue
        rel = f"{IMAGES_DIR}/{path.name}"
        if not path.name.endswith(image_suffix):
            problems.append(Problem(rel, f"not a channel-0 image (expected CASE{image_suffix})"))
            continue
        case_id = path.name[: -len(image_suffix)]
        images.add(case_id)
        if case_id not in labels:
            problems.append(Problem(rel, f"has no label {LABELS_DIR}/{case_id}{FILE_ENDING}"))
    for case_id in sorted(labels - images):
        problems.append(
            Problem(
                f"{LABELS_DIR}/{case_id}{FILE_ENDING}", f"has no image {IMAGES_DIR}/{case_id}{image_suffix}"
            )
        )
    return problems


def find_dataset_problems(out_dir: str | os.PathLike[str]) -> list[Problem]:
    """Everything wrong with an exported dataset (empty list: it is intact).

    Checks that ``manifest.json`` lists exactly the files present with matching size and sha256, that
    images and labels pair up, and that ``dataset.json`` counts the labels.
    """
    out_dir = Path(out_dir)
    manifest_path = out_dir / MANIFEST_JSON
    if not manifest_path.is_file():
        return [Problem(MANIFEST_JSON, "missing: the export did not finish (run it again)")]
    try:
        listed = json.loads(manifest_path.read_text(encoding="utf-8"))["files"]
        if not isinstance(listed, dict):
            raise TypeError("'files' is not an object")
    except (ValueError, KeyError, TypeError) as err:
        return [Problem(MANIFEST_JSON, f"unreadable: {err}")]

    problems = []
    present = set(dataset_files(out_dir)) - {MANIFEST_JSON}
    for rel in sorted(set(listed) - present):
        problems.append(Problem(rel, "listed in manifest.json but missing"))
    for rel in sorted(present - set(listed)):
        problems.append(Problem(rel, "not listed in manifest.json"))
    for rel in sorted(set(listed) & present):
        entry, path = listed[rel], out_dir / rel
        if path.stat().st_size != entry.get("bytes"):
            problems.append(
                Problem(rel, f"size {path.stat().st_size} bytes, manifest says {entry.get('bytes')}")
            )
        elif sha256_file(path) != entry.get("sha256"):
            problems.append(Problem(rel, "content differs from manifest.json (sha256 mismatch)"))

    problems += _pairing_problems(out_dir)
    dataset_path = out_dir / DATASET_JSON
    if dataset_path.is_file():
        try:
            declared = json.loads(dataset_path.read_text(encoding="utf-8")).get("numTraining")
        except ValueError as err:
            problems.append(Problem(DATASET_JSON, f"unreadable: {err}"))
        else:
            n_labels = len(_label_case_ids(out_dir))
            if declared != n_labels:
                problems.append(
                    Problem(DATASET_JSON, f"numTraining is {declared}, {LABELS_DIR} has {n_labels}")
                )
    return problems


def verify_dataset(out_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Check an exported dataset (see :func:`find_dataset_problems`); returns its manifest.

    Raises :class:`DatasetError` listing every problem found.
    """
    problems = find_dataset_problems(out_dir)
    if problems:
        raise DatasetError(Path(out_dir), problems)
    manifest: dict[str, Any] = json.loads((Path(out_dir) / MANIFEST_JSON).read_text(encoding="utf-8"))
    return manifest
