"""`make run` supervises its children: kill -9 of the worker's main process mid-job, and the job still
finishes, with exactly N pairs, without a second `make run`; a killed Redis comes back with its data."""

from __future__ import annotations

import io
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import httpx
import pytest

from scripts.run_service import free_port
from tests.service.conftest import A
from tests.service.procs import ROOT, Proc, service_env

pytestmark = pytest.mark.slow
BOUND_S = 600  # polling bounds, not speed targets


def _children(pid: int) -> list[tuple[int, str]]:
    """``(pid, command line)`` of each child (from /proc: ``ps`` cuts long lines at 80 columns)."""
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True)
    children = []
    for child in (int(x) for x in out.stdout.split()):
        try:
            argv = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
        except FileNotFoundError:
            continue
        children.append((child, " ".join(a.decode(errors="replace") for a in argv if a)))
    return children


def _log(proc: Proc) -> str:
    """The supervisor's own lines (the API's access log is in the same file)."""
    text = proc.log_path.read_text(errors="replace")
    return "\n".join(line for line in text.splitlines() if "run_service:" in line)


def _until(what: str, check, log: Proc, bound: float = BOUND_S):
    deadline = time.monotonic() + bound
    while time.monotonic() < deadline:
        try:
            value = check()
        except httpx.HTTPError:
            value = None
        if value:
            return value
        time.sleep(0.3)
    pytest.fail(f"{what} did not happen within {bound} s\n{log.tail(80)}")


def test_a_killed_worker_and_redis_are_restarted_and_the_job_finishes(tmp_path, phantom_zip):
    port = free_port()
    env = service_env("", tmp_path / "data", DHVAE_PORT=str(port), DHVAE_API_KEYS="tenant-a:key-a")
    env.pop("DHVAE_REDIS_URL")  # make run's embedded Redis
    stack = Proc([sys.executable, str(ROOT / "scripts/run_service.py")], env, tmp_path / "run.log")
    url = f"http://127.0.0.1:{port}"
    http = httpx.Client(base_url=url, timeout=60)
    try:
        _until("the stack answering", lambda: http.get("/health/ready").status_code == 200, stack)
        r = http.post("/v1/cohorts", content=phantom_zip, headers={**A, "Content-Type": "application/zip"})
        assert r.status_code == 201, r.text
        body = {"cohort_id": r.json()["id"], "n_pairs": 5, "preset": "tiny", "steps": 30, "seed": 3}
        job_id = http.post("/v1/augmentations", json=body, headers=A).json()["job_id"]

        def training() -> bool:
            p = http.get(f"/v1/jobs/{job_id}", headers=A).json()["progress"]
            return p["stage"] == "train" and p["done"] >= 5

        _until("training under way", training, stack)
        [worker] = [pid for pid, args in _children(stack.pid) if "celery" in args]
        subprocess.run(["kill", "-9", str(worker)], check=True)
        _until("the worker restarted", lambda: "worker restarted" in _log(stack), stack)

        def finished() -> dict | None:
            job = http.get(f"/v1/jobs/{job_id}", headers=A).json()
            return job if job["state"] in ("succeeded", "failed", "cancelled") else None

        job = _until("the job finishing", finished, stack)
        assert job["state"] == "succeeded", f"{job}\n{stack.tail(80)}"
        assert job["attempts"] >= 2  # the second delivery resumed it
        z = zipfile.ZipFile(io.BytesIO(http.get(f"/v1/jobs/{job_id}/download", headers=A).content))
        assert len([n for n in z.namelist() if n.startswith("labelsTr/synth_")]) == 5

        [redis_pid] = [pid for pid, args in _children(stack.pid) if "redis-server" in args]
        subprocess.run(["kill", "-9", str(redis_pid)], check=True)
        _until("Redis restarted", lambda: "redis restarted" in _log(stack), stack)
        again = _until(
            "the job record back", lambda: http.get(f"/v1/jobs/{job_id}", headers=A).status_code == 200, stack
        )
        assert again and http.get(f"/v1/jobs/{job_id}", headers=A).json()["state"] == "succeeded"
        log = _log(stack)
        assert "worker exited with -9" in log and "redis exited with -9" in log
    finally:
        http.close()
        stack.stop(signal.SIGINT, timeout=60)
        assert stack.proc.returncode is not None
        assert not [args for _pid, args in _children(stack.pid)], "children left running"


def test_run_service_help_starts_nothing():
    out = subprocess.run(
        [sys.executable, str(ROOT / "scripts/run_service.py"), "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0 and "supervises" in out.stdout
