"""Augmentations: one job that trains (or fine-tunes) on a cohort and generates the augmented dataset."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Response
from fastapi.responses import JSONResponse

from contract import tasks
from contract.schemas import AugmentationRequest, AugmentTask, JobAccepted, JobKind
from service.deps import Ctx, Tenant
from service.errors import AUTHED
from service.idempotency import fingerprint
from service.lookups import check_max
from service.submit import SUBMIT_ERRORS, submit_model_job

router = APIRouter(prefix="/v1/augmentations", tags=["augmentations"], responses=AUTHED)


@router.post("", status_code=202, response_model=JobAccepted, responses=SUBMIT_ERRORS)
def create_augmentation(
    body: AugmentationRequest,
    ctx: Ctx,
    tenant: Tenant,
    idempotency_key: Annotated[str | None, Header()] = None,
) -> Response:
    """Train on the cohort, then generate: the download is the cohort + N synthetic pairs (nnU-Net v2)."""

    def handler() -> JSONResponse:
        check_max(body.n_pairs, ctx.settings.max_pairs, "n_pairs")
        return submit_model_job(
            ctx, tenant, body, task=tasks.AUGMENT, kind=JobKind.augmentation, payload_cls=AugmentTask
        )

    return ctx.idempotency.run(tenant, idempotency_key, fingerprint(body.model_dump_json()), handler)
