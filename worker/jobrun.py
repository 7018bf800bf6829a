"""Running one job inside a task: lease, heartbeat, progress, cancel flag and the final state.

A message can be delivered more than once (a killed worker's job is redelivered; the janitor may
re-queue one whose worker vanished), so a task is idempotent:

- a job already succeeded, failed or cancelled is acknowledged and nothing runs;
- the job's lease (a Redis key renewed by a heartbeat thread) admits one runner at a time: a second
  delivery waits for the lease of a dead runner to expire, and gives up if a live one renews it;
- the work itself resumes: training from ``last.pt``, generation from the pairs already on disk.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from contract.schemas import TERMINAL_STATES, JobError, JobProgress, JobState, ProblemOut
from runtime.jobs import JobStore, now_iso
from runtime.storage import LocalStorage
from worker.settings import WorkerSettings, get_settings

log = logging.getLogger(__name__)

FINAL_WRITE_PATIENCE_S = 300.0  # keep retrying the final state this long while Redis is away


@dataclass
class JobContext:
    """What a task body gets: where things are, and the hooks the engine calls."""

    job_id: str
    tenant: str
    storage: LocalStorage
    progress: Callable[[Any], None]
    should_stop: Callable[[], bool]
    settings: WorkerSettings
    warn: Callable[[list[str]], None] = lambda warnings: None


_store: JobStore | None = None


def job_store() -> JobStore:
    global _store
    if _store is None:
        s = get_settings()
        client = redis.Redis.from_url(
            s.require_redis_url(),
            retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), retries=3),
            socket_timeout=10,
            health_check_interval=30,
        )
        _store = JobStore(client, ttl_s=s.job_ttl_s)
    return _store


def _patiently(fn: Callable[[], Any], what: str) -> Any:
    """Call ``fn`` until Redis answers (a restart takes seconds), up to FINAL_WRITE_PATIENCE_S."""
    deadline = time.monotonic() + FINAL_WRITE_PATIENCE_S
    delay = 0.2
    while True:
        try:
            return fn()
        except (redis.ConnectionError, redis.TimeoutError) as e:
            if time.monotonic() > deadline:
                raise
            log.warning("%s: Redis unavailable (%s); retrying", what, e)
            time.sleep(delay)
            delay = min(delay * 2, 5.0)


class _Heartbeat(threading.Thread):
    def __init__(self, jobs: JobStore, job_id: str, token: str, lease_s: float):
        super().__init__(daemon=True, name=f"lease-{job_id}")
        self.jobs, self.job_id, self.token, self.lease_s = jobs, job_id, token, lease_s
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.lease_s / 3):
            try:
                if not self.jobs.renew_lease(self.job_id, self.token, self.lease_s):
                    log.warning("job %s: another worker holds its lease now", self.job_id)
            except redis.RedisError as e:
                log.warning("lease renewal for %s failed: %s", self.job_id, e)


class _Progress:
    """The engine's Progress -> the job record, at most every ``interval`` s (stage changes always)."""

    def __init__(self, jobs: JobStore, job_id: str, interval: float):
        self.jobs, self.job_id, self.interval = jobs, job_id, interval
        self._last_t = 0.0
        self._last_stage: str | None = None
        self._cancel_checked = 0.0
        self._cancel = False

    def __call__(self, p: Any) -> None:
        now = time.monotonic()
        final = p.total and p.done >= p.total
        if p.stage == self._last_stage and not final and now - self._last_t < self.interval:
            return
        self._last_t, self._last_stage = now, p.stage
        progress = JobProgress(
            done=int(p.done),
            total=int(p.total),
            unit=p.unit,
            stage=p.stage,
            eta_s=None if p.eta_s is None else round(float(p.eta_s), 1),
            metrics={k: float(v) for k, v in (p.metrics or {}).items()},
        )
        try:
            self.jobs.set_progress(self.job_id, progress)
        except redis.RedisError as e:  # progress is best effort; the work goes on
            log.warning("progress of %s not recorded: %s", self.job_id, e)

    def should_stop(self) -> bool:
        now = time.monotonic()
        if now - self._cancel_checked >= 0.5:
            self._cancel_checked = now
            try:
                self._cancel = self.jobs.cancel_requested(self.job_id)
            except redis.RedisError:
                pass
        return self._cancel


