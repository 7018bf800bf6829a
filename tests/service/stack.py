"""A live stack for the tests that need the real thing: redis-server, a Celery worker (prefork) and
uvicorn as subprocesses (tests/service/test_integration.py, tests/client, tests/console)."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.service.conftest import A
from tests.service.procs import Proc, RedisServer, service_env, start_api, start_worker

TIMEOUT = 600  # a bound on polling for a condition, not a speed target: a busy CI machine is slow


@dataclass
class Stack:
    redis: RedisServer
    env: dict[str, str]
    worker: Proc
    api: Proc
    url: str
    base: Path
    http: httpx.Client

    def logs(self) -> str:
        return f"--- worker log ---\n{self.worker.tail()}\n--- api log ---\n{self.api.tail(20)}"

    def job(self, job_id: str) -> dict:
        for _ in range(100):
            r = self.http.get(f"/v1/jobs/{job_id}", headers=A)
            if r.status_code != 503:  # 503 + Retry-After while Redis restarts
                break
            time.sleep(0.1)
        assert r.status_code == 200, r.text
        return r.json()

    def wait(self, job_id: str, until, timeout: float = TIMEOUT) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = self.job(job_id)
            if until(job):
                return job
            if job["state"] in ("failed", "cancelled") and not until(job):
                pytest.fail(f"job {job_id} {job['state']}: {job['error']}\n{self.logs()}")
            time.sleep(0.05)
        pytest.fail(f"job {job_id} still {self.job(job_id)}\n{self.logs()}")

    def done(self, job_id: str, state: str = "succeeded") -> dict:
        job = self.wait(job_id, lambda j: j["state"] in ("succeeded", "failed", "cancelled"))
        assert job["state"] == state, f"{job}\n{self.logs()}"
        return job

    def wait_ready(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.http.get("/health/ready").status_code == 200:
                return
            time.sleep(0.3)
        pytest.fail(f"no worker answered\n{self.logs()}")

    def restart_worker(self) -> None:
        self.worker.stop(signal.SIGKILL)
        self.worker = start_worker(self.env, self.base / "worker.log")
        self.wait_ready()


def live_stack(base: Path, **env_extra: str) -> Iterator[Stack]:
    """Start a stack under ``base``, yield it ready, stop it."""
    server = RedisServer(base / "redis").start()
    env = service_env(server.url, base / "data", **env_extra)
    worker = start_worker(env, base / "worker.log")
    api, url = start_api(env, base / "api.log")
    s = Stack(server, env, worker, api, url, base, httpx.Client(base_url=url, timeout=60))
    try:
        s.wait_ready()
        yield s
    finally:
        s.http.close()
        s.api.stop()
        s.worker.stop(signal.SIGKILL)
        server.stop()
