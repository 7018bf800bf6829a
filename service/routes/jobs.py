"""Jobs: status, Server-Sent Events, cooperative cancel, the dataset download and its preview."""

from __future__ import annotations

import logging
import re
from typing import Annotated, Any

import anyio
import redis
from fastapi import APIRouter, Header, Path, Query, Response
from fastapi.responses import StreamingResponse
from sse_starlette import EventSourceResponse, ServerSentEvent

from contract.records import JobRecord
from contract.schemas import (
    ID_PATTERN,
    TERMINAL_STATES,
    ErrorOut,
    JobKind,
    JobList,
    JobOut,
    JobState,
    PairOut,
    PairPage,
)
from runtime.jobs import aget, events_key, read_event
from service.dataset import preview_png, stream_dataset, synthetic_pairs_page
from service.deps import Context, Ctx, Tenant
from service.errors import AUTHED, BINARY, ApiError, Responses, not_found
from service.submit import DATASET_KINDS, end_unstarted, job_links

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1/jobs", tags=["jobs"], responses=AUTHED)
JobId = Annotated[str, Path(pattern=ID_PATTERN)]
NOT_FOUND: Responses = {404: {"model": ErrorOut}}
STREAM_ID = re.compile(r"[0-9]{1,20}-[0-9]{1,20}")  # a Redis stream entry id, as our events carry


def _record(ctx: Context, tenant: str, job_id: str) -> JobRecord:
    rec = ctx.jobs.get(job_id, tenant)
    if rec is None:
        raise not_found("job", job_id)
    return rec


def job_out(rec: JobRecord) -> JobOut:
    return rec.out(job_links(rec.id, rec.kind, rec.model_id))


