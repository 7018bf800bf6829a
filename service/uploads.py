"""Request bodies streamed to disk, and a cohort zip turned into a validated, stored cohort."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from fastapi import Request

from contract.jobs import now_iso
from contract.storage import LocalStorage
from service.archive import ArchiveError, ArchiveLimits, cohort_root, extract_zip
from service.errors import ApiError
from service.settings import Settings

log = logging.getLogger(__name__)

ZIP_TYPES = ("application/zip", "application/x-zip-compressed", "application/octet-stream")


def check_declared_length(request: Request, limit: int) -> None:
    """413 before reading a byte when the client declares a body past the limit."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"request body of {declared} bytes exceeds the limit of {limit} bytes")


async def stream_to_file(request: Request, path: Path, limit: int) -> int:
    """Write the request body to ``path`` chunk by chunk; 413 as soon as it passes ``limit`` bytes."""
    check_declared_length(request, limit)
    size = 0
    with open(path, "xb") as out:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ApiError(413, f"request body exceeds the limit of {limit} bytes")
            out.write(chunk)  # page-cache write of one chunk: cheaper than a thread hop
    if size == 0:
        raise ApiError(422, "empty request body", [("<upload>", "no data")])
    return size


def limits(settings: Settings) -> ArchiveLimits:
    return ArchiveLimits(
        max_files=settings.max_archive_files,
        max_uncompressed_bytes=settings.max_uncompressed_bytes,
        max_ratio=settings.max_compression_ratio,
    )


def ingest_cohort(
    storage: LocalStorage, settings: Settings, tenant: str, cohort_id: str, zip_path: Path
) -> dict:
    """Extract, validate and store a cohort; return its record. Leaves nothing behind on error.

    The files are extracted in staging, moved to their final folder (invisible until ``record.json``
    is written) and validated there, so the engine's preprocessing cache built now under the final
    path is the one the worker finds later.
    """
    final = storage.path(tenant, "cohorts", cohort_id)
    cache = storage.cache_dir(tenant, cohort_id)
    extract_dir = zip_path.parent / "files"
    try:
        extract_dir.mkdir()
        try:
            size = extract_zip(zip_path, extract_dir, limits(settings))
        except ArchiveError as e:
            raise ApiError(e.status, "archive rejected", e.problems) from None
        zip_path.unlink()
        rel_root = cohort_root(extract_dir).relative_to(extract_dir.parent)
        storage.commit(tenant, "cohorts", cohort_id, zip_path.parent)
        summary = validate_cohort(final / rel_root, cache)
        record = {
            "id": cohort_id,
            "root": rel_root.as_posix(),
            "size_bytes": size,
            "created_at": now_iso(),
            **summary,
        }
        storage.write_record(tenant, "cohorts", cohort_id, record)
        return record
    except BaseException:
        shutil.rmtree(final, ignore_errors=True)
        shutil.rmtree(cache, ignore_errors=True)
        raise


def validate_cohort(root: Path, cache_dir: Path) -> dict:
    """The engine's header and voxel validation (``models.cohort``, torch-free); 422 on CohortError."""
    from models import cohort as engine_cohort
    from models.errors import CohortError

    spec = engine_cohort.CohortSpec()
    try:
        cohort = engine_cohort.read_cohort(root, spec)
        slices = _preprocess(cohort, spec, cache_dir)
    except CohortError as e:
        problems = [(_relative(p.file, root), p.problem) for p in e.problems]
        raise ApiError(422, "cohort rejected", problems) from None
    return {
        "cases": [c.case_id for c in cohort.cases],
        "channels": list(cohort.channels),
        "tumour_slices": int(slices.tumour_slices),
        "warnings": [str(w) for w in cohort.warnings],
        "layout": cohort.layout,
    }


def _preprocess(cohort, spec, cache_dir: Path):
    """Voxel-level validation (empty masks, non-finite voxels) and the tumour-slice count."""
    from models import preprocess as engine_preprocess

    cfg = engine_preprocess.PreprocessConfig()
    cache_dir.mkdir(parents=True, exist_ok=True)
    return engine_preprocess.preprocess_cohort(cohort, spec, cfg, cache_dir)


def _relative(file: str, root: Path) -> str:
    try:
        return Path(file).relative_to(root).as_posix()
    except ValueError:
        return file
