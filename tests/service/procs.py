"""Real processes for the service tests: a redis-server on a free port, a Celery worker, uvicorn.

The commands are the ones `make run` and docker-compose.yml use (``scripts/run_service.py``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from scripts.run_service import API_ARGV, WORKER_ARGV, free_port, redis_argv, wait_for_http, wait_for_redis

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


class RedisServer:
    """redis-server with append-only persistence, restartable on the same port and data."""

    def __init__(self, data_dir: Path):
        self.dir = data_dir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        self.proc = subprocess.Popen(
            redis_argv(self.port, self.dir), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        wait_for_redis(self.port)
        return self

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(10)
        self.proc = None

    def restart(self, sig: int = signal.SIGKILL, down_s: float = 0.0) -> None:
        self.stop(sig)
        time.sleep(down_s)
        self.start()


def service_env(redis_url: str, data_dir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DHVAE_")}
    env.update(
        DHVAE_REDIS_URL=redis_url,
        DHVAE_DATA_DIR=str(data_dir),
        DHVAE_API_KEYS="tenant-a:key-a,tenant-b:key-b",
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
        DHVAE_TORCH_THREADS="1",
        DHVAE_JOB_LEASE_S="3",
        DHVAE_JANITOR_INTERVAL_S="2",
        DHVAE_PROGRESS_INTERVAL_S="0.05",
        DHVAE_DOWNLOAD_POLL_S="0.1",
    )
    env.update(extra)
    return env


class Proc:
    """A child process in its own session, its output in a log file (shown when a test fails)."""

    def __init__(self, argv: list[str], env: dict[str, str], log: Path):
        self.log_path = log
        self._log = open(log, "ab")
        self.proc = subprocess.Popen(
            argv, cwd=ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, sig)
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
            except ProcessLookupError:
                pass
        self._log.close()

    def tail(self, n: int = 60) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])


def start_worker(env: dict[str, str], log: Path) -> Proc:
    return Proc([str(BIN / WORKER_ARGV[0]), *WORKER_ARGV[1:]], env, log)


def start_api(env: dict[str, str], log: Path) -> tuple[Proc, str]:
    port = free_port()
    proc = Proc([str(BIN / API_ARGV[0]), *API_ARGV[1:], "--host", "127.0.0.1", "--port", str(port)], env, log)
    url = f"http://127.0.0.1:{port}"
    wait_for_http(f"{url}/health/live")
    return proc, url


def pool_child_pids(worker: Proc) -> list[int]:
    """The prefork pool's child processes of a worker (the ones running tasks)."""
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(worker.pid)], capture_output=True, text=True)
    return [int(x) for x in out.stdout.split()]
