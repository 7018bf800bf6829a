"""Trainings: fit a generator (or fine-tune a model) on a cohort; the result is a model."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Response
from fastapi.responses import JSONResponse

from contract import tasks
from contract.schemas import JobAccepted, JobKind, TrainingRequest, TrainTask
from service.deps import Ctx, Tenant
from service.errors import AUTHED
from service.idempotency import fingerprint
from service.submit import SUBMIT_ERRORS, submit_model_job

router = APIRouter(prefix="/v1/trainings", tags=["trainings"], responses=AUTHED)


@router.post("", status_code=202, response_model=JobAccepted, responses=SUBMIT_ERRORS)
def create_training(
    body: TrainingRequest,
    ctx: Ctx,
    tenant: Tenant,
    idempotency_key: Annotated[str | None, Header()] = None,
) -> Response:
    """Start a training job; its model id is reserved now and becomes ready when the job succeeds."""

    def handler() -> JSONResponse:
        return submit_model_job(
            ctx, tenant, body, task=tasks.TRAIN, kind=JobKind.training, payload_cls=TrainTask
        )

    return ctx.idempotency.run(tenant, idempotency_key, fingerprint(body.model_dump_json()), handler)
