"""Models: the tenant's trained models, and importing a checkpoint file."""

from __future__ import annotations

from typing import Annotated

import anyio
from fastapi import APIRouter, Header, Path, Request, Response
from fastapi.responses import JSONResponse

from contract import tasks
from contract.records import ModelRecord
from contract.schemas import (
    ID_PATTERN,
    ErrorOut,
    ImportTask,
    JobAccepted,
    JobKind,
    JobProgress,
    JobState,
    ModelList,
    ModelOut,
)
from runtime.jobs import aget
from runtime.storage import new_id
from service.deps import Ctx, Tenant
from service.errors import AUTHED, ApiError, error_body
from service.lookups import create_model_record, require_model
from service.submit import accepted, submit
from service.uploads import stream_to_file

router = APIRouter(prefix="/v1/models", tags=["models"], responses=AUTHED)
ModelId = Annotated[str, Path(pattern=ID_PATTERN)]
TORCH_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format is a zip archive


@router.get("", response_model=ModelList)
def list_models(ctx: Ctx, tenant: Tenant) -> ModelList:
    records = (ctx.storage.read(tenant, ModelRecord, i) for i in ctx.storage.list_ids(tenant, "models"))
    return ModelList(items=[ModelOut.model_validate(r.model_dump()) for r in records if r])


@router.get("/{model_id}", response_model=ModelOut, responses={404: {"model": ErrorOut}})
def get_model(model_id: ModelId, ctx: Ctx, tenant: Tenant) -> ModelOut:
    return ModelOut.model_validate(require_model(ctx, tenant, model_id, ready=False).model_dump())


@router.post(
    "",
    status_code=201,
    response_model=ModelOut,
    responses={
        202: {"model": JobAccepted, "description": "Still being validated by a worker; poll the job"},
        401: {"model": ErrorOut},
        413: {"model": ErrorOut},
        422: {"model": ErrorOut, "description": "Not a checkpoint of a known configuration"},
        503: {"model": ErrorOut},
    },
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
        }
    },
)
async def import_model(
    request: Request,
    ctx: Ctx,
    tenant: Tenant,
    idempotency_key: Annotated[str | None, Header()] = None,
) -> Response:
    """Import a checkpoint (``torch.save`` file). A worker loads it with ``weights_only=True`` and checks
    it against the known configurations (the API itself never loads torch)."""

    async def handler() -> Response:
        job_id, model_id = new_id("job"), new_id("mdl")
        staging = ctx.storage.new_staging(tenant, job_id)  # the job's id: a cancel knows what to remove
        handed_over = False
        try:
            upload = staging / "checkpoint.pt"
            await stream_to_file(request, upload, ctx.settings.max_upload_bytes)
            with open(upload, "rb") as f:
                if f.read(4) != TORCH_ZIP_MAGIC:
                    raise ApiError(
                        422,
                        "not a PyTorch checkpoint",
                        [("<upload>", "expected a torch.save file (a zip archive)")],
                    )
            create_model_record(ctx, tenant, model_id, source="import", job_id=job_id)
            payload = ImportTask(
                job_id=job_id,
                tenant=tenant,
                model_id=model_id,
                upload=upload.relative_to(ctx.storage.staging_dir(tenant)).as_posix(),
            )
            try:
                submit(
                    ctx,
                    task=tasks.IMPORT_MODEL,
                    kind=JobKind.model_import,
                    payload=payload,
                    request={},
                    progress=JobProgress(total=1, unit="files", stage="queued"),
                    model_id=model_id,
                )
            except ApiError:
                ctx.storage.delete(tenant, "models", model_id)
                raise
            handed_over = True  # from here on the worker removes the staged file
        finally:
            if not handed_over and staging.exists():
                ctx.storage.remove_tree(tenant, staging)
        return await _wait_for_import(ctx, tenant, job_id, model_id)

    return await ctx.idempotency.arun(tenant, idempotency_key, None, handler)


async def _wait_for_import(ctx: Ctx, tenant: str, job_id: str, model_id: str) -> JSONResponse:
    with anyio.move_on_after(ctx.settings.import_wait_s):
        while True:
            rec = await aget(ctx.aredis, job_id)
            state = rec.state if rec else JobState.failed
            if state == JobState.succeeded:
                model = require_model(ctx, tenant, model_id)
                return JSONResponse(
                    ModelOut.model_validate(model.model_dump()).model_dump(mode="json"),
                    status_code=201,
                    headers={"Location": f"/v1/models/{model_id}"},
                )
            if state in (JobState.failed, JobState.cancelled):
                err = rec.error if rec else None
                problems = [(p.file, p.problem) for p in err.problems] if err else []
                detail = err.message if err else "import failed"
                return JSONResponse(error_body(detail, problems or [("<upload>", detail)]), status_code=422)
            await anyio.sleep(0.2)
    return accepted(job_id, JobKind.model_import, model_id)