def _no_progress(_: Any) -> None:
    pass


def run_job(
    job_id: str,
    tenant: str,
    body: Callable[[JobContext], dict | None],
    cleanup: Callable[[JobContext, JobState], None],
) -> None:
    """Run ``body`` as job ``job_id`` once; record running/progress/final state; clean up on failure.

    ``body`` returns extra record fields (or None); ``cleanup`` removes partial outputs of a job that
    failed or was cancelled, so nothing half-written stays visible.
    """
    from imaging.errors import Cancelled, CohortError, DHVAEError

    settings = get_settings()
    jobs = job_store()
    rec = _patiently(lambda: jobs.get(job_id), "read job")
    if rec is None:
        log.warning("job %s has no record (expired or never created): dropping the message", job_id)
        return
    if rec.state in TERMINAL_STATES:
        log.info("job %s already %s: nothing to do", job_id, rec.state.value)
        if rec.state == JobState.cancelled:  # cancelled while queued: its cleanup is idempotent
            cleanup(
                JobContext(
                    job_id, tenant, LocalStorage(settings.data_dir), _no_progress, lambda: False, settings
                ),
                rec.state,
            )
        return
    token = _patiently(
        lambda: jobs.acquire_lease(job_id, settings.job_lease_s, wait_s=settings.job_lease_s * 1.5),
        "acquire lease",
    )
    if token is None:
        log.warning("job %s is running on another worker: dropping this duplicate delivery", job_id)
        return
    heartbeat = _Heartbeat(jobs, job_id, token, settings.job_lease_s)
    heartbeat.start()
    progress = _Progress(jobs, job_id, settings.progress_interval_s)
    ctx = JobContext(
        job_id,
        tenant,
        LocalStorage(settings.data_dir),
        progress,
        progress.should_stop,
        settings,
        warn=lambda warnings: _patiently(lambda: jobs.add_warnings(job_id, warnings), "record warnings"),
    )
    try:
        rec = _patiently(lambda: jobs.get(job_id), "read job")
        if rec is None or rec.state in TERMINAL_STATES:
            return
        if rec.cancel:
            raise Cancelled("cancelled before it started")
        jobs.count_attempt(job_id)
        jobs.transition(
            job_id,
            {JobState.queued, JobState.running},
            JobState.running,
            {
                "started_at": rec.started_at or now_iso(),
                "worker": f"{socket.gethostname()}:{os.getpid()}",
            },
        )
        extra = body(ctx) or {}
        _patiently(
            lambda: jobs.transition(job_id, {JobState.running}, JobState.succeeded, extra), "record success"
        )
        log.info("job %s succeeded", job_id)
    except Cancelled:
        log.info("job %s cancelled", job_id)
        cleanup(ctx, JobState.cancelled)
        _patiently(
            lambda: jobs.transition(job_id, {JobState.queued, JobState.running}, JobState.cancelled),
            "record cancel",
        )
    except DHVAEError as e:
        log.warning("job %s failed: %s", job_id, e)
        problems = (
            [ProblemOut(file=p.file, problem=p.problem) for p in e.problems]
            if isinstance(e, CohortError)
            else []
        )
        cleanup(ctx, JobState.failed)
        err = JobError(type=type(e).__name__, message=str(e), problems=problems)
        _patiently(lambda: jobs.fail(job_id, err), "record failure")
    except Exception as e:
        log.exception("job %s crashed", job_id)
        cleanup(ctx, JobState.failed)
        err = JobError(type="InternalError", message=f"{type(e).__name__}: {e}")
        _patiently(lambda: jobs.fail(job_id, err), "record failure")
    finally:
        heartbeat.stopped.set()
        try:
            jobs.release_lease(job_id, token)
        except redis.RedisError:
            pass  # it expires by itself
