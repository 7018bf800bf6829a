"""Creating a job: its record in Redis first, then the Celery message, by task name."""

from __future__ import annotations

import logging

from fastapi.responses import JSONResponse

from contract.records import JobRecord, ModelRecord
from contract.schemas import (
    DONOR_OF,
    UNTRAINED,
    AugmentationRequest,
    AugmentTask,
    ErrorOut,
    JobAccepted,
    JobError,
    JobKind,
    JobProgress,
    ModelStatus,
    TaskPayload,
    TrainingRequest,
    TrainTask,
)
from runtime.storage import new_id
from service.deps import Context
from service.errors import ApiError, Responses
from service.lookups import check_max, create_model_record, require_cohort, require_model

log = logging.getLogger(__name__)

DATASET_KINDS = {JobKind.generation, JobKind.augmentation}
# What a POST that starts a job can answer besides 202 (and 422 for a bad body).
SUBMIT_ERRORS: Responses = {
    404: {"model": ErrorOut, "description": "The cohort or model is not one of yours"},
    409: {"model": ErrorOut, "description": "The model is not ready"},
    429: {"model": ErrorOut, "description": "Too many of your jobs are queued or running (Retry-After)"},
    503: {"model": ErrorOut, "description": "The job queue is unavailable (Retry-After)"},
}


def job_links(job_id: str, kind: JobKind, model_id: str | None = None) -> dict[str, str]:
    links = {"self": f"/v1/jobs/{job_id}", "events": f"/v1/jobs/{job_id}/events"}
    if kind in DATASET_KINDS:
        links["download"] = f"/v1/jobs/{job_id}/download"
        links["preview"] = f"/v1/jobs/{job_id}/preview.png"
    if kind == JobKind.evaluation:
        links["report"] = f"/v1/jobs/{job_id}/report.json"
        links["plot"] = f"/v1/jobs/{job_id}/report.png"
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
    warnings: list[str] | None = None,
) -> None:
    """Record the job (queued), then enqueue it; 503 (and the job failed) if the broker is down, 429
    if the tenant already has ``max_active_jobs`` queued or running (work is shared between tenants by
    this cap: one tenant cannot fill the queue ahead of the others)."""
    active = len(ctx.jobs.active_for(payload.tenant))
    if active >= ctx.settings.max_active_jobs:
        raise ApiError(
            429,
            f"you have {active} jobs queued or running, the most this service runs for one tenant; "
            "retry when one has finished, or cancel one",
            headers={"Retry-After": "30"},
        )
    ctx.jobs.create(
        payload.job_id,
        tenant=payload.tenant,
        kind=kind,
        request=request,
        cohort_id=cohort_id,
        model_id=model_id,
        progress=progress,
        warnings=warnings,
    )
    try:
        ctx.celery.send_task(
            task, kwargs={"payload": payload.model_dump()}, task_id=payload.job_id, queue=ctx.settings.queue
        )
    except Exception as e:  # kombu raises several connection error types
        log.exception("could not enqueue %s", payload.job_id)
        ctx.jobs.fail(payload.job_id, JobError(type="QueueUnavailable", message=str(e)))
        raise ApiError(503, "the job queue is unavailable; retry later") from None


def end_unstarted(ctx: Context, tenant: str, rec: JobRecord) -> None:
    """A job cancelled while still queued never reaches a worker's cleanup: leave its model in a
    terminal state, and nothing staged, here (a worker that gets its message later finds it cancelled)."""
    if not rec.model_id:
        return
    if rec.kind == JobKind.model_import:  # staged under the job's id (routes/models.py)
        ctx.storage.discard_import(tenant, rec.model_id, ctx.storage.staging_dir(tenant) / rec.id)
    elif rec.kind in (JobKind.training, JobKind.augmentation):
        model = ctx.storage.read(tenant, ModelRecord, rec.model_id)
        if model is not None and model.status == ModelStatus.training:
            ctx.storage.end_model(tenant, rec.model_id, ModelStatus.cancelled)


def accepted(job_id: str, kind: JobKind, model_id: str | None = None) -> JSONResponse:
    body = JobAccepted(job_id=job_id, model_id=model_id, links=job_links(job_id, kind, model_id))
    return JSONResponse(
        body.model_dump(exclude_none=False), status_code=202, headers={"Location": f"/v1/jobs/{job_id}"}
    )


def submit_model_job(
    ctx: Context,
    tenant: str,
    body: TrainingRequest | AugmentationRequest,
    *,
    task: str,
    kind: JobKind,
    payload_cls: type[TrainTask] | type[AugmentTask],
) -> JSONResponse:
    """A job that trains a model (a training or an augmentation): check the request against the
    tenant's cohorts and models, reserve the model id (ready when the job succeeds), enqueue, 202.
    An augmentation by a generator that trains nothing (``UNTRAINED``) reserves no model."""
    check_max(body.steps, ctx.settings.max_steps, "steps")
    require_cohort(ctx, tenant, body.cohort_id)
    if body.base_model_id:
        if body.model in UNTRAINED:
            raise ApiError(422, f"{body.model} trains nothing: it cannot fine-tune base_model_id")
        require_model(ctx, tenant, body.base_model_id)
    job_id = new_id("job")
    model_id = None if body.model in UNTRAINED else new_id("mdl")
    request = body.model_dump()
    if model_id:
        described = {k: v for k, v in request.items() if k in ModelRecord.model_fields}
        # a donor insertion's model is the generator it trains for its tumours
        described["model"] = DONOR_OF.get(body.model, body.model)
        create_model_record(ctx, tenant, model_id, source="training", job_id=job_id, **described)
    try:
        submit(
            ctx,
            task=task,
            kind=kind,
            payload=payload_cls(job_id=job_id, tenant=tenant, model_id=model_id, **request),
            request=request,
            progress=JobProgress(total=body.steps, unit="steps", stage="queued"),
            cohort_id=body.cohort_id,
            model_id=model_id,
        )
    except ApiError:  # no job will ever fill the reserved model: it goes too
        if model_id:
            ctx.storage.delete(tenant, "models", model_id)
        raise
    return accepted(job_id, kind, model_id)
