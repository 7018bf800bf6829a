"""Liveness (the process answers) and readiness (Redis reachable and a worker answering)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from service.deps import Ctx

router = APIRouter(prefix="/health", tags=["health"])


@router.get("/live")
async def live() -> dict[str, str]:  # async: answered on the event loop, never queued behind a thread
    return {"status": "ok"}


@router.get("/ready", responses={503: {"description": "Redis or every worker unreachable"}})
def ready(ctx: Ctx) -> JSONResponse:
    checks: dict[str, str] = {}
    try:
        ctx.redis.ping()
        checks["redis"] = "ok"
    except Exception as e:  # any failure means "not ready"; the reason goes to the body
        checks["redis"] = f"unreachable: {e}"
    workers: list[str] = []
    if checks["redis"] == "ok":
        try:
            replies = ctx.celery.control.ping(timeout=ctx.settings.ready_timeout_s) or []
            workers = sorted(name for reply in replies for name in reply)
        except Exception as e:
            checks["workers"] = f"unreachable: {e}"
    checks.setdefault("workers", f"{len(workers)} answering" if workers else "none answering")
    ok = checks["redis"] == "ok" and bool(workers)
    return JSONResponse(
        {"status": "ok" if ok else "unavailable", "checks": checks, "workers": workers},
        status_code=200 if ok else 503,
    )
