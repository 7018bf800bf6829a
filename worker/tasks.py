"""The Celery tasks: parse the request, call one function of ``pipeline.pipeline``, store the result.

Each task is registered under the explicit name the API sends (``contract.tasks``). torch and the
engine are imported inside the task bodies, i.e. in the pool's child process, never at import time.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

from contract import tasks as names
from contract.records import CohortRecord, ModelRecord
from contract.schemas import (
    AugmentTask,
    EvaluateTask,
    GenerateTask,
    ImportTask,
    JobState,
    ModelStatus,
    TrainTask,
)
from worker.celery_app import app
from worker.jobrun import JobContext, run_job
from worker.settings import get_settings

log = logging.getLogger(__name__)


def _engine():
    """The engine, imported lazily in the pool's child process (torch's thread count set there)."""
    from pipeline import pipeline

    threads = get_settings().torch_threads
    if threads:
        import torch

        torch.set_num_threads(threads)
    return pipeline


# ---------------------------------------------------------------------------------------------- records
def _cohort_dir(ctx: JobContext, cohort_id: str) -> Path:
    record = ctx.storage.read(ctx.tenant, CohortRecord, cohort_id)
    if record is None:
        from imaging.errors import CohortError, Problem

        raise CohortError([Problem(cohort_id, "the cohort was deleted")])
    return ctx.storage.cohort_files(ctx.tenant, record)


def _model_checkpoint(ctx: JobContext, model_id: str) -> Path:
    from imaging.errors import CheckpointError

    record = ctx.storage.read(ctx.tenant, ModelRecord, model_id)
    path = ctx.storage.path(ctx.tenant, "models", model_id) / "model.pt"
    if record is None or record.status != ModelStatus.ready or not path.is_file():
        raise CheckpointError(f"model {model_id} is not available")
    return path


def _model_ready(ctx: JobContext, model_id: str) -> None:
    model_dir = ctx.storage.path(ctx.tenant, "models", model_id)
    meta = {}
    if (model_dir / "model.json").is_file():
        meta = json.loads((model_dir / "model.json").read_text())
    ctx.storage.update_model(
        ctx.tenant,
        model_id,
        status=ModelStatus.ready,
        config=meta.get("config", {}),
        summary=meta.get("summary", meta.get("training", {})),
    )
    (model_dir / "last.pt").unlink(missing_ok=True)  # the resume point is no longer needed


def _model_ended(ctx: JobContext, model_id: str, state: JobState) -> None:
    """A model whose job failed or was cancelled: its record says so, its weights are removed."""
    status = ModelStatus.cancelled if state == JobState.cancelled else ModelStatus.failed
    ctx.storage.end_model(ctx.tenant, model_id, status)


def _remove_output(ctx: JobContext) -> None:
    ctx.storage.remove_tree(ctx.tenant, ctx.storage.path(ctx.tenant, "outputs", ctx.job_id))


def _train_spec(ctx: JobContext, req: TrainTask | AugmentTask):
    """The request's training fields, with its base model resolved to a checkpoint of this tenant's."""
    pipeline = _engine()
    base = _model_checkpoint(ctx, req.base_model_id) if req.base_model_id else None
    return pipeline.spec_from(pipeline.TrainSpec, req.model_dump(), base_checkpoint=base)


# ---------------------------------------------------------------------------------------------- tasks
@app.task(name=names.TRAIN, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def train(payload: dict) -> None:
    req = TrainTask.model_validate(payload)

    def body(ctx: JobContext) -> None:
        pipeline = _engine()
        pipeline.train(
            _cohort_dir(ctx, req.cohort_id),
            _train_spec(ctx, req),
            model_dir=ctx.storage.path(ctx.tenant, "models", req.model_id),
            cache_dir=ctx.storage.cache_dir(ctx.tenant, req.cohort_id),
            progress=ctx.progress,
            should_stop=ctx.should_stop,
        )
        _model_ready(ctx, req.model_id)

    run_job(req.job_id, req.tenant, body, lambda ctx, state: _model_ended(ctx, req.model_id, state))


@app.task(name=names.GENERATE, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def generate(payload: dict) -> None:
    req = GenerateTask.model_validate(payload)

    def body(ctx: JobContext) -> None:
        pipeline = _engine()
        out_dir = ctx.storage.path(ctx.tenant, "outputs", req.job_id)
        out_dir.mkdir(parents=True, exist_ok=True)
        pipeline.generate(
            _model_checkpoint(ctx, req.model_id),
            pipeline.spec_from(pipeline.SampleSpec, req.model_dump()),
            out_dir=out_dir,
            progress=ctx.progress,
            should_stop=ctx.should_stop,
        )

    run_job(req.job_id, req.tenant, body, lambda ctx, state: _remove_output(ctx))


@app.task(name=names.AUGMENT, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def augment(payload: dict) -> None:
    req = AugmentTask.model_validate(payload)

    def body(ctx: JobContext) -> None:
        pipeline = _engine()
        out_dir = ctx.storage.path(ctx.tenant, "outputs", req.job_id)
        out_dir.mkdir(parents=True, exist_ok=True)
        pipeline.augment(
            _cohort_dir(ctx, req.cohort_id),
            _train_spec(ctx, req),
            pipeline.spec_from(pipeline.SampleSpec, req.model_dump()),
            out_dir=out_dir,
            # a generator that trains nothing ("traditional", "insert") has no model
            model_dir=ctx.storage.path(ctx.tenant, "models", req.model_id) if req.model_id else None,
            cache_dir=ctx.storage.cache_dir(ctx.tenant, req.cohort_id),
            progress=ctx.progress,
            should_stop=ctx.should_stop,
        )
        if req.model_id:
            _model_ready(ctx, req.model_id)

    def cleanup(ctx: JobContext, state: JobState) -> None:
        _remove_output(ctx)
        if req.model_id:
            _model_ended(ctx, req.model_id, state)

    run_job(req.job_id, req.tenant, body, cleanup)


@app.task(name=names.EVALUATE, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def evaluate(payload: dict) -> None:
    """The efficacy protocol on a tenant's cohort (efficacy.grid.evaluate_cohort); a redelivered job resumes from
    the runs already recorded in its work folder."""
    req = EvaluateTask.model_validate(payload)

    def body(ctx: JobContext) -> None:
        pipeline = _engine()
        from efficacy import grid
        from efficacy.segmenter import OPTIMIZER_LR, UNET_WIDTHS, segmenter_config

        ing = pipeline.ingest(
            _cohort_dir(ctx, req.cohort_id),
            cache_dir=ctx.storage.cache_dir(ctx.tenant, req.cohort_id),
            progress=ctx.progress,
        )
        out_dir = ctx.storage.path(ctx.tenant, "outputs", req.job_id)
        if req.design == "crossval":
            from efficacy import crossval

            cv = crossval.CVConfig(
                arms=tuple(dict.fromkeys(req.arms)),
                folds=req.folds,
                seeds=tuple(req.seed_list()),
                max_steps=req.max_steps,
                inner_patients=req.inner_patients,
                n_synthetic=max(req.n_pairs),
                eval_every=max(1, req.max_steps // 10),
                preset=req.preset,
                generator_steps=req.steps,
                segmenter=segmenter_config(
                    channels=UNET_WIDTHS[req.unet],
                    optimizer=req.unet_optimizer,
                    lr=OPTIMIZER_LR[req.unet_optimizer],
                ),
            )
            report = crossval.run_crossval(
                ing, cv, out_dir / "work", progress=ctx.progress, should_stop=ctx.should_stop
            )
            report.update({"cohort_id": req.cohort_id, "design": "crossval"})
            crossval.write_crossval(report, out_dir, "report")
            return
        cfg = grid.EfficacyConfig(
            methods=tuple(dict.fromkeys((req.model, *req.baselines))),
            n_synthetic=tuple(sorted(set(req.n_pairs))),
            seeds=tuple(req.seed_list()),
            protocols=tuple(dict.fromkeys(req.protocols)),
            preset=req.preset,
            generator_steps=req.steps,
            pretrained={req.model: str(_model_checkpoint(ctx, req.model_id))} if req.model_id else {},
            segmenter=segmenter_config(channels=UNET_WIDTHS[req.unet], epochs=req.unet_epochs),
        )
        report = grid.evaluate_cohort(
            grid.split_cohort(ing, seed=req.split_seed, test_fraction=req.test_fraction),
            cfg,
            out_dir,
            details={"cohort_id": req.cohort_id, "model_id": req.model_id},
            progress=ctx.progress,
            should_stop=ctx.should_stop,
        )
        failed = report.get("failed_generators") or {}
        ctx.warn(
            [f"{method} produced no pairs, so it was not evaluated: {why}" for method, why in failed.items()]
        )

    run_job(req.job_id, req.tenant, body, lambda ctx, state: _remove_output(ctx))


@app.task(name=names.IMPORT_MODEL, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def import_model(payload: dict) -> None:
    req = ImportTask.model_validate(payload)

    def staged(ctx: JobContext) -> Path:
        path = (ctx.storage.staging_dir(ctx.tenant) / req.upload).resolve()
        if not path.is_relative_to(ctx.storage.staging_dir(ctx.tenant)):
            raise ValueError(f"staged upload {req.upload!r} is outside the staging area")
        return path

    def body(ctx: JobContext) -> None:
        _engine()
        from models.checkpoint import validate_checkpoint

        upload = staged(ctx)
        weights = ctx.storage.path(ctx.tenant, "models", req.model_id) / "model.pt"
        if upload.exists():
            info = validate_checkpoint(upload)  # torch.load(weights_only=True); CheckpointError otherwise
            os.replace(upload, weights)  # only a validated checkpoint ever gets this name
            shutil.rmtree(upload.parent, ignore_errors=True)
        else:  # redelivered after the move
            info = validate_checkpoint(weights)
        config = info.pop("config", {})
        ctx.storage.update_model(
            ctx.tenant,
            req.model_id,
            status=ModelStatus.ready,
            config=config,
            summary=info,
            model=info.get("model"),
            preset=info.get("preset"),
        )

    def cleanup(ctx: JobContext, state: JobState) -> None:
        """A rejected checkpoint leaves nothing: no model, no staged file."""
        ctx.storage.discard_import(ctx.tenant, req.model_id, staged(ctx).parent)

    run_job(req.job_id, req.tenant, body, cleanup)
