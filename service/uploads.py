"""Request bodies streamed to disk, and a cohort zip turned into a validated, stored cohort."""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import anyio
from fastapi import Request

from contract.records import CohortRecord
from runtime.jobs import now_iso
from runtime.storage import LocalStorage
from service.archive import UPLOAD, ArchiveError, ArchiveLimits, extract_zip
from service.errors import ApiError
from service.settings import Settings

log = logging.getLogger(__name__)
T = TypeVar("T")

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
        max_archive_ratio=settings.max_archive_ratio,
    )


def room_left(storage: LocalStorage, settings: Settings, tenant: str) -> int:
    """Bytes the tenant may still store under ``DHVAE_TENANT_QUOTA_BYTES``; 507 when none is left."""
    room = settings.tenant_quota_bytes - storage.usage(tenant)
    if room <= 0:
        raise ApiError(
            507,
            f"your storage quota of {settings.tenant_quota_bytes} bytes is used up; delete cohorts, models "
            "or job outputs you no longer need",
        )
    return room


class ValidationPool:
    """Where uploads are validated: at most ``slots`` at once over all tenants and one at a time per
    tenant, so one tenant's uploads (or one slow archive) never hold every slot, and each upload has
    its own deadline (checked between archive chunks and between cases)."""

    def __init__(self, slots: int, deadline_s: float):
        self.slots = anyio.CapacityLimiter(slots)
        self.per_tenant: dict[str, anyio.CapacityLimiter] = {}
        self.deadline_s = deadline_s

    async def run(self, tenant: str, fn: Callable[..., T], *args: Any) -> T:
        mine = self.per_tenant.setdefault(tenant, anyio.CapacityLimiter(1))
        async with mine, self.slots:
            return await anyio.to_thread.run_sync(fn, *args)

    def deadline(self) -> Callable[[], None]:
        """A check that raises 422 once this upload's validation has run for ``deadline_s``."""
        end = time.monotonic() + self.deadline_s

        def check() -> None:
            if time.monotonic() > end:
                raise ApiError(
                    422,
                    f"validating the cohort took longer than {self.deadline_s:g} s; upload fewer or smaller cases",
                    [(UPLOAD, "validation deadline exceeded")],
                )

        return check


def ingest_cohort(
    storage: LocalStorage,
    settings: Settings,
    tenant: str,
    cohort_id: str,
    zip_path: Path,
    deadline: Callable[[], None] | None = None,
) -> CohortRecord:
    """Extract, validate and store a cohort; return its record. Leaves nothing behind on error.

    Everything happens in the upload's staging folder, which is renamed into place only once the
    cohort is valid; the engine's preprocessing cache (keyed by file contents, not paths) is built in
    the cohort's cache folder, where the worker finds it later.
    """
    staging = zip_path.parent
    files = staging / "files"
    cache = storage.cache_dir(tenant, cohort_id)
    try:
        files.mkdir()
        try:
            room = room_left(storage, settings, tenant) + zip_path.stat().st_size  # the zip goes after
            size = extract_zip(zip_path, files, limits(settings), room=room, deadline=deadline)
        except ArchiveError as e:
            raise ApiError(e.status, "archive rejected", e.problems) from None
        zip_path.unlink()
        summary = validate_cohort(files, cache, deadline)
        storage.commit(tenant, "cohorts", cohort_id, staging)
        record = CohortRecord.model_validate(
            {**summary, "id": cohort_id, "root": files.name, "size_bytes": size, "created_at": now_iso()}
        )
        storage.write(tenant, record)  # the cohort is visible from here on
        return record
    except BaseException:
        shutil.rmtree(storage.path(tenant, "cohorts", cohort_id), ignore_errors=True)
        shutil.rmtree(cache, ignore_errors=True)
        raise


def validate_cohort(root: Path, cache_dir: Path, deadline: Callable[[], None] | None = None) -> dict:
    """The engine's header and voxel validation (torch-free ``imaging.ingest``, the step every training
    starts with; its cache is keyed by file contents, so the worker reuses it); 422 with every problem."""
    from imaging.errors import CohortError
    from imaging.ingest import ingest

    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        progress = (lambda _p: deadline()) if deadline is not None else None
        return ingest(root, cache_dir=cache_dir, progress=progress).summary
    except CohortError as e:
        problems = [
            (scrub(p.file, root) if p.file != "." else UPLOAD, scrub(p.problem, root)) for p in e.problems
        ]
        raise ApiError(422, "cohort rejected", problems) from None


def scrub(text: str, root: Path) -> str:
    """Never show a server path: the upload's folder becomes nothing (paths are relative to the zip)."""
    for form in {str(root.resolve()), str(root)}:
        text = text.replace(form + "/", "").replace(form, "<upload>")
    return text