@router.get("", response_model=JobList)
def list_jobs(ctx: Ctx, tenant: Tenant, limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> JobList:
    recs = (ctx.jobs.get(i, tenant) for i in ctx.jobs.list_ids(tenant, limit))
    return JobList(items=[job_out(r) for r in recs if r])


@router.get("/{job_id}", response_model=JobOut, responses=NOT_FOUND)
async def get_job(job_id: JobId, ctx: Ctx, tenant: Tenant) -> JobOut:
    rec = await aget(ctx.aredis, job_id, tenant)
    if rec is None:
        raise not_found("job", job_id)
    return job_out(rec)


@router.delete(
    "/{job_id}", status_code=202, response_model=JobOut, responses={**NOT_FOUND, 409: {"model": ErrorOut}}
)
def cancel_job(job_id: JobId, ctx: Ctx, tenant: Tenant) -> JobOut:
    """Cooperative cancel: a queued job is cancelled at once, a running one at its next step."""
    rec = _record(ctx, tenant, job_id)
    if rec.state in TERMINAL_STATES:
        raise ApiError(409, f"job {job_id} already {rec.state.value}")
    rec = ctx.jobs.request_cancel(job_id) or rec
    if rec.state == JobState.cancelled:  # it was still queued
        end_unstarted(ctx, tenant, rec)
    return job_out(rec)


@router.get(
    "/{job_id}/events",
    responses={**NOT_FOUND, 200: {"content": {"text/event-stream": {}}, "description": "JobOut per event"}},
)
async def job_events(
    job_id: JobId,
    ctx: Ctx,
    tenant: Tenant,
    last_event_id: Annotated[str | None, Header()] = None,
) -> EventSourceResponse:
    """Server-Sent Events: the job (as in ``GET /v1/jobs/{id}``) after every change, from its creation
    (or after ``Last-Event-ID``) to its final state, then the stream ends."""
    if await aget(ctx.aredis, job_id, tenant) is None:
        raise not_found("job", job_id)
    if last_event_id is not None and not STREAM_ID.fullmatch(last_event_id):
        raise ApiError(
            422,
            "Last-Event-ID must be the id of an event of this stream (MILLISECONDS-SEQUENCE)",
            [("Last-Event-ID", "not a stream id")],
        )
    return EventSourceResponse(_events(ctx, job_id, last_event_id or "0-0"), ping=15)


async def _events(ctx: Context, job_id: str, last: str):
    key = events_key(job_id)
    while True:
        try:
            reply: Any = await ctx.aredis.xread({key: last}, block=5000, count=200)
        except (redis.ConnectionError, redis.TimeoutError):
            await anyio.sleep(0.5)  # Redis restarting: the stream is persisted, keep reading after it
            continue
        if not reply:
            rec = await aget(ctx.aredis, job_id)
            if rec is None or rec.state in TERMINAL_STATES:
                if rec is not None:
                    yield ServerSentEvent(data=job_out(rec).model_dump_json(), event="state")
                return
            continue
        for _key, entries in reply:
            for entry_id, fields in entries:
                last = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
                event, rec = read_event(fields)
                yield ServerSentEvent(data=job_out(rec).model_dump_json(), event=event, id=last)
                if rec.state in TERMINAL_STATES:
                    return


def _dataset_job(ctx: Context, tenant: str, job_id: str) -> JobRecord:
    rec = _record(ctx, tenant, job_id)
    if rec.kind not in DATASET_KINDS:
        raise ApiError(409, f"job {job_id} is a {rec.kind.value} job: it produces no dataset")
    if rec.state in (JobState.failed, JobState.cancelled):
        raise ApiError(409, f"job {job_id} {rec.state.value}: there is nothing to download")
    return rec


@router.get(
    "/{job_id}/download",
    response_class=StreamingResponse,
    responses={
        **NOT_FOUND,
        409: {"model": ErrorOut},
        200: {
            "content": {"application/zip": {"schema": BINARY}},
            "description": "nnU-Net v2 raw dataset, streamed",
        },
    },
)
def download(job_id: JobId, ctx: Ctx, tenant: Tenant) -> StreamingResponse:
    """The dataset as a zip streamed as it is produced: finished pairs at once, then each new one, and
    ``dataset.json`` + ``manifest.json`` when the job has succeeded. A job that fails or is cancelled
    meanwhile ends the stream early (an incomplete zip)."""
    _dataset_job(ctx, tenant, job_id)
    out_dir = ctx.storage.path(tenant, "outputs", job_id)

    def state() -> JobState | None:
        rec = ctx.jobs.get(job_id)
        return rec.state if rec else None

    return StreamingResponse(
        stream_dataset(out_dir, state, ctx.settings.download_poll_s),
        media_type="application/zip",
        headers={"Content-Disposition": f'attachment; filename="{job_id}.zip"'},
    )


@router.get(
    "/{job_id}/preview.png",
    response_class=Response,
    responses={**NOT_FOUND, 409: {"model": ErrorOut}, 200: {"content": {"image/png": {"schema": BINARY}}}},
)
def preview(
    job_id: JobId,
    ctx: Ctx,
    tenant: Tenant,
    n: Annotated[int, Query(ge=1, le=64)] = 16,
    offset: Annotated[int, Query(ge=0, le=10**7)] = 0,
) -> Response:
    """Up to ``n`` generated pairs from the ``offset``-th, side by side, 4 per row (each image's slice
    with the most tumour, the mask outline in red): the console's gallery pages through them."""
    _dataset_job(ctx, tenant, job_id)
    png = preview_png(ctx.storage.path(tenant, "outputs", job_id), n, offset=offset)
    if png is None and offset:
        raise ApiError(404, f"job {job_id} has no generated pair at offset {offset} yet")
    if png is None:
        raise ApiError(409, f"job {job_id} has no generated pair yet; retry when progress.done > 0")
    return Response(png, media_type="image/png", headers={"Cache-Control": "no-store"})


@router.get("/{job_id}/pairs", response_model=PairPage, responses={**NOT_FOUND, 409: {"model": ErrorOut}})
def pairs(
    job_id: JobId,
    ctx: Ctx,
    tenant: Tenant,
    offset: Annotated[int, Query(ge=0, le=10**7)] = 0,
    limit: Annotated[int, Query(ge=1, le=64)] = 16,
) -> PairPage:
    """The generated pairs written so far, a page at a time: name, slices and mask area of each (the
    gallery's captions; ``preview.png`` with the same ``offset`` and ``n`` draws them)."""
    _dataset_job(ctx, tenant, job_id)
    total, items = synthetic_pairs_page(ctx.storage.path(tenant, "outputs", job_id), offset, limit)
    return PairPage(total=total, offset=offset, items=[PairOut(**i) for i in items])


def _report_file(ctx: Context, tenant: str, job_id: str, name: str) -> bytes:
    """A file of a finished evaluation job: 409 for another kind of job or one not finished."""
    rec = _record(ctx, tenant, job_id)
    if rec.kind != JobKind.evaluation:
        raise ApiError(409, f"job {job_id} is a {rec.kind.value} job: it has no report")
    if rec.state != JobState.succeeded:
        raise ApiError(409, f"job {job_id} is {rec.state.value}: the report exists once it has succeeded")
    path = ctx.storage.path(tenant, "outputs", job_id) / name
    if not path.is_file():
        raise ApiError(409, f"job {job_id} has no {name}")
    return path.read_bytes()


@router.get(
    "/{job_id}/report.json",
    responses={**NOT_FOUND, 409: {"model": ErrorOut}, 200: {"content": {"application/json": {}}}},
)
def report_json(job_id: JobId, ctx: Ctx, tenant: Tenant) -> Response:
    """An evaluation's result: every run (``rows``: method, protocol, n_synthetic, seed, dice_slice,
    dice_3d, hd95), the mean / std / 95 % interval per cell (``summary``), the best N of each method and
    its gain over no augmentation (``verdict``), the quality of the synthetic pairs, and the settings."""
    return Response(_report_file(ctx, tenant, job_id, "report.json"), media_type="application/json")


@router.get(
    "/{job_id}/report.png",
    response_class=Response,
    responses={**NOT_FOUND, 409: {"model": ErrorOut}, 200: {"content": {"image/png": {"schema": BINARY}}}},
)
def report_png(job_id: JobId, ctx: Ctx, tenant: Tenant) -> Response:
    """Dice against the number of synthetic pairs, per method and protocol (mean +- std over seeds)."""
    return Response(_report_file(ctx, tenant, job_id, "report.png"), media_type="image/png")
