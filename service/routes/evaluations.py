"""Evaluations: does augmenting this cohort help, and with how many pairs? (efficacy/grid.py)"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Response
from fastapi.responses import JSONResponse

from contract import tasks
from contract.schemas import EvaluateTask, EvaluationRequest, JobAccepted, JobKind, JobProgress
from imaging.cohort import fold_training_patients, split_sizes
from runtime.storage import new_id
from service.deps import Ctx, Tenant
from service.errors import AUTHED, ApiError
from service.idempotency import fingerprint
from service.lookups import check_max, require_cohort, require_model
from service.submit import SUBMIT_ERRORS, accepted, submit

router = APIRouter(prefix="/v1/evaluations", tags=["evaluations"], responses=AUTHED)
MIN_TRAIN_PATIENTS, MIN_TEST_PATIENTS = 2, 2  # below these an evaluation runs, with a warning


def split_warnings(n_patients: int, test_fraction: float) -> list[str]:
    """422 for a cohort that cannot be split by patient; warnings for a split too small to mean much.

    The split sizes are the engine's (:func:`imaging.cohort.split_sizes`)."""
    if n_patients < 2:
        raise ApiError(
            422,
            f"the cohort has {n_patients} patient: an evaluation tests on patients the generator never saw, "
            "so it needs at least 2 (better 6 or more)",
        )
    n_train, n_test = split_sizes(n_patients, test_fraction)
    warnings = []
    if n_train < MIN_TRAIN_PATIENTS:
        warnings.append(
            f"only {n_train} training patient(s): the generator and the U-Net learn from one patient's "
            "anatomy; the result says little about a larger cohort"
        )
    if n_test < MIN_TEST_PATIENTS:
        warnings.append(
            f"only {n_test} test patient(s) of {n_patients}: the Dice intervals describe the seeds, not "
            "patients; treat the result as a smoke test"
        )
    return warnings


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
        cohort = require_cohort(ctx, tenant, body.cohort_id)
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
        if body.design == "crossval":
            check_max(body.max_steps, ctx.settings.max_steps, "max_steps")
            if fold_training_patients(len(cohort.cases), body.folds) < 2:
                raise ApiError(
                    422,
                    f"cohort {body.cohort_id} has {len(cohort.cases)} patients: too few for {body.folds} folds "
                    "with at least 2 training patients each (one of them validates the step budget)",
                )
            warnings = []
        else:
            warnings = split_warnings(len(cohort.cases), body.test_fraction)
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
            warnings=warnings,
        )
        return accepted(job_id, JobKind.evaluation)

    return ctx.idempotency.run(tenant, idempotency_key, fingerprint(body.model_dump_json()), handler)
