"""Where cohorts, models and outputs live: one small interface, one local-filesystem implementation.

Layout under ``DHVAE_DATA_DIR`` (one folder per tenant, nothing shared between tenants)::

    tenants/<tenant>/cohorts/<cohort_id>/record.json, files/...     the uploaded cohort, extracted
    tenants/<tenant>/models/<model_id>/record.json, model.pt, ...   written by the engine's train()
    tenants/<tenant>/outputs/<job_id>/imagesTr, labelsTr, ...       generated / augmented datasets
    tenants/<tenant>/cache/<cohort_id>/                             the engine's preprocessing cache
    tenants/<tenant>/staging/<job_id or random>/                    uploads in progress (same disk)

Objects appear atomically (a staged folder renamed into place) and disappear atomically (renamed away,
then removed), so a reader never sees half an object. The engine works on local paths, so a shared
or object store replacing this class would materialise objects on the worker's disk in ``path``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Literal, TypeVar

from contract.records import CohortRecord, ModelRecord, Record
from contract.schemas import ModelStatus
from imaging.files import atomic_file

Kind = Literal["cohorts", "models", "outputs"]
R = TypeVar("R", CohortRecord, ModelRecord)
RECORD_KIND: dict[type, Kind] = {CohortRecord: "cohorts", ModelRecord: "models"}
KINDS: tuple[Kind, ...] = ("cohorts", "models", "outputs")
RECORD = "record.json"
WEIGHT_FILES = ("model.pt", "last.pt")  # a model's final weights and its training's resume point

_TENANT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_ID_RE = re.compile(r"^[a-z]{3}_[0-9a-f]{32}$")


def check_tenant(tenant: str) -> str:
    if not _TENANT_RE.match(tenant) or ".." in tenant:
        raise ValueError(f"invalid tenant name {tenant!r}: use letters, digits, '_', '-', '.' (max 64)")
    return tenant


def check_id(obj_id: str) -> str:
    if not _ID_RE.match(obj_id):
        raise ValueError(f"invalid id {obj_id!r}")
    return obj_id


def new_id(prefix: str) -> str:
    """``coh_``, ``mdl_`` or ``job_`` + 32 hex digits."""
    return f"{prefix}_{uuid.uuid4().hex}"


class LocalStorage:
    """Cohorts, models and outputs on the local filesystem: everything under ``root/tenants/<tenant>/``."""

    def __init__(self, root: Path):
        self.root = Path(root).resolve()

    # ------------------------------------------------------------------ paths
    def tenant_dir(self, tenant: str) -> Path:
        return self.root / "tenants" / check_tenant(tenant)

    def path(self, tenant: str, kind: Kind, obj_id: str) -> Path:
        if kind not in KINDS:
            raise ValueError(f"unknown kind {kind!r}")
        return self.tenant_dir(tenant) / kind / check_id(obj_id)

    def usage(self, tenant: str) -> int:
        """Bytes the tenant stores now: every file of its folder (uploads in progress included)."""
        total = 0
        for folder, _dirs, names in os.walk(self.tenant_dir(tenant)):
            for name in names:
                try:
                    total += os.lstat(os.path.join(folder, name)).st_size
                except FileNotFoundError:  # removed while we walked
                    continue
        return total

    def cache_dir(self, tenant: str, cohort_id: str) -> Path:
        return self.tenant_dir(tenant) / "cache" / check_id(cohort_id)

    def staging_dir(self, tenant: str) -> Path:
        return self.tenant_dir(tenant) / "staging"

    # ------------------------------------------------------------------ objects
    def exists(self, tenant: str, kind: Kind, obj_id: str) -> bool:
        return (self.path(tenant, kind, obj_id) / RECORD).is_file()

    def list_ids(self, tenant: str, kind: Kind) -> list[str]:
        base = self.tenant_dir(tenant) / kind
        if not base.is_dir():
            return []
        return sorted(p.name for p in base.iterdir() if _ID_RE.match(p.name) and (p / RECORD).is_file())

    def read(self, tenant: str, cls: type[R], obj_id: str) -> R | None:
        """The record of a cohort or model, or None if there is none (or it is unreadable)."""
        try:
            text = (self.path(tenant, RECORD_KIND[cls], obj_id) / RECORD).read_text()
            return cls.model_validate_json(text)
        except (FileNotFoundError, NotADirectoryError, ValueError):
            return None

    def write(self, tenant: str, record: Record) -> None:
        folder = self.path(tenant, RECORD_KIND[type(record)], record.id)
        folder.mkdir(parents=True, exist_ok=True)
        data = json.loads(record.model_dump_json())
        with atomic_file(folder / RECORD, "w") as f:
            f.write(json.dumps(data, indent=1, sort_keys=True))

    def update_model(self, tenant: str, model_id: str, **fields: object) -> ModelRecord:
        """Change some fields of a model's record (a worker finishing its job); the rest stays."""
        record = self.read(tenant, ModelRecord, model_id)
        if record is None:
            raise FileNotFoundError(f"model {model_id} has no record")
        updated = ModelRecord.model_validate({**record.model_dump(), **fields})
        self.write(tenant, updated)
        return updated

    def end_model(self, tenant: str, model_id: str, status: ModelStatus) -> None:
        """A model whose job failed or was cancelled: its weights go, its record says so (idempotent)."""
        model_dir = self.path(tenant, "models", model_id)
        for name in WEIGHT_FILES:
            (model_dir / name).unlink(missing_ok=True)
        self.update_model(tenant, model_id, status=status)

    def discard_import(self, tenant: str, model_id: str, staged: Path) -> None:
        """An import that never became a model: no model record, no staged upload (idempotent)."""
        self.delete(tenant, "models", model_id)
        self.remove_tree(tenant, staged)

    def cohort_files(self, tenant: str, record: CohortRecord) -> Path:
        """The folder holding a stored cohort's files."""
        return self.path(tenant, "cohorts", record.id) / record.root

    def new_staging(self, tenant: str, name: str | None = None) -> Path:
        """A new folder for an upload in progress (named ``name``, e.g. its job's id, or at random)."""
        staging = self.staging_dir(tenant) / (check_id(name) if name else uuid.uuid4().hex)
        staging.mkdir(parents=True)
        return staging

    def commit(self, tenant: str, kind: Kind, obj_id: str, staged: Path) -> Path:
        """Move a staged folder (from ``new_staging``) into place in one rename."""
        target = self.path(tenant, kind, obj_id)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.rename(staged, target)  # fails if target exists: ids are never reused
        return target

    def delete(self, tenant: str, kind: Kind, obj_id: str) -> bool:
        """Remove an object (and, for a cohort, its cache). False if there was nothing."""
        found = self._remove(self.path(tenant, kind, obj_id), tenant)
        if kind == "cohorts":
            self._remove(self.cache_dir(tenant, obj_id), tenant)
        return found

    def remove_tree(self, tenant: str, path: Path) -> None:
        """Remove a folder of this tenant (a staging area, a partial output) atomically."""
        path = Path(path).resolve()
        if not path.is_relative_to(self.tenant_dir(tenant)):
            raise ValueError(f"{path} is outside tenant {tenant}'s storage")
        self._remove(path, tenant)

    def _remove(self, path: Path, tenant: str) -> bool:
        if not path.exists():
            return False
        trash = self.staging_dir(tenant) / f"trash-{uuid.uuid4().hex}"
        trash.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(path, trash)
        except FileNotFoundError:
            return False
        shutil.rmtree(trash, ignore_errors=True)
        return True
