"""Generations: N synthetic image + mask pairs from a ready model."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Response
from fastapi.responses import JSONResponse

from contract import tasks
from contract.schemas import GenerateTask, GenerationRequest, JobAccepted, JobKind, JobProgress
from runtime.storage import new_id
from service.deps import Ctx, Tenant
from service.errors import AUTHED
from service.idempotency import fingerprint
from service.lookups import check_max, require_model
from service.submit import SUBMIT_ERRORS, accepted, submit

router = APIRouter(prefix="/v1/generations", tags=["generations"], responses=AUTHED)


@router.post("", status_code=202, response_model=JobAccepted, responses=SUBMIT_ERRORS)
def create_generation(
    body: GenerationRequest,
    ctx: Ctx,
    tenant: Tenant,
    idempotency_key: Annotated[str | None, Header()] = None,
) -> Response:
    """Start a generation job; download its pairs as they are produced from ``links.download``."""

    def handler() -> JSONResponse:
        check_max(body.n_pairs, ctx.settings.max_pairs, "n_pairs")
        model = require_model(ctx, tenant, body.model_id)
        job_id = new_id("job")
        payload = GenerateTask(job_id=job_id, tenant=tenant, **body.model_dump())
        submit(
            ctx,
            task=tasks.GENERATE,
            kind=JobKind.generation,
            payload=payload,
            request=body.model_dump(),
            progress=JobProgress(total=body.n_pairs, unit="pairs", stage="queued"),
            cohort_id=model.cohort_id,
            model_id=body.model_id,
        )
        return accepted(job_id, JobKind.generation)

    return ctx.idempotency.run(tenant, idempotency_key, fingerprint(body.model_dump_json()), handler)
