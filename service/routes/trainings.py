"""Trainings: train (or fine-tune) a model on a cohort."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header
from fastapi.responses import JSONResponse

from contract import tasks
from contract.schemas import ErrorOut, JobAccepted, JobKind, JobProgress, TrainingRequest, TrainTask
from contract.storage import new_id
from service.deps import Ctx, Tenant
from service.idempotency import fingerprint
from service.lookups import check_max, create_model_record, require_cohort, require_model
from service.submit import accepted, submit

router = APIRouter(prefix="/v1/trainings", tags=["trainings"])
ERRORS = {
    401: {"model": ErrorOut},
    404: {"model": ErrorOut},
    409: {"model": ErrorOut},
    503: {"model": ErrorOut},
}


@router.post("", status_code=202, response_model=JobAccepted, responses=ERRORS)
def create_training(
    body: TrainingRequest,
    ctx: Ctx,
    tenant: Tenant,
    idempotency_key: Annotated[str | None, Header()] = None,
) -> JSONResponse:
    """Start a training job; its model id is reserved now and becomes ready when the job succeeds."""

    def handler() -> JSONResponse:
        check_max(body.steps, ctx.settings.max_steps, "steps")
        require_cohort(ctx, tenant, body.cohort_id)
        if body.base_model_id:
            require_model(ctx, tenant, body.base_model_id)
        job_id, model_id = new_id("job"), new_id("mdl")
        create_model_record(
            ctx,
            tenant,
            model_id,
            source="training",
            job_id=job_id,
            cohort_id=body.cohort_id,
            base_model_id=body.base_model_id,
            model=body.model,
            preset=body.preset,
            steps=body.steps,
            seed=body.seed,
        )
        payload = TrainTask(job_id=job_id, tenant=tenant, model_id=model_id, **body.model_dump())
        submit(
            ctx,
            task=tasks.TRAIN,
            kind=JobKind.training,
            payload=payload,
            request=body.model_dump(),
            progress=JobProgress(total=body.steps, unit="steps", stage="queued"),
            cohort_id=body.cohort_id,
            model_id=model_id,
        )
        return accepted(job_id, JobKind.training, model_id)

    return ctx.idempotency.run(tenant, idempotency_key, fingerprint(body.model_dump_json()), handler)
