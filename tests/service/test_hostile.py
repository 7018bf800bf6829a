"""Bad and hostile input, each case as an outside tester tried it: the answer is a 4xx that names the
file (or field) and the problem, nothing is left behind inside or outside the data dir, no server path
is shown, and the API's memory stays bounded whatever the archive's codec.

Archive cases run against ``service.archive`` and the in-process app; the ones about real clients
(a body the server answers before reading it, peak RSS) against a real uvicorn process.
"""

from __future__ import annotations

import socket
import time
import zipfile
from pathlib import Path

import anyio
import httpx
import pytest
import redis

from contract.records import ModelRecord
from contract.schemas import JobKind, ModelStatus
from runtime.jobs import JobStore
from runtime.storage import new_id
from service.archive import ArchiveError, ArchiveLimits, extract_zip
from service.edge import EdgeMiddleware
from tests.service import zips
from tests.service.conftest import A, zip_dir
from tests.service.procs import service_env, start_api

MiB = 1 << 20


def _entry(name: str, data: bytes, compression: int) -> bytes:
    return zips.make_zip([(name, data)], compression)


# Small archives and limits scaled down with them: the same checks, in milliseconds. (The API's peak
# memory with 512 MiB bombs is the slow test at the end.)
LIMITS = ArchiveLimits(ratio_min_bytes=MiB, archive_ratio_min_bytes=64 * MiB)
SMALL_ARCHIVE_FLOOR = ArchiveLimits(ratio_min_bytes=MiB, archive_ratio_min_bytes=4 * MiB)
ARCHIVE_CASES = [
    # (id, build, status, file named, words in the problem)
    (
        "bzip2 entry",
        lambda: zips.streamed_zip("c/flair.nii", 4 * MiB, zipfile.ZIP_BZIP2),
        422,
        "c/flair.nii",
        "bzip2",
    ),
    (
        "LZMA entry",
        lambda: zips.streamed_zip("c/flair.nii", 4 * MiB, zipfile.ZIP_LZMA),
        422,
        "c/flair.nii",
        "LZMA",
    ),
    (
        "deflate bomb",
        lambda: zips.streamed_zip("c/flair.nii", 16 * MiB, zipfile.ZIP_DEFLATED),
        422,
        "c/flair.nii",
        "ratio",
    ),
    (
        "padding under the entry ratio",  # 347:1 per entry passes 1000:1; the archive's 200:1 does not
        lambda: zips.streamed_zip("c/flair.nii", 12 * MiB, zipfile.ZIP_DEFLATED, sparse_every=2000),
        422,
        "<upload>",
        "padding",  # (with the archive's floor at 4 MiB instead of 64)
    ),
    (
        "truncated",
        lambda: _entry("c/a.nii", b"\x01" * MiB, zipfile.ZIP_DEFLATED)[:-200],
        422,
        "<upload>",
        "zip",
    ),
]


@pytest.mark.parametrize("name,build,status,file,words", ARCHIVE_CASES, ids=[c[0] for c in ARCHIVE_CASES])
def test_archive_codecs_and_bombs_are_bounded(tmp_path, name, build, status, file, words):
    archive = tmp_path / "upload.zip"
    archive.write_bytes(build())
    dest = tmp_path / "out"
    dest.mkdir()
    with pytest.raises(ArchiveError) as err:
        extract_zip(archive, dest, SMALL_ARCHIVE_FLOOR if name.startswith("padding") else LIMITS)
    assert err.value.status == status
    assert any(f == file and words in p for f, p in err.value.problems), err.value.problems
    written = sum(p.stat().st_size for p in dest.rglob("*") if p.is_file())
    assert written <= 6 * MiB  # stopped within a chunk of the limit it crossed, not at the end


def test_a_corrupt_entry_is_caught_by_its_crc(tmp_path):
    data = bytearray(_entry("c/a.nii", bytes(range(256)) * 64, zipfile.ZIP_STORED))
    start = data.find(bytes(range(16)))
    data[start + 5] ^= 0xFF  # one byte of the stored data
    archive = tmp_path / "upload.zip"
    archive.write_bytes(bytes(data))
    (tmp_path / "out").mkdir()
    with pytest.raises(ArchiveError) as err:
        extract_zip(archive, tmp_path / "out", ArchiveLimits())
    assert err.value.problems == [("c/a.nii", "CRC-32 mismatch (the entry is corrupt)")]


