"""The records the API and the workers read and write, typed: ``record.json`` of each stored cohort
and model (written through ``runtime.storage.LocalStorage``) and each job's Redis hash (``runtime.jobs``).

Written there and nowhere else, so no dict key is shared by
convention: a field is declared here once and both sides see the same type and default.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, Field

from contract.schemas import CohortOut, JobError, JobKind, JobOut, JobProgress, JobState, ModelOut


class CohortRecord(CohortOut):
    """A stored cohort: its public view plus where its files are inside the cohort's folder."""

    root: str = Field("files", description="Folder of the extracted cohort, relative to the cohort's folder.")


class ModelRecord(ModelOut):
    """A model (trained here or imported): the public view is the whole record."""


Record = CohortRecord | ModelRecord


class JobRecord(BaseModel):
    """A job as ``runtime/jobs.py`` keeps it in its Redis hash (every value a string there; typed here).

    The hash's field names are the names below; only ``runtime/jobs.py`` reads or writes the hash.
    """

    id: str
    tenant: str
    kind: JobKind
    state: JobState
    progress: JobProgress = Field(default_factory=JobProgress)
    error: JobError | None = None
    created_at: str
    started_at: str | None = None
    finished_at: str | None = None
    cohort_id: str | None = None
    model_id: str | None = None
    request: dict[str, Any] = Field(default_factory=dict)
    cancel: bool = Field(
        False, description="A cancel was requested; the running task stops at its next step."
    )
    attempts: int = 0
    worker: str = ""
    warnings: list[str] = Field(default_factory=list)

    @classmethod
    def new(
        cls,
        job_id: str,
        *,
        tenant: str,
        kind: JobKind,
        request: dict[str, Any],
        created_at: str,
        cohort_id: str | None = None,
        model_id: str | None = None,
        progress: JobProgress | None = None,
        warnings: list[str] | None = None,
    ) -> JobRecord:
        """A job just accepted: queued, with the progress the API shows until a worker reports."""
        return cls(
            id=job_id,
            tenant=tenant,
            kind=kind,
            state=JobState.queued,
            progress=progress or JobProgress(),
            created_at=created_at,
            cohort_id=cohort_id,
            model_id=model_id,
            request=request,
            warnings=warnings or [],
        )

    @classmethod
    def from_hash(cls, fields: Mapping[str, str]) -> JobRecord:
        """The record of a decoded Redis hash (or of an event: the hash's fields after a change)."""
        f = dict(fields)
        return cls(
            id=f["id"],
            tenant=f["tenant"],
            kind=JobKind(f["kind"]),
            state=JobState(f["state"]),
            progress=JobProgress.model_validate_json(f.get("progress") or "{}"),
            error=JobError.model_validate_json(f["error"]) if f.get("error") else None,
            created_at=f["created_at"],
            started_at=f.get("started_at") or None,
            finished_at=f.get("finished_at") or None,
            cohort_id=f.get("cohort_id") or None,
            model_id=f.get("model_id") or None,
            request=json.loads(f.get("request") or "{}"),
            cancel=f.get("cancel") == "1",
            attempts=int(f.get("attempts") or 0),
            worker=f.get("worker", ""),
            warnings=json.loads(f.get("warnings") or "[]"),
        )

    def to_hash(self) -> dict[str, str]:
        """The inverse of :meth:`from_hash`: the Redis hash's string fields."""
        return {
            "id": self.id,
            "tenant": self.tenant,
            "kind": self.kind.value,
            "state": self.state.value,
            "progress": self.progress.model_dump_json(),
            "error": self.error.model_dump_json() if self.error else "",
            "created_at": self.created_at,
            "started_at": self.started_at or "",
            "finished_at": self.finished_at or "",
            "cohort_id": self.cohort_id or "",
            "model_id": self.model_id or "",
            "request": json.dumps(self.request, sort_keys=True),
            "cancel": "1" if self.cancel else "0",
            "attempts": str(self.attempts),
            "worker": self.worker,
            "warnings": json.dumps(self.warnings),
        }

    def out(self, links: dict[str, str] | None = None) -> JobOut:
        """The public view (the ``GET /v1/jobs/{id}`` body and every SSE event): no tenant, no worker."""
        return JobOut(
            id=self.id,
            kind=self.kind,
            state=self.state,
            progress=self.progress,
            error=self.error,
            created_at=self.created_at,  # pydantic parses the ISO strings
            started_at=self.started_at,
            finished_at=self.finished_at,
            links=links or {},
            cohort_id=self.cohort_id,
            model_id=self.model_id,
            cancel_requested=self.cancel,
            attempts=self.attempts,
            request=self.request,
            warnings=self.warnings,
        )
