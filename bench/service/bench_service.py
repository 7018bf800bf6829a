"""Service benchmark, each figure next to its baseline, measured in one run on this machine.

    .venv/bin/python bench/service/bench_service.py [--pairs 100 1000] [--out bench/service]

1. upload ingest MB/s (POST /v1/cohorts: streamed to disk, extracted, validated) against a plain copy
   of the same zip on the same disk; plus the streaming part alone (a body refused after it is on disk);
2. download MB/s (GET /v1/jobs/{id}/download, a streamed zip) against reading the same files;
3. time from POST /v1/generations to the first pair arriving on the download stream;
4. GET /v1/jobs/{id} latency p50/p99 with 50 concurrent clients against a bare Redis HGETALL of the same
   record (also 50 concurrent clients);
5. worker peak memory (the pool child's peak RSS) generating N=100 and N=1000 pairs, a fresh worker each.

A real stack: redis-server, one Celery worker, uvicorn (the commands of `make run`), the tiny preset and
the shared BraTS training cases (a phantom cohort when ../shared is absent).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import shutil
import signal
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

from runtime.jobs import job_key  # noqa: E402
from tests.service.procs import RedisServer, pool_child_pids, service_env, start_api, start_worker  # noqa: E402

SHARED_TRAIN = ROOT.parent / "shared" / "data" / "brats2015-deepmedic" / "train"
H = {"Authorization": "Bearer key-a"}
MB = 1e6


def cohort_zip(path: Path) -> str:
    if SHARED_TRAIN.is_dir():
        src, name = SHARED_TRAIN, "brats2015-deepmedic/train (all files)"
    else:
        from imaging.phantoms import make_phantom_cohort

        src, name = make_phantom_cohort(path.parent / "phantom", n_cases=4), "phantom cohort (4 cases)"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        for p in sorted(src.rglob("*")):
            if p.is_file():
                zf.write(p, p.relative_to(src).as_posix())
    return name


def wait_job(http: httpx.Client, job_id: str, timeout: float = 900) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = http.get(f"/v1/jobs/{job_id}", headers=H).json()
        if job["state"] in ("succeeded", "failed", "cancelled"):
            if job["state"] != "succeeded":
                raise RuntimeError(f"job {job_id}: {job}")
            return job
        time.sleep(0.1)
    raise TimeoutError(job_id)


def wait_ready(http: httpx.Client) -> None:
    for _ in range(300):
        if http.get("/health/ready").status_code == 200:
            return
        time.sleep(0.3)
    raise RuntimeError("no worker")


def bench_upload(http: httpx.Client, work: Path, data_dir: Path) -> dict:
    data_dir.mkdir(parents=True, exist_ok=True)
    z = work / "cohort.zip"
    desc = cohort_zip(z)
    size = z.stat().st_size
    copies, uploads, streams = [], [], []
    junk = work / "junk.bin"
    junk.write_bytes(os.urandom(size))
    for _ in range(3):
        t = time.perf_counter()
        shutil.copyfile(z, data_dir / "copy.zip")
        os.sync()
        copies.append(time.perf_counter() - t)
        (data_dir / "copy.zip").unlink()
        with open(z, "rb") as f:
            t = time.perf_counter()
            r = http.post("/v1/cohorts", content=f, headers={**H, "Content-Type": "application/zip"})
            uploads.append(time.perf_counter() - t)
        assert r.status_code == 201, r.text
        cohort_id = r.json()["id"]
        with open(junk, "rb") as f:
            t = time.perf_counter()
            r = http.post("/v1/cohorts", content=f, headers={**H, "Content-Type": "application/zip"})
            streams.append(time.perf_counter() - t)
        assert r.status_code == 422
    return {
        "cohort": desc,
        "zip_bytes": size,
        "plain_copy_MBps": round(size / MB / statistics.median(copies), 1),
        "upload_ingest_MBps": round(size / MB / statistics.median(uploads), 1),
        "upload_streaming_only_MBps": round(size / MB / statistics.median(streams), 1),
        "upload_ingest_s": round(statistics.median(uploads), 3),
        "note": "ingest = stream to disk + safe extraction + engine validation (reads and resamples every "
        "volume); streaming only = a body of the same size refused after it is on disk",
        "_cohort_id": cohort_id,
    }


def download(http: httpx.Client, job_id: str, first_at: list[float] | None = None) -> bytes:
    buf = io.BytesIO()
    with http.stream("GET", f"/v1/jobs/{job_id}/download", headers=H, timeout=None) as r:
        r.raise_for_status()
        for chunk in r.iter_bytes():
            if first_at is not None and not first_at:
                first_at.append(time.perf_counter())
            buf.write(chunk)
    return buf.getvalue()


def bench_download(http: httpx.Client, job_id: str, out_dir: Path) -> dict:
    files = [p for p in sorted(out_dir.rglob("*")) if p.is_file()]
    total = sum(p.stat().st_size for p in files)
    reads, downloads = [], []
    for _ in range(3):
        t = time.perf_counter()
        for p in files:
            with open(p, "rb") as f:
                while f.read(1 << 20):
                    pass
        reads.append(time.perf_counter() - t)
        t = time.perf_counter()
        body = download(http, job_id)
        downloads.append(time.perf_counter() - t)
    return {
        "files": len(files),
        "dataset_bytes": total,
        "zip_bytes": len(body),
        "read_files_MBps": round(total / MB / statistics.median(reads), 1),
        "download_MBps": round(total / MB / statistics.median(downloads), 1),
    }


def bench_first_pair(http: httpx.Client, model_id: str, n_pairs: int) -> dict:
    out = {}
    for label in ("first generation", "second generation"):
        first_at: list[float] = []
        t = time.perf_counter()
        job_id = http.post(
            "/v1/generations",
            json={"model_id": model_id, "n_pairs": n_pairs, "seed": 1, "min_mask_area": 0},
            headers=H,
        ).json()["job_id"]
        download(http, job_id, first_at)
        done = time.perf_counter()
        out[label] = {"first_pair_s": round(first_at[0] - t, 3), "all_pairs_s": round(done - t, 3)}
    out["n_pairs"] = n_pairs
    return out


async def _latency(fn, clients: int, per_client: int) -> list[float]:
    lat: list[float] = []

    async def one():
        for _ in range(per_client):
            t = time.perf_counter()
            await fn()
            lat.append(time.perf_counter() - t)

    await asyncio.gather(*(one() for _ in range(clients)))
    return lat


def bench_latency(url: str, redis_url: str, job_id: str, clients: int = 50, per_client: int = 40) -> dict:
    import redis.asyncio as aredis

    async def run():
        limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
        async with httpx.AsyncClient(base_url=url, limits=limits, timeout=30) as c:

            async def get():
                r = await c.get(f"/v1/jobs/{job_id}", headers=H)
                assert r.status_code == 200

            await _latency(get, clients, 2)  # warm-up: connections open
            api = await _latency(get, clients, per_client)
        pool = aredis.BlockingConnectionPool.from_url(redis_url, max_connections=clients)
        r = aredis.Redis(connection_pool=pool)

        async def hget():
            assert await r.hgetall(job_key(job_id))

        await _latency(hget, clients, 2)
        bare = await _latency(hget, clients, per_client)
        await r.aclose()
        return api, bare

    api, bare = asyncio.run(run())

    def pct(xs, q):
        xs = sorted(xs)
        return round(1000 * xs[min(len(xs) - 1, int(q * len(xs)))], 2)

    return {
        "clients": clients,
        "requests": clients * per_client,
        "api_get_job_ms": {"p50": pct(api, 0.5), "p99": pct(api, 0.99)},
        "redis_hgetall_ms": {"p50": pct(bare, 0.5), "p99": pct(bare, 0.99)},
        "note": "client, API and Redis share the same cores",
    }


def peak_rss_during(worker_pid_fn, job_done: threading.Event) -> list[int]:
    """Poll the pool child's VmHWM (peak RSS) until the job is done."""
    peak = [0]

    def loop():
        while not job_done.is_set():
            for pid in worker_pid_fn():
                try:
                    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                        if line.startswith("VmHWM:"):
                            peak[0] = max(peak[0], int(line.split()[1]) * 1024)
                except FileNotFoundError:
                    pass
            time.sleep(0.05)

    threading.Thread(target=loop, daemon=True).start()
    return peak


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, nargs="+", default=[100, 1000])
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="dhvae-bench-"))
    server = RedisServer(work / "redis").start()
    data = work / "data"
    env = service_env(server.url, data, DHVAE_JOB_LEASE_S="10", DHVAE_LOG_LEVEL="WARNING")
    worker = start_worker(env, work / "worker.log")
    api, url = start_api(env, work / "api.log")
    http = httpx.Client(base_url=url, timeout=600)
    results: dict = {
        "machine": {
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "config": {
            "preset": "tiny",
            "worker": "prefork, concurrency 1, 1 torch thread",
            "redis": "appendfsync always",
        },
    }
    try:
        wait_ready(http)
        results["upload"] = bench_upload(http, work, data)
        cohort_id = results["upload"].pop("_cohort_id")
        r = http.post(
            "/v1/trainings",
            json={"cohort_id": cohort_id, "preset": "tiny", "steps": 12, "seed": 0},
            headers=H,
        )
        train_job, model_id = r.json()["job_id"], r.json()["model_id"]
        wait_job(http, train_job)
        results["time_to_first_pair"] = bench_first_pair(http, model_id, 20)
        memory = {}
        for n in args.pairs:
            worker.stop(signal.SIGKILL)  # a fresh child per N: VmHWM is a per-process peak
            worker = start_worker(env, work / "worker.log")
            wait_ready(http)
            done = threading.Event()
            peak = peak_rss_during(lambda w=worker: pool_child_pids(w), done)
            t = time.perf_counter()
            job_id = http.post(
                "/v1/generations",
                json={"model_id": model_id, "n_pairs": n, "seed": 2, "min_mask_area": 0},
                headers=H,
            ).json()["job_id"]
            wait_job(http, job_id)
            done.set()
            memory[str(n)] = {
                "peak_rss_MB": round(peak[0] / MB, 1),
                "seconds": round(time.perf_counter() - t, 1),
            }
            last_job = job_id
        results["worker_peak_memory"] = memory
        out_dir = data / "tenants" / "tenant-a" / "outputs" / last_job
        results["download"] = bench_download(http, last_job, out_dir)
        results["get_job_latency"] = bench_latency(url, server.url, last_job)
    finally:
        http.close()
        api.stop()
        worker.stop(signal.SIGKILL)
        server.stop()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "README.md").write_text(report(results))
    print(json.dumps(results, indent=2))
    shutil.rmtree(work, ignore_errors=True)


