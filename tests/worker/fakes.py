"""An in-memory JobStore: the job records and leases of runtime/jobs.py without Redis, for the fast
worker tests. ``tests/worker/test_tasks.py`` checks that its methods have the real ones' signatures."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable, Mapping

from contract.records import JobRecord
from contract.schemas import TERMINAL_STATES, JobError, JobKind, JobProgress, JobState
from runtime.jobs import now_iso


class FakeJobStore:
    def __init__(self) -> None:
        self.records: dict[str, dict[str, str]] = {}
        self.events: dict[str, list[dict[str, str]]] = {}
        self.leases: dict[str, str] = {}

    # ------------------------------------------------------------------ API side
    def create(
        self,
        job_id: str,
        *,
        tenant: str,
        kind: JobKind,
        request: dict,
        cohort_id: str | None = None,
        model_id: str | None = None,
        progress: JobProgress | None = None,
        warnings: list[str] | None = None,
    ) -> JobRecord:
        rec = JobRecord.new(
            job_id,
            tenant=tenant,
            kind=kind,
            request=request,
            created_at=now_iso(),
            cohort_id=cohort_id,
            model_id=model_id,
            progress=progress,
            warnings=warnings,
        )
        self.records[job_id] = rec.to_hash()
        self.events[job_id] = [{"event": "state", **rec.to_hash()}]
        return rec

    def get(self, job_id: str, tenant: str | None = None) -> JobRecord | None:
        rec = self.records.get(job_id)
        if rec is None or (tenant is not None and rec["tenant"] != tenant):
            return None
        return JobRecord.from_hash(rec)

    def request_cancel(self, job_id: str) -> JobRecord | None:
        if self.transition(job_id, {JobState.queued}, JobState.cancelled):
            return self.get(job_id)
        self.update(job_id, {"cancel": "1"}, allowed={JobState.running}, event="cancel_requested")
        return self.get(job_id)

    # ------------------------------------------------------------------ worker side
    def update(
        self,
        job_id: str,
        fields: Mapping[str, str],
        *,
        allowed: Iterable[JobState] | None = None,
        event: str = "progress",
    ) -> int:
        rec = self.records.get(job_id)
        if rec is None:
            return -1
        if allowed is not None and rec["state"] not in {s.value for s in allowed}:
            return 0
        rec.update(fields)
        self.events[job_id].append({"event": event, **rec})
        return 1

    def transition(
        self, job_id: str, allowed: Iterable[JobState], to: JobState, fields: Mapping[str, str] | None = None
    ) -> bool:
        extra = {**(fields or {}), "state": to.value}
        if to == JobState.running:
            extra.setdefault("started_at", now_iso())
        if to in TERMINAL_STATES:
            extra["finished_at"] = now_iso()
        return self.update(job_id, extra, allowed=allowed, event="state") == 1

    def set_progress(self, job_id: str, progress: JobProgress) -> bool:
        return self.update(job_id, {"progress": progress.model_dump_json()}, allowed={JobState.running}) == 1

    def fail(self, job_id: str, error: JobError) -> bool:
        return self.transition(
            job_id, {JobState.queued, JobState.running}, JobState.failed, {"error": error.model_dump_json()}
        )

    def add_warnings(self, job_id: str, warnings: list[str]) -> None:
        rec = self.get(job_id)
        if rec is not None and warnings:
            merged = json.dumps([*rec.warnings, *warnings])
            self.update(job_id, {"warnings": merged}, allowed={JobState.running}, event="warning")

    def count_attempt(self, job_id: str) -> int:
        rec = self.records[job_id]
        rec["attempts"] = str(int(rec["attempts"]) + 1)
        return int(rec["attempts"])

    def cancel_requested(self, job_id: str) -> bool:
        return self.records.get(job_id, {}).get("cancel") == "1"

    # ------------------------------------------------------------------ leases
    def acquire_lease(self, job_id: str, lease_s: float, wait_s: float = 0.0) -> str | None:
        if job_id in self.leases:
            return None
        self.leases[job_id] = token = uuid.uuid4().hex
        return token

    def renew_lease(self, job_id: str, token: str, lease_s: float) -> bool:
        return self.leases.setdefault(job_id, token) == token

    def release_lease(self, job_id: str, token: str) -> None:
        if self.leases.get(job_id) == token:
            del self.leases[job_id]

    def lease_holder(self, job_id: str) -> str | None:
        return self.leases.get(job_id)

    # ------------------------------------------------------------------ for the tests
    def state(self, job_id: str) -> JobState:
        return JobState(self.records[job_id]["state"])

    def error(self, job_id: str) -> JobError | None:
        raw = self.records[job_id]["error"]
        return JobError.model_validate_json(raw) if raw else None

    def stages(self, job_id: str) -> list[str]:
        """The progress stages the job went through, in order, each once."""
        seen: list[str] = []
        for e in self.events[job_id]:
            stage = JobProgress.model_validate_json(e["progress"]).stage
            if stage and (not seen or seen[-1] != stage):
                seen.append(stage)
        return seen
