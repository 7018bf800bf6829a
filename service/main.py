"""The FastAPI application factory: ``uvicorn service.main:create_app --factory``.

Importing this module loads neither torch nor the engine's model code: uploads are validated with the
torch-free ``imaging.cohort`` and jobs are enqueued by task name (``contract.tasks``).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from service import errors
from service.deps import Context
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
    )
    app.state.ctx = ctx
    errors.install(app)
    for module in (cohorts, trainings, generations, augmentations, evaluations, models, jobs, health):
        app.include_router(module.router)
    return app
