"""Creating a job: its record in Redis first, then the Celery message, by task name."""

from __future__ import annotations

import logging

from fastapi.responses import JSONResponse

from contract.schemas import JobAccepted, JobError, JobKind, JobProgress, TaskPayload
from service.deps import Context
from service.errors import ApiError

log = logging.getLogger(__name__)

DATASET_KINDS = {JobKind.generation.value, JobKind.augmentation.value}


def job_links(job_id: str, kind: str, model_id: str | None = None) -> dict[str, str]:
    links = {"self": f"/v1/jobs/{job_id}", "events": f"/v1/jobs/{job_id}/events"}
    if kind in DATASET_KINDS:
        links["download"] = f"/v1/jobs/{job_id}/download"
        links["preview"] = f"/v1/jobs/{job_id}/preview.png"
    if model_id:
        links["model"] = f"/v1/models/{model_id}"
    return links


def submit(
    ctx: Context,
    *,
    task: str,
    kind: JobKind,
    payload: TaskPayload,
    request: dict,
    progress: JobProgress,
    cohort_id: str | None = None,
    model_id: str | None = None,
) -> None:
    """Record the job (queued), then enqueue it; 503 (and the job failed) if the broker is down."""
    ctx.jobs.create(
        payload.job_id,
        tenant=payload.tenant,
        kind=kind,
        request=request,
        cohort_id=cohort_id,
        model_id=model_id,
        progress=progress,
    )
    try:
        ctx.celery.send_task(
            task, kwargs={"payload": payload.model_dump()}, task_id=payload.job_id, queue=ctx.settings.queue
        )
    except Exception as e:  # kombu raises several connection error types
        log.exception("could not enqueue %s", payload.job_id)
        ctx.jobs.fail(payload.job_id, JobError(type="QueueUnavailable", message=str(e)))
        raise ApiError(503, "the job queue is unavailable; retry later") from None


def accepted(job_id: str, kind: JobKind, model_id: str | None = None) -> JSONResponse:
    body = JobAccepted(job_id=job_id, model_id=model_id, links=job_links(job_id, kind.value, model_id))
    return JSONResponse(
        body.model_dump(exclude_none=False), status_code=202, headers={"Location": f"/v1/jobs/{job_id}"}
    )
