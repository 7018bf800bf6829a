"""Evaluations: does augmenting this cohort help, and with how many pairs? (efficacy/grid.py)"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Response
from fastapi.responses import JSONResponse

from contract import tasks
from contract.schemas import EvaluateTask, EvaluationRequest, JobAccepted, JobKind, JobProgress
from runtime.storage import new_id
from service.deps import Ctx, Tenant
from service.errors import ApiError
from service.idempotency import fingerprint
from service.lookups import check_max, require_cohort, require_model
from service.submit import SUBMIT_ERRORS, accepted, submit

router = APIRouter(prefix="/v1/evaluations", tags=["evaluations"])


@router.post("", status_code=202, response_model=JobAccepted, responses=SUBMIT_ERRORS)
def create_evaluation(
    body: EvaluationRequest,
    ctx: Ctx,
    tenant: Tenant,
    idempotency_key: Annotated[str | None, Header()] = None,
) -> Response:
    """Split the cohort by patient, fit the generator on the training patients (or use ``model_id``),
    train a U-Net on real + N synthetic slices for every N, seed and protocol, test it on the held-out
    patients. The result: ``links.report`` (JSON: rows, summary, verdict) and ``links.plot`` (PNG)."""

    def handler() -> JSONResponse:
        for n in body.n_pairs:
            check_max(n, ctx.settings.max_pairs, "n_pairs")
        check_max(body.n_runs(), ctx.settings.max_evaluation_runs, "U-Net runs (N x seeds x protocols)")
        require_cohort(ctx, tenant, body.cohort_id)
        generator: str = body.model
        if body.model_id:
            model = require_model(ctx, tenant, body.model_id)
            if model.cohort_id == body.cohort_id:
                raise ApiError(
                    409,
                    f"model {body.model_id} was trained on cohort {body.cohort_id}: its test patients would "
                    "have reached the generator. Omit model_id to fit one on the training patients only.",
                )
            generator = model.model or "dhvae"
        else:
            check_max(body.steps, ctx.settings.max_steps, "steps")
        job_id = new_id("job")
        request = body.model_dump()
        payload = EvaluateTask(
            job_id=job_id,
            tenant=tenant,
            **{
                **request,
                "model": generator,
                "seeds": body.seed_list(),
                "n_pairs": sorted(set(body.n_pairs)),
                "protocols": list(dict.fromkeys(body.protocols)),
            },
        )
        submit(
            ctx,
            task=tasks.EVALUATE,
            kind=JobKind.evaluation,
            payload=payload,
            request=request,
            progress=JobProgress(total=body.n_runs(), unit="runs", stage="queued"),
            cohort_id=body.cohort_id,
            model_id=body.model_id,
        )
        return accepted(job_id, JobKind.evaluation)

    return ctx.idempotency.run(tenant, idempotency_key, fingerprint(body.model_dump_json()), handler)
