"""Cohorts: upload (a zip streamed to disk, extracted safely, validated by the engine), list, get, delete."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Path, Request, Response
from fastapi.responses import JSONResponse

from contract.records import CohortRecord
from contract.schemas import ID_PATTERN, TERMINAL_STATES, CohortList, CohortOut, ErrorOut
from imaging.files import atomic_file
from runtime.storage import new_id
from service.dataset import case_preview_png
from service.deps import Ctx, Tenant
from service.errors import AUTHED, BINARY, ApiError, Responses, not_found
from service.lookups import require_cohort
from service.uploads import ZIP_TYPES, ingest_cohort, stream_to_file

router = APIRouter(prefix="/v1/cohorts", tags=["cohorts"], responses=AUTHED)
CohortId = Annotated[str, Path(pattern=ID_PATTERN)]


ERRORS: Responses = {
    401: {"model": ErrorOut},
    413: {"model": ErrorOut, "description": "Body or extracted size past the limits"},
    415: {"model": ErrorOut},
    422: {"model": ErrorOut, "description": "Bad archive or cohort: a list of {file, problem}"},
    507: {"model": ErrorOut, "description": "Your storage quota (DHVAE_TENANT_QUOTA_BYTES) is used up"},
}


def cohort_out(record: CohortRecord) -> CohortOut:
    return CohortOut.model_validate(record.model_dump())


@router.post(
    "",
    status_code=201,
    response_model=CohortOut,
    responses=ERRORS,
    openapi_extra={
        "requestBody": {
            "required": True,
            # application/octet-stream too: what generated clients (openapi-python-client) send
            "content": {
                "application/zip": {"schema": BINARY},
                "application/octet-stream": {"schema": BINARY},
            },
        }
    },
)
async def upload_cohort(
    request: Request,
    ctx: Ctx,
    tenant: Tenant,
    idempotency_key: Annotated[str | None, Header()] = None,
) -> Response:
    """Upload a cohort as a zip (any layout the engine reads). The body is streamed to disk."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype not in ZIP_TYPES:
        raise ApiError(415, f"send the cohort as Content-Type: application/zip (got {ctype or 'none'})")

    async def handler() -> Response:
        staging = ctx.storage.new_staging(tenant)
        try:
            zip_path = staging / "upload.zip"
            await stream_to_file(request, zip_path, ctx.settings.max_upload_bytes)
            cohort_id = new_id("coh")
            pool = ctx.validation  # reads and resamples every volume: CPU-bound, bounded, with a deadline
            record = await pool.run(
                tenant, ingest_cohort, ctx.storage, ctx.settings, tenant, cohort_id, zip_path, pool.deadline()
            )
        finally:
            if staging.exists():
                ctx.storage.remove_tree(tenant, staging)
        return JSONResponse(
            cohort_out(record).model_dump(mode="json"),
            status_code=201,
            headers={"Location": f"/v1/cohorts/{cohort_id}"},
        )

    return await ctx.idempotency.arun(tenant, idempotency_key, None, handler)


@router.get("", response_model=CohortList)
def list_cohorts(ctx: Ctx, tenant: Tenant) -> CohortList:
    records = (ctx.storage.read(tenant, CohortRecord, i) for i in ctx.storage.list_ids(tenant, "cohorts"))
    return CohortList(items=[cohort_out(r) for r in records if r])


@router.get("/{cohort_id}", response_model=CohortOut, responses={404: {"model": ErrorOut}})
def get_cohort(cohort_id: CohortId, ctx: Ctx, tenant: Tenant) -> CohortOut:
    return cohort_out(require_cohort(ctx, tenant, cohort_id))


@router.get(
    "/{cohort_id}/cases/{case_id}/preview.png",
    response_class=Response,
    responses={404: {"model": ErrorOut}, 200: {"content": {"image/png": {"schema": BINARY}}}},
)
def case_preview(
    cohort_id: CohortId, case_id: Annotated[str, Path(max_length=200)], ctx: Ctx, tenant: Tenant
) -> Response:
    """One case's axial slice with the most tumour, grey, with the tumour outline in red (the cohort's
    channel and label rule, as the engine reads them). Made once, then served from the cohort's cache."""
    record = require_cohort(ctx, tenant, cohort_id)
    if case_id not in record.cases:
        raise not_found("case", case_id)
    cache = ctx.storage.cache_dir(tenant, cohort_id) / "previews" / f"{record.cases.index(case_id)}.png"
    if not cache.is_file():
        png = case_preview_png(ctx.storage.cohort_files(tenant, record), case_id, record.channel)
        cache.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(cache, "wb") as f:
            f.write(png)
    return Response(
        cache.read_bytes(), media_type="image/png", headers={"Cache-Control": "private, max-age=3600"}
    )


@router.delete(
    "/{cohort_id}", status_code=204, responses={404: {"model": ErrorOut}, 409: {"model": ErrorOut}}
)
def delete_cohort(cohort_id: CohortId, ctx: Ctx, tenant: Tenant) -> Response:
    if not ctx.storage.exists(tenant, "cohorts", cohort_id):
        raise not_found("cohort", cohort_id)
    for job_id in ctx.jobs.active_ids():
        rec = ctx.jobs.get(job_id, tenant)
        if rec and rec.cohort_id == cohort_id and rec.state not in TERMINAL_STATES:
            raise ApiError(409, f"cohort {cohort_id} is used by job {job_id}; cancel it first")
    ctx.storage.delete(tenant, "cohorts", cohort_id)
    return Response(status_code=204)