def test_the_quota_stops_an_extraction_with_507(tmp_path):
    archive = tmp_path / "upload.zip"
    archive.write_bytes(_entry("c/a.nii", bytes(range(256)) * 8192, zipfile.ZIP_STORED))  # 2 MiB
    (tmp_path / "out").mkdir()
    with pytest.raises(ArchiveError) as err:
        extract_zip(archive, tmp_path / "out", ArchiveLimits(), room=MiB)
    assert err.value.status == 507 and "quota" in err.value.problems[0][1]


# ---------------------------------------------------------------------------------------------- the app
def _no_leak(text: str, *roots: Path) -> None:
    for root in roots:
        assert str(root) not in text, f"server path {root} in {text!r}"


def test_a_bzip2_upload_is_refused_with_the_entry_and_nothing_is_left(client, settings):
    body = zips.streamed_zip("cohort/case1/flair.nii", 4 * MiB, zipfile.ZIP_BZIP2)
    r = client.post("/v1/cohorts", content=body, headers={**A, "Content-Type": "application/zip"})
    assert r.status_code == 422
    assert (
        r.json()["problems"][0]["file"] == "cohort/case1/flair.nii"
        and "bzip2" in r.json()["problems"][0]["problem"]
    )
    tenant = Path(settings.data_dir) / "tenants" / "tenant-a"
    assert not list((tenant / "cohorts").glob("*")) if (tenant / "cohorts").exists() else True
    assert not [p for p in (tenant / "staging").rglob("*") if p.is_file()]


def test_an_upload_past_the_quota_is_507(client, settings, phantom_zip, monkeypatch):
    monkeypatch.setattr(client.app.state.ctx.settings, "tenant_quota_bytes", 4096)
    r = client.post("/v1/cohorts", content=phantom_zip, headers={**A, "Content-Type": "application/zip"})
    assert r.status_code == 507 and "quota" in r.json()["detail"]
    assert client.get("/v1/cohorts", headers=A).json()["items"] == []


def test_a_garbage_nifti_is_named_without_server_paths(client, settings, tmp_path):
    folder = tmp_path / "cohort" / "case1"
    folder.mkdir(parents=True)
    for name in ("Flair.nii.gz", "OTMultiClass.nii.gz"):
        (folder / name).write_bytes(b"\x1f\x8b this is not gzip at all")
    body = zip_dir(tmp_path / "cohort", prefix="cohort/")
    r = client.post("/v1/cohorts", content=body, headers={**A, "Content-Type": "application/zip"})
    assert r.status_code == 422, r.text
    _no_leak(r.text, Path(settings.data_dir).resolve(), tmp_path)
    assert any(p["file"].startswith("cohort/case1/") for p in r.json()["problems"]), r.json()


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_json_numbers_are_422_and_not_echoed(client, literal):
    for path, body in (
        ("/v1/trainings", f'{{"cohort_id": "coh_{"0" * 32}", "steps": {literal}}}'),
        ("/v1/evaluations", f'{{"cohort_id": "coh_{"0" * 32}", "test_fraction": {literal}}}'),
        ("/v1/generations", f'{{"model_id": "mdl_{"0" * 32}", "n_pairs": 3, "seed": {literal}}}'),
    ):
        r = client.post(path, content=body, headers={**A, "Content-Type": "application/json"})
        assert r.status_code == 422, (path, r.text)
        assert literal not in r.text and r.json()["problems"], r.text


def test_json_bodies_are_capped_and_never_echoed(client):
    big = '{"cohort_id": "' + "x" * (2 * MiB) + '", "steps": 1}'
    r = client.post("/v1/trainings", content=big, headers={**A, "Content-Type": "application/json"})
    assert r.status_code == 413 and len(r.content) < 1000

    def chunks():  # no Content-Length: cut off while it is read
        yield b'{"cohort_id": "'
        for _ in range(3):
            yield b"y" * MiB

    r = client.post("/v1/trainings", content=chunks(), headers={**A, "Content-Type": "application/json"})
    assert r.status_code == 413 and len(r.content) < 1000


