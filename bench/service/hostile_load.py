"""Hostile load next to normal use, measured side by side in one run: the latency of a normal cohort
upload (tenant A) and of ``GET /health/live`` on their own, then while tenant B has a zip bomb or a
stalled upload in flight, then while B uploads 10 cohorts at once.

    .venv/bin/python bench/service/hostile_load.py [--out bench/service]

A real uvicorn process on this machine (the command of `make run`) and a redis-server; no worker (the
uploads do not need one). The normal upload is a phantom cohort of 3 cases (stored zip).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import sys
import tempfile
import threading
import time
import zipfile
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.service import zips  # noqa: E402
from tests.service.procs import RedisServer, service_env, start_api  # noqa: E402

A = {"Authorization": "Bearer key-a", "Content-Type": "application/zip"}
B = {"Authorization": "Bearer key-b", "Content-Type": "application/zip"}
MiB = 1 << 20


def phantom_zip(work: Path) -> bytes:
    from imaging.phantoms import make_phantom_cohort

    src = make_phantom_cohort(work / "phantom", n_cases=3, shape=(64, 64, 24))
    path = work / "cohort.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        for p in sorted(src.rglob("*")):
            if p.is_file():
                zf.write(p, p.relative_to(src).as_posix())
    return path.read_bytes()


def timed_upload(url: str, body: bytes) -> float:
    t0 = time.perf_counter()
    r = httpx.post(f"{url}/v1/cohorts", content=body, headers=A, timeout=600)
    assert r.status_code == 201, r.text
    return time.perf_counter() - t0


def live_latencies(url: str, seconds: float) -> list[float]:
    out, end = [], time.monotonic() + seconds
    with httpx.Client(timeout=30) as c:
        while time.monotonic() < end:
            t0 = time.perf_counter()
            assert c.get(f"{url}/health/live").status_code == 200
            out.append(time.perf_counter() - t0)
            time.sleep(0.02)
    return out


def summary(values: list[float]) -> dict:
    values = sorted(values)
    return {
        "n": len(values),
        "p50_ms": round(1000 * statistics.median(values), 1),
        "p99_ms": round(1000 * values[min(len(values) - 1, int(0.99 * len(values)))], 1),
        "max_ms": round(1000 * values[-1], 1),
    }


def scenario(url: str, body: bytes, hostile) -> dict:
    """A normal upload and /health/live while ``hostile(url, stop)`` runs in the background."""
    stop = threading.Event()
    result: dict = {}
    worker = threading.Thread(target=hostile, args=(url, stop, result), daemon=True) if hostile else None
    if worker:
        worker.start()
        time.sleep(0.5)  # in flight
    lat: list[float] = []
    live = threading.Thread(target=lambda: lat.extend(live_latencies(url, 6.0)))
    live.start()
    uploads = [timed_upload(url, body) for _ in range(3)]
    live.join()
    stop.set()
    if worker:
        worker.join(120)
    return {"upload_s": [round(u, 2) for u in uploads], "health_live": summary(lat), **result}


BOMB: bytes = b""  # built once, before the scenario starts


def bomb(url: str, stop: threading.Event, result: dict) -> None:
    body = BOMB
    n = 0
    while not stop.is_set():
        r = httpx.post(f"{url}/v1/cohorts", content=body, headers=B, timeout=600)
        result.setdefault("hostile_status", set()).add(r.status_code)
        n += 1
    result["hostile_requests"] = n
    result["hostile_status"] = sorted(result["hostile_status"])
    result["hostile"] = "deflate bomb, 1 GiB of zeros in a 1 MB zip, posted again and again by tenant B"


def stalled(url: str, stop: threading.Event, result: dict) -> None:
    host, port = url.removeprefix("http://").split(":")
    socks = []
    for _ in range(20):
        s = socket.create_connection((host, int(port)))
        s.sendall(
            b"POST /v1/cohorts HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer key-b\r\n"
            b"Content-Type: application/zip\r\nContent-Length: 1000000\r\n\r\nPK\x03\x04"
        )
        socks.append(s)
    stop.wait(120)
    answers = []
    for s in socks:
        s.settimeout(60)
        try:
            answers.append(s.recv(64).split(b" ")[1].decode())
        except (OSError, IndexError):
            answers.append("none")
        s.close()
    result["hostile"] = "20 uploads by tenant B that stop sending after 4 bytes of a 1 MB body"
    result["hostile_status"] = sorted(set(answers))


def concurrent(url: str, stop: threading.Event, result: dict, body: bytes | None = None) -> None:
    statuses: list[int] = []

    def one() -> None:
        r = httpx.post(f"{url}/v1/cohorts", content=result["body"], headers=B, timeout=600)
        statuses.append(r.status_code)

    threads = [threading.Thread(target=one) for _ in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    result.pop("body")
    result["hostile"] = "10 concurrent uploads of the same cohort by tenant B"
    result["hostile_status"] = sorted(set(statuses))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "bench/service")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        body = phantom_zip(work)
        global BOMB
        BOMB = zips.streamed_zip("cohort/case1/flair.nii", 1024 * MiB, zipfile.ZIP_DEFLATED)
        redis = RedisServer(work / "redis").start()
        env = service_env(redis.url, work / "data", DHVAE_BODY_TIMEOUT_S="30")
        api, url = start_api(env, work / "api.log")
        try:
            timed_upload(url, body)  # warm
            runs = {
                "alone": scenario(url, body, None),
                "bomb in flight": scenario(url, body, bomb),
                "stalled uploads in flight": scenario(url, body, stalled),
            }

            def ten(url, stop, result):
                result["body"] = body
                concurrent(url, stop, result)

            runs["10 concurrent uploads by another tenant"] = scenario(url, body, ten)
        finally:
            api.stop()
            redis.stop()
    result = {
        "command": ".venv/bin/python bench/service/hostile_load.py",
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "avx512_bf16": "avx512_bf16" in Path("/proc/cpuinfo").read_text(),
            "python": platform.python_version(),
        },
        "normal_upload": f"phantom cohort, 3 cases, {len(body) / MiB:.1f} MiB stored zip, tenant A",
        "runs": runs,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "hostile_load.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [
        "# Hostile load next to normal use",
        "",
        f"Command: `{result['command']}`. Machine: {result['machine']}. Normal upload: {result['normal_upload']}.",
        "",
        "| while | normal upload (s, 3 tries) | /health/live p50 / p99 / max (ms) | hostile answers |",
        "|---|---|---|---|",
    ]
    for name, r in runs.items():
        h = r["health_live"]
        lines.append(
            f"| {name} | {', '.join(map(str, r['upload_s']))} | {h['p50_ms']} / {h['p99_ms']} / {h['max_ms']} "
            f"| {r.get('hostile_status', '-')} |"
        )
    (args.out / "hostile_load.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