def report(r: dict) -> str:
    u, d, f = r["upload"], r["download"], r["time_to_first_pair"]
    lat, mem, m, cfg = r["get_job_latency"], r["worker_peak_memory"], r["machine"], r["config"]
    first, second = f["first generation"], f["second generation"]
    api_ms, redis_ms = lat["api_get_job_ms"], lat["redis_hgetall_ms"]
    lines = [
        "# Service benchmark",
        "",
        f"Machine: {m['cpu_count']} CPU cores, {m['platform']}, Python {m['python']}. "
        f"Config: {cfg['preset']} preset, worker {cfg['worker']}, Redis {cfg['redis']}. "
        "Client, API, worker and Redis share the same cores. Produced by `bench/service/bench_service.py` "
        "(raw numbers in `results.json`).",
        "",
        "| measure | service | baseline |",
        "|---|---|---|",
        f"| upload ingest ({u['zip_bytes'] / MB:.1f} MB zip, {u['cohort']}) "
        f"| {u['upload_ingest_MBps']} MB/s ({u['upload_ingest_s']} s, validation included); "
        f"streaming alone {u['upload_streaming_only_MBps']} MB/s "
        f"| plain copy on the same disk {u['plain_copy_MBps']} MB/s |",
        f"| download ({d['files']} files, {d['dataset_bytes'] / MB:.1f} MB) | {d['download_MBps']} MB/s "
        f"| reading the same files {d['read_files_MBps']} MB/s |",
        f"| POST /v1/generations -> first pair on the download stream ({f['n_pairs']} pairs) "
        f"| {first['first_pair_s']} s (first job), {second['first_pair_s']} s (second) "
        f"| all pairs: {first['all_pairs_s']} s / {second['all_pairs_s']} s |",
        f"| GET /v1/jobs/{{id}}, {lat['clients']} concurrent clients, {lat['requests']} requests "
        f"| p50 {api_ms['p50']} ms, p99 {api_ms['p99']} ms "
        f"| Redis HGETALL: p50 {redis_ms['p50']} ms, p99 {redis_ms['p99']} ms |",
    ]
    for n, v in mem.items():
        lines.append(f"| worker peak RSS, N={n} pairs | {v['peak_rss_MB']} MB ({v['seconds']} s) | |")
    lines += [
        "",
        "Worker memory does not depend on N: pairs are sampled in batches and written slice by slice "
        "(streaming NIfTI writer), nothing accumulates per pair. The download is a zip written as it is sent "
        "(no temporary file); the upload is streamed to disk and extracted entry by entry.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