def test_a_bad_field_is_named_without_its_value(client):
    r = client.post("/v1/trainings", json={"cohort_id": "secret-value-" * 10, "steps": 1}, headers=A)
    assert r.status_code == 422 and "secret-value" not in r.text
    assert r.json()["problems"][0]["file"] == "body.cohort_id"


def test_a_malformed_last_event_id_is_422(client, app, settings):
    jobs = JobStore(redis.Redis.from_url(settings.redis_url))
    job_id = new_id("job")
    jobs.create(job_id, tenant="tenant-a", kind=JobKind.generation, request={})
    for bad in ("null", "abc", "1-2-3"):
        r = client.get(f"/v1/jobs/{job_id}/events", headers={**A, "Last-Event-ID": bad})
        assert r.status_code == 422 and r.json()["problems"][0]["file"] == "Last-Event-ID"


def test_no_redirect_is_built_from_the_host_header(client):
    r = client.get("/v1/jobs/", headers={**A, "Host": "evil.example"}, follow_redirects=False)
    assert r.status_code == 404 and "location" not in r.headers


def test_options_and_405_list_every_method_of_the_path(client):
    r = client.options("/v1/cohorts")
    assert r.status_code == 204 and r.headers["allow"] == "GET, OPTIONS, POST"
    r = client.put("/v1/jobs/job_" + "0" * 32, headers=A)
    assert r.status_code == 405 and r.headers["allow"] == "DELETE, GET, OPTIONS"
    assert "DELETE, GET, OPTIONS" in r.json()["detail"]


# ---------------------------------------------------------------------------------------------- jobs
def _queued_job(client, path: str, body: dict) -> dict:
    r = client.post(path, json=body, headers=A)
    assert r.status_code == 202, r.text
    return r.json()


@pytest.mark.parametrize("path", ["/v1/trainings", "/v1/augmentations"])
def test_cancelling_a_queued_job_ends_its_model(client, app, cohort_id, path):
    body = {"cohort_id": cohort_id, "steps": 5, **({"n_pairs": 2} if "augment" in path else {})}
    accepted = _queued_job(client, path, body)
    r = client.delete(f"/v1/jobs/{accepted['job_id']}", headers=A)
    assert r.status_code == 202 and r.json()["state"] == "cancelled"
    model = client.get(f"/v1/models/{accepted['model_id']}", headers=A).json()
    assert model["status"] == "cancelled"


def test_cancelling_a_queued_import_leaves_no_model_and_nothing_staged(client, app, settings, monkeypatch):
    monkeypatch.setattr(app.state.ctx.settings, "import_wait_s", 0.0)  # 202 at once: nobody validates it
    r = client.post(
        "/v1/models",
        content=b"PK\x03\x04" + b"\x00" * 4096,
        headers={**A, "Content-Type": "application/octet-stream"},
    )
    assert r.status_code == 202, r.text
    job_id, model_id = r.json()["job_id"], r.json()["model_id"]
    staging = Path(settings.data_dir) / "tenants" / "tenant-a" / "staging"
    assert (staging / job_id / "checkpoint.pt").is_file()
    assert client.delete(f"/v1/jobs/{job_id}", headers=A).json()["state"] == "cancelled"
    assert client.get(f"/v1/models/{model_id}", headers=A).status_code == 404
    assert not (staging / job_id).exists()


def test_a_tenant_past_its_active_jobs_gets_429_and_others_do_not(client, app, cohort_id, monkeypatch):
    monkeypatch.setattr(app.state.ctx.settings, "max_active_jobs", 2)
    for _ in range(2):
        _queued_job(client, "/v1/trainings", {"cohort_id": cohort_id, "steps": 5})
    before = {m["id"] for m in client.get("/v1/models", headers=A).json()["items"]}
    r = client.post("/v1/trainings", json={"cohort_id": cohort_id, "steps": 5}, headers=A)
    assert r.status_code == 429 and int(r.headers["retry-after"]) > 0
    after = {m["id"] for m in client.get("/v1/models", headers=A).json()["items"]}
    assert after == before  # the refused job reserved no model
    storage = app.state.ctx.storage
    assert all(storage.read("tenant-a", ModelRecord, m).status == ModelStatus.training for m in after)


