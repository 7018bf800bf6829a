"""Job records in a real Redis (contract/jobs.py): transitions, events, cancel flag, leases."""

from __future__ import annotations

import time

import pytest
import redis

from contract.schemas import JobKind, JobProgress, JobState
from runtime.jobs import JobStore, decode, events_key, job_key


@pytest.fixture
def jobs(redis_url) -> JobStore:
    return JobStore(redis.Redis.from_url(redis_url), ttl_s=60)


def _events(jobs: JobStore, job_id: str) -> list[tuple[str, str]]:
    out = []
    for _, fields in jobs.r.xrange(events_key(job_id)):
        rec = decode(fields)
        out.append((rec["event"], rec["state"]))
    return out


def test_lifecycle_records_every_change_as_an_event(jobs):
    jobs.create("job_1", tenant="t", kind=JobKind.training, request={"steps": 2})
    assert jobs.transition("job_1", {JobState.queued}, JobState.running)
    assert jobs.set_progress("job_1", JobProgress(done=1, total=2, unit="steps"))
    assert jobs.transition("job_1", {JobState.running}, JobState.succeeded)
    assert not jobs.set_progress("job_1", JobProgress(done=2, total=2))  # terminal: refused
    assert not jobs.transition("job_1", {JobState.running}, JobState.failed)
    rec = jobs.get("job_1")
    assert rec.state == "succeeded" and rec.started_at and rec.finished_at
    assert _events(jobs, "job_1") == [
        ("state", "queued"),
        ("state", "running"),
        ("progress", "running"),
        ("state", "succeeded"),
    ]
    assert 0 < jobs.r.ttl(job_key("job_1")) <= 60 and "job_1" not in jobs.active_ids()


def test_tenant_scoping(jobs):
    jobs.create("job_2", tenant="a", kind=JobKind.generation, request={})
    assert jobs.get("job_2", "a") and jobs.get("job_2", "b") is None and jobs.get("nope") is None
    assert jobs.list_ids("a") == ["job_2"] and jobs.list_ids("b") == []


def test_cancel_queued_at_once_running_by_flag(jobs):
    jobs.create("job_q", tenant="t", kind=JobKind.training, request={})
    assert jobs.request_cancel("job_q").state == "cancelled"
    jobs.create("job_r", tenant="t", kind=JobKind.training, request={})
    jobs.transition("job_r", {JobState.queued}, JobState.running)
    rec = jobs.request_cancel("job_r")
    assert rec.state == "running" and rec.cancel and jobs.cancel_requested("job_r")


def test_lease_admits_one_runner_and_expires(jobs):
    token = jobs.acquire_lease("job_l", lease_s=0.5)
    assert token and jobs.acquire_lease("job_l", lease_s=0.5) is None
    assert jobs.renew_lease("job_l", token, 0.5) and not jobs.renew_lease("job_l", "other", 0.5)
    t0 = time.monotonic()
    second = jobs.acquire_lease("job_l", lease_s=0.5, wait_s=2.0)  # the holder stops renewing: expires
    assert second and second != token and time.monotonic() - t0 < 1.5
    jobs.release_lease("job_l", token)  # not the holder any more: no effect
    assert jobs.lease_holder("job_l") == second
