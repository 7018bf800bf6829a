"""The FastAPI application factory: ``uvicorn service.main:create_app --factory``.

Importing this module loads neither torch nor the engine's model code: uploads are validated with the
torch-free ``imaging.cohort`` and jobs are enqueued by task name (``contract.tasks``).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from service import errors, web
from service.deps import Context
from service.edge import EdgeMiddleware
from service.routes import augmentations, cohorts, evaluations, generations, health, jobs, models, trainings
from service.settings import Settings, get_settings

API_VERSION = "1.0.0"


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    ctx = Context.build(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await ctx.aredis.aclose()
        ctx.redis.close()

    app = FastAPI(
        title="dHVAE augmentation service",
        version=API_VERSION,
        description="Upload a tumour-segmentation cohort, train a dHVAE on it, and download an augmented "
        "nnU-Net dataset of synthetic image + mask pairs. Every route except /health needs "
        "`Authorization: Bearer KEY`.",
        lifespan=lifespan,
        # no trailing-slash redirects: their Location would be built from the client's Host header
        redirect_slashes=False,
        docs_url=None,  # service/web.py serves Swagger UI with local assets
        redoc_url=None,
    )
    app.state.ctx = ctx
    errors.install(app)
    app.add_middleware(
        EdgeMiddleware,
        max_json_bytes=settings.max_json_bytes,
        body_timeout_s=settings.body_timeout_s,
        drain_bytes=settings.drain_bytes,
    )
    for module in (cohorts, trainings, generations, augmentations, evaluations, models, jobs, health):
        app.include_router(module.router)
    web.install(app)
    app.openapi = lambda: _with_limits(app, settings)  # type: ignore[method-assign]
    return app


def _with_limits(app: FastAPI, settings: Settings) -> dict[str, Any]:
    """The OpenAPI schema with this service's limits in it: as ``maximum`` of the request fields they
    bound, and all of them under ``info.x-service-limits``."""
    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    limits = {
        "max_steps": settings.max_steps,
        "max_pairs": settings.max_pairs,
        "max_evaluation_runs": settings.max_evaluation_runs,
        "max_upload_bytes": settings.max_upload_bytes,
        "max_uncompressed_bytes": settings.max_uncompressed_bytes,
        "max_json_bytes": settings.max_json_bytes,
        "max_active_jobs": settings.max_active_jobs,
        "tenant_quota_bytes": settings.tenant_quota_bytes,
    }
    schema["info"]["x-service-limits"] = limits
    bounds = {"steps": settings.max_steps, "n_pairs": settings.max_pairs}
    for model in schema["components"]["schemas"].values():
        for name, prop in model.get("properties", {}).items():
            if name in bounds:
                target = prop.get("items", prop)
                if target.get("type") == "integer":
                    target["maximum"] = bounds[name]
    app.openapi_schema = schema
    return schema