def test_an_evaluation_warns_on_splits_too_small_to_mean_much(client, app, cohort_id):
    # the phantom cohort of these tests has 2 patients: 1 to train on, 1 to test on
    r = client.post("/v1/evaluations", json={"cohort_id": cohort_id, "n_pairs": [2], "seeds": 1}, headers=A)
    assert r.status_code == 202, r.text
    warnings = client.get(f"/v1/jobs/{r.json()['job_id']}", headers=A).json()["warnings"]
    assert any("1 training patient" in w for w in warnings) and any("1 test patient" in w for w in warnings)
    from service.routes.evaluations import split_warnings

    assert len(split_warnings(4, 0.3)) == 1  # one test patient: said so
    assert split_warnings(10, 0.3) == []
    with pytest.raises(Exception, match="at least 2"):
        split_warnings(1, 0.3)


def test_a_queued_evaluation_carries_its_warnings(client, app, settings, monkeypatch):
    from contract.records import CohortRecord
    from runtime.jobs import now_iso

    storage = app.state.ctx.storage
    cohort = CohortRecord(
        id=new_id("coh"),
        cases=["a", "b", "c", "d"],
        channels=["flair"],
        tumour_slices=8,
        warnings=[],
        created_at=now_iso(),
    )
    storage.write("tenant-a", cohort)
    r = client.post("/v1/evaluations", json={"cohort_id": cohort.id, "n_pairs": [2], "seeds": 1}, headers=A)
    assert r.status_code == 202, r.text
    job = client.get(f"/v1/jobs/{r.json()['job_id']}", headers=A).json()
    assert (
        job["warnings"] == [w for w in job["warnings"] if "test patient" in w] and len(job["warnings"]) == 1
    )


# ---------------------------------------------------------------------------------------------- edge
def test_a_stalled_body_is_408(caplog):
    async def app(scope, receive, send):
        while (await receive()).get("more_body"):
            pass

    sent: list[dict] = []

    async def run() -> None:
        calls = 0

        async def receive():
            nonlocal calls
            calls += 1
            if calls == 1:
                return {"type": "http.request", "body": b"{", "more_body": True}
            await anyio.sleep(60)  # the client stops sending

        async def send(message):
            sent.append(message)

        edge = EdgeMiddleware(app, max_json_bytes=MiB, body_timeout_s=0.2, drain_bytes=MiB)
        scope = {"type": "http", "method": "POST", "path": "/v1/trainings", "headers": []}
        with anyio.fail_after(5):
            await edge(scope, receive, send)

    with caplog.at_level("INFO"):
        anyio.run(run)
    assert sent[0]["status"] == 408 and b"stalled" in sent[1]["body"]
    assert [r.levelname for r in caplog.records if "stalled" in r.getMessage()] == ["INFO"]


@pytest.fixture(scope="module")
def live_api(redis_server, tmp_path_factory):
    """A real uvicorn process, as clients meet it."""
    data = tmp_path_factory.mktemp("live")
    env = service_env(
        redis_server.url, data / "data", DHVAE_MAX_UPLOAD_BYTES=str(8 * MiB), DHVAE_BODY_TIMEOUT_S="3"
    )
    proc, url = start_api(env, data / "api.log")
    yield proc, url, data / "data"
    proc.stop()


def _peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


@pytest.mark.slow  # a real uvicorn process
@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}], ids=["no key", "wrong key"])
def test_an_early_401_reaches_a_real_client(live_api, headers):
    _, url, _ = live_api
    body = b"\x00" * (12 * MiB)
    import requests

    for post in (
        httpx.post,
        lambda u, content, headers: requests.post(u, data=content, headers=headers, timeout=60),
    ):
        r = post(f"{url}/v1/cohorts", content=body, headers={**headers, "Content-Type": "application/zip"})
        assert r.status_code == 401 and r.json()["detail"] == "missing or invalid API key"


@pytest.mark.slow  # a real uvicorn process
def test_an_early_413_reaches_a_real_client(live_api):
    import urllib.error
    import urllib.request

    _, url, _ = live_api
    req = urllib.request.Request(
        f"{url}/v1/cohorts", data=b"\x00" * (12 * MiB), headers={**A, "Content-Type": "application/zip"}
    )
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=60)
    assert err.value.code == 413


