"""Where cohorts, models and outputs live: one small interface, one local-filesystem implementation.

Layout under ``DHVAE_DATA_DIR`` (one folder per tenant, nothing shared between tenants)::

    tenants/<tenant>/cohorts/<cohort_id>/record.json, files/...     the uploaded cohort, extracted
    tenants/<tenant>/models/<model_id>/record.json, model.pt, ...   written by the engine's train()
    tenants/<tenant>/outputs/<job_id>/imagesTr, labelsTr, ...       generated / augmented datasets
    tenants/<tenant>/cache/<cohort_id>/                             the engine's preprocessing cache
    tenants/<tenant>/staging/<random>/                              uploads in progress (same disk)

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
from typing import Literal, Protocol

Kind = Literal["cohorts", "models", "outputs"]
KINDS: tuple[Kind, ...] = ("cohorts", "models", "outputs")
RECORD = "record.json"

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


class Storage(Protocol):
    def path(self, tenant: str, kind: Kind, obj_id: str) -> Path: ...
    def exists(self, tenant: str, kind: Kind, obj_id: str) -> bool: ...
    def list_ids(self, tenant: str, kind: Kind) -> list[str]: ...
    def read_record(self, tenant: str, kind: Kind, obj_id: str) -> dict | None: ...
    def write_record(self, tenant: str, kind: Kind, obj_id: str, record: dict) -> None: ...
    def new_staging(self, tenant: str) -> Path: ...
    def commit(self, tenant: str, kind: Kind, obj_id: str, staged: Path) -> Path: ...
    def delete(self, tenant: str, kind: Kind, obj_id: str) -> bool: ...
    def cache_dir(self, tenant: str, cohort_id: str) -> Path: ...


class LocalStorage:
    """The local-filesystem ``Storage``: everything under ``root/tenants/<tenant>/``."""

    def __init__(self, root: Path):
        self.root = Path(root).resolve()

    # ------------------------------------------------------------------ paths
    def tenant_dir(self, tenant: str) -> Path:
        return self.root / "tenants" / check_tenant(tenant)

    def path(self, tenant: str, kind: Kind, obj_id: str) -> Path:
        if kind not in KINDS:
            raise ValueError(f"unknown kind {kind!r}")
        return self.tenant_dir(tenant) / kind / check_id(obj_id)

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

    def read_record(self, tenant: str, kind: Kind, obj_id: str) -> dict | None:
        try:
            return json.loads((self.path(tenant, kind, obj_id) / RECORD).read_text())
        except (FileNotFoundError, NotADirectoryError, ValueError):
            return None

    def write_record(self, tenant: str, kind: Kind, obj_id: str, record: dict) -> None:
        folder = self.path(tenant, kind, obj_id)
        folder.mkdir(parents=True, exist_ok=True)
        _atomic_write(folder / RECORD, json.dumps(record, indent=1, sort_keys=True, default=str))

    def new_staging(self, tenant: str) -> Path:
        staging = self.staging_dir(tenant) / uuid.uuid4().hex
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


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