@pytest.mark.slow  # a real uvicorn process
def test_a_body_shorter_than_its_length_is_408_and_health_stays_live(live_api, monkeypatch):
    proc, url, _ = live_api
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=60) as s:
        s.sendall(
            b"POST /v1/trainings HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer key-a\r\n"
            b'Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{"coh'
        )
        t0 = time.monotonic()
        assert httpx.get(f"{url}/health/live", timeout=5).status_code == 200  # not blocked meanwhile
        reply = s.recv(4096).decode()
    assert reply.startswith("HTTP/1.1 408") and time.monotonic() - t0 < 30
    assert "Traceback" not in proc.tail(200)


@pytest.mark.slow  # builds 512 MiB bombs (~25 s)
def test_api_memory_stays_bounded_whatever_the_codec(redis_server, tmp_path):
    env = service_env(redis_server.url, tmp_path / "data", DHVAE_MAX_UPLOAD_BYTES=str(64 * MiB))
    proc, url = start_api(env, tmp_path / "api.log")
    try:
        assert httpx.get(f"{url}/v1/cohorts", headers=A).status_code == 200  # warm
        idle = _peak_rss_mb(proc.pid)
        for compression in (zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA, zipfile.ZIP_DEFLATED):
            body = zips.streamed_zip("cohort/case1/flair.nii", 512 * MiB, compression)
            r = httpx.post(
                f"{url}/v1/cohorts",
                content=body,
                headers={**A, "Content-Type": "application/zip"},
                timeout=120,
            )
            assert r.status_code == 422, r.text
            assert _peak_rss_mb(proc.pid) - idle < 256, (compression, _peak_rss_mb(proc.pid), idle)
        leftovers = [p for p in (tmp_path / "data").rglob("*") if p.is_file()]
        assert leftovers == [], leftovers
    finally:
        proc.stop()


def test_one_tenant_never_holds_every_validation_slot():
    import threading

    from service.uploads import ValidationPool

    pool = ValidationPool(slots=2, deadline_s=60)
    order: list[str] = []
    gate = threading.Event()

    def slow(name: str) -> None:
        order.append(f"start {name}")
        gate.wait(10)
        order.append(f"end {name}")

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(pool.run, "a", slow, "a1")
            tg.start_soon(pool.run, "a", slow, "a2")
            await anyio.sleep(0.3)
            await pool.run("b", order.append, "start b1")  # the other tenant is not queued behind a
            assert order == ["start a1", "start b1"]
            gate.set()

    anyio.run(main)
    assert order[-2:] == ["end a1", "start a2"] or "end a2" in order


def test_an_upload_past_its_validation_deadline_is_422_and_leaves_nothing(client, settings, phantom_zip):
    client.app.state.ctx.validation.deadline_s = 0.0
    r = client.post("/v1/cohorts", content=phantom_zip, headers={**A, "Content-Type": "application/zip"})
    assert r.status_code == 422 and r.json()["problems"] == [
        {"file": "<upload>", "problem": "validation deadline exceeded"}
    ]
    tenant = Path(settings.data_dir) / "tenants" / "tenant-a"
    assert not [p for p in tenant.rglob("*") if p.is_file()]


def test_an_early_answer_is_sent_after_the_unread_body_is_drained():
    """The mechanism behind "early 401/413 reach real clients", at the ASGI level: the middleware
    reads the body the app left unread (up to DHVAE_DRAIN_BYTES) before the answer goes out."""
    events: list[str] = []

    async def app(scope, receive, send):  # answers at once, as a failed auth dependency does
        await send({"type": "http.response.start", "status": 401, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    async def run() -> None:
        chunks = [{"type": "http.request", "body": b"z" * MiB, "more_body": i < 11} for i in range(12)]

        async def receive():
            events.append("read")
            return chunks.pop(0)

        async def send(message):
            events.append(message["type"])

        edge = EdgeMiddleware(app, max_json_bytes=MiB, body_timeout_s=5, drain_bytes=64 * MiB)
        scope = {
            "type": "http",
            "method": "POST",
            "path": "/v1/cohorts",
            "headers": [(b"content-type", b"application/zip")],
        }
        await edge(scope, receive, send)

    anyio.run(run)
    assert events == ["read"] * 12 + ["http.response.start", "http.response.body"]
