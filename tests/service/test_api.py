"""The REST API in-process (TestClient) against a real redis-server; no worker (messages just queue)."""

from __future__ import annotations

import io
import json
import threading
import time
import zipfile

import nibabel as nib
import numpy as np
import pytest
import redis

from contract.records import ModelRecord
from contract.schemas import JobProgress, JobState
from runtime.jobs import JobStore
from tests.service import zips
from tests.service.conftest import A, B, zip_dir

ZIP = {"Content-Type": "application/zip"}


def upload(client, data: bytes, headers=A, **kw):
    return client.post("/v1/cohorts", content=data, headers={**headers, **ZIP, **kw.pop("extra", {})}, **kw)


def leftovers(settings, tenant="tenant-a") -> list[str]:
    """Every file the tenant has on disk, and every folder below its top-level containers."""
    root = settings.data_dir / "tenants" / tenant
    if not root.exists():
        return []
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() or p.parent != root)


def queued_messages(settings) -> list[dict]:
    r = redis.Redis.from_url(settings.redis_url)
    return [json.loads(m) for m in r.lrange(settings.queue, 0, -1)]


# ---------------------------------------------------------------------------------------------- auth
@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer nope"}, {"Authorization": "Basic key-a"}, {"Authorization": "Bearer"}],
)
def test_missing_or_wrong_key_is_401(client, headers):
    for path in ("/v1/cohorts", "/v1/models", "/v1/jobs"):
        r = client.get(path, headers=headers)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert client.get("/health/live").status_code == 200


def test_keys_are_kept_as_hashes():
    from service.deps import KeyRing

    ring = KeyRing("a:secret1,b:sha256:" + __import__("hashlib").sha256(b"secret2").hexdigest())
    assert ring.tenant_for("secret1") == "a" and ring.tenant_for("secret2") == "b"
    assert ring.tenant_for("secret3") is None
    assert "secret1" not in repr(ring.__dict__)


# ---------------------------------------------------------------------------------------------- cohorts
def test_cohort_upload_list_get_delete_and_isolation(client, settings, phantom_zip):
    r = upload(client, phantom_zip)
    assert r.status_code == 201, r.text
    body = r.json()
    assert set(body) >= {"id", "cases", "channels", "tumour_slices", "warnings"}
    assert body["cases"] == ["phantom_000", "phantom_001"] and "flair" in body["channels"]
    assert body["tumour_slices"] > 0
    cid = body["id"]
    assert r.headers["location"] == f"/v1/cohorts/{cid}"
    assert client.get(f"/v1/cohorts/{cid}", headers=A).json() == body
    assert [c["id"] for c in client.get("/v1/cohorts", headers=A).json()["items"]] == [cid]
    # another tenant sees nothing and cannot touch it
    assert client.get(f"/v1/cohorts/{cid}", headers=B).status_code == 404
    assert client.get("/v1/cohorts", headers=B).json()["items"] == []
    assert client.delete(f"/v1/cohorts/{cid}", headers=B).status_code == 404
    assert client.delete(f"/v1/cohorts/{cid}", headers=A).status_code == 204
    assert client.get(f"/v1/cohorts/{cid}", headers=A).status_code == 404
    assert leftovers(settings) == []


def _phantom_variant(phantom_dir, tmp_path, mutate) -> bytes:
    import shutil

    d = tmp_path / "variant"
    shutil.copytree(phantom_dir, d)
    mutate(d)
    return zip_dir(d)


def _empty_masks(d):
    for seg in d.rglob("*_seg.nii.gz"):
        img = nib.load(seg)
        nib.save(nib.Nifti1Image(np.zeros(img.shape, np.uint8), img.affine), seg)


def _mismatched_pair(d):
    seg = next(d.rglob("phantom_001_seg.nii.gz"))
    img = nib.load(seg)
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj)[:, :-4], img.affine), seg)


def _not_nifti(d):
    next(d.rglob("phantom_000_flair.nii.gz")).write_bytes(b"this is a text file, not a NIfTI volume")


BAD_COHORTS = [
    ("empty masks", _empty_masks),
    ("mismatched pair", _mismatched_pair),
    ("not NIfTI", _not_nifti),
]


@pytest.mark.parametrize("name,mutate", BAD_COHORTS, ids=[b[0] for b in BAD_COHORTS])
def test_bad_cohort_is_422_with_problems_and_leaves_nothing(
    client, settings, phantom_dir, tmp_path, name, mutate
):
    r = upload(client, _phantom_variant(phantom_dir, tmp_path, mutate))
    assert r.status_code == 422, r.text
    problems = r.json()["problems"]
    assert problems and all(set(p) == {"file", "problem"} for p in problems)
    assert any("phantom_00" in p["file"] for p in problems), problems
    assert leftovers(settings) == []


HOSTILE = [
    ("zip-slip", lambda: zips.make_zip([("../evil.nii.gz", zips.NIFTI_GZ)]), 422),
    ("symlink", zips.symlink_zip, 422),
    ("bomb", zips.bomb_zip, 422),
    ("encrypted", zips.encrypted_zip, 422),
    ("nested", zips.nested_zip, 422),
    ("not a zip", lambda: b"hello", 422),
]


@pytest.mark.parametrize("name,build,status", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_upload_is_refused_and_leaves_nothing(client, settings, name, build, status):
    r = upload(client, build())
    assert r.status_code == status, r.text
    assert r.json()["problems"]
    assert leftovers(settings) == []
    assert not (settings.data_dir / "evil.nii.gz").exists()


def test_oversize_upload_is_413_while_streaming(settings, phantom_zip):
    """No Content-Length (chunked): the limit is enforced on the bytes as they arrive."""
    from fastapi.testclient import TestClient

    from service.main import create_app

    settings = settings.model_copy(update={"max_upload_bytes": 100_000})
    sent = []

    def body():
        for i in range(0, len(phantom_zip), 16384):
            sent.append(i)
            yield phantom_zip[i : i + 16384]

    with TestClient(create_app(settings)) as client:
        r = client.post("/v1/cohorts", content=body(), headers={**A, **ZIP})
        assert r.status_code == 413, r.text
        r = client.post("/v1/cohorts", content=phantom_zip, headers={**A, **ZIP})  # with Content-Length
        assert r.status_code == 413
    assert len(phantom_zip) > 100_000 and leftovers(settings) == []


def test_uncompressed_limit_is_413(settings):
    from fastapi.testclient import TestClient

    from service.main import create_app

    settings = settings.model_copy(update={"max_uncompressed_bytes": 1 << 20})
    data = zips.make_zip([("a/flair.nii", b"\x01" * (2 << 20))])
    with TestClient(create_app(settings)) as client:
        assert upload(client, data).status_code == 413
    assert leftovers(settings) == []


def test_wrong_content_type_is_415(client):
    r = client.post("/v1/cohorts", content=b"x", headers={**A, "Content-Type": "text/plain"})
    assert r.status_code == 415


# ---------------------------------------------------------------------------------------------- jobs
def test_training_is_queued_by_task_name(client, settings, cohort_id):
    r = client.post(
        "/v1/trainings", json={"cohort_id": cohort_id, "preset": "tiny", "steps": 3, "seed": 1}, headers=A
    )
    assert r.status_code == 202, r.text
    body = r.json()
    assert r.headers["location"] == f"/v1/jobs/{body['job_id']}"
    [msg] = queued_messages(settings)
    assert msg["headers"]["task"] == "dhvae.train" and msg["headers"]["id"] == body["job_id"]
    job = client.get(f"/v1/jobs/{body['job_id']}", headers=A).json()
    assert job["state"] == "queued" and job["kind"] == "training"
    assert set(job) >= {
        "id",
        "kind",
        "state",
        "progress",
        "error",
        "created_at",
        "started_at",
        "finished_at",
        "links",
    }
    assert set(job["progress"]) >= {"done", "total", "unit", "eta_s"}
    model = client.get(f"/v1/models/{body['model_id']}", headers=A).json()
    assert model["status"] == "training" and model["job_id"] == body["job_id"]
    # another tenant sees neither
    assert client.get(f"/v1/jobs/{body['job_id']}", headers=B).status_code == 404
    assert client.get(f"/v1/models/{body['model_id']}", headers=B).status_code == 404
    # a cohort in use cannot be deleted
    assert client.delete(f"/v1/cohorts/{cohort_id}", headers=A).status_code == 409


@pytest.mark.parametrize(
    "path,body,status",
    [
        ("/v1/trainings", {"cohort_id": "coh_" + "0" * 32, "steps": 3}, 404),
        ("/v1/trainings", {"cohort_id": "nonsense", "steps": 3}, 422),
        ("/v1/trainings", {"cohort_id": "coh_" + "0" * 32, "steps": 0}, 422),
        ("/v1/trainings", {"cohort_id": "coh_" + "0" * 32, "steps": 3, "preset": "huge"}, 422),
        ("/v1/generations", {"model_id": "mdl_" + "0" * 32, "n_pairs": 2}, 404),
        ("/v1/augmentations", {"cohort_id": "coh_" + "0" * 32, "n_pairs": 2, "steps": 2}, 404),
    ],
)
def test_bad_job_requests(client, path, body, status):
    assert client.post(path, json=body, headers=A).status_code == status


def test_other_tenants_cohort_is_404_for_training(client, cohort_id):
    r = client.post("/v1/trainings", json={"cohort_id": cohort_id, "steps": 3}, headers=B)
    assert r.status_code == 404


def test_idempotency_key_replays_first_response_and_starts_nothing(client, settings, cohort_id):
    req = {"cohort_id": cohort_id, "preset": "tiny", "steps": 3, "seed": 1}
    first = client.post("/v1/trainings", json=req, headers={**A, "Idempotency-Key": "k1"})
    again = client.post("/v1/trainings", json=req, headers={**A, "Idempotency-Key": "k1"})
    assert first.status_code == again.status_code == 202
    assert first.json() == again.json() and again.headers["idempotent-replayed"] == "true"
    assert again.headers["location"] == first.headers["location"]
    assert len(queued_messages(settings)) == 1
    assert len(client.get("/v1/jobs", headers=A).json()["items"]) == 1
    # a different body under the same key is refused; the same key for another tenant is its own
    assert (
        client.post(
            "/v1/trainings", json={**req, "seed": 2}, headers={**A, "Idempotency-Key": "k1"}
        ).status_code
        == 422
    )
    assert client.post("/v1/trainings", json=req, headers={**B, "Idempotency-Key": "k1"}).status_code == 404


def test_idempotent_upload(client, settings, phantom_zip):
    first = upload(client, phantom_zip, extra={"Idempotency-Key": "u1"})
    again = upload(client, phantom_zip, extra={"Idempotency-Key": "u1"})
    assert first.status_code == again.status_code == 201 and first.json() == again.json()
    assert len(client.get("/v1/cohorts", headers=A).json()["items"]) == 1


def test_cancel_queued_job_and_events(client, cohort_id):
    job_id = client.post("/v1/trainings", json={"cohort_id": cohort_id, "steps": 3}, headers=A).json()[
        "job_id"
    ]
    assert client.delete(f"/v1/jobs/{job_id}", headers=B).status_code == 404
    r = client.delete(f"/v1/jobs/{job_id}", headers=A)
    assert r.status_code == 202 and r.json()["state"] == "cancelled"
    assert client.delete(f"/v1/jobs/{job_id}", headers=A).status_code == 409
    with client.stream("GET", f"/v1/jobs/{job_id}/events", headers=A) as s:
        events = [json.loads(line[5:]) for line in s.iter_lines() if line.startswith("data:")]
    assert [e["state"] for e in events] == ["queued", "cancelled"]


def test_unknown_job_is_404(client):
    for suffix in ("", "/events", "/download", "/preview.png"):
        assert client.get(f"/v1/jobs/job_{'0' * 32}{suffix}", headers=A).status_code == 404


# ---------------------------------------------------------------------------------------------- download
def _write_pair(out, i, size=32):
    img = np.random.default_rng(i).random((size, size, 1), dtype=np.float32)
    mask = np.zeros((size, size, 1), np.uint8)
    mask[8:20, 10:22] = 1
    for sub, name, data in (
        ("imagesTr", f"synth_{i:05d}_0000.nii.gz", img),
        ("labelsTr", f"synth_{i:05d}.nii.gz", mask),
    ):
        (out / sub).mkdir(parents=True, exist_ok=True)
        tmp = out / sub / f".tmp_{name}"
        nib.save(nib.Nifti1Image(data, np.eye(4)), tmp)
        tmp.rename(out / sub / name)


@pytest.fixture
def generation_job(client, app, settings):
    """A generation job whose 'worker' is this test: a ready model record, the job set running."""
    ctx = app.state.ctx
    model_id = "mdl_" + "1" * 32
    ctx.storage.write(
        "tenant-a",
        ModelRecord(id=model_id, status="ready", source="import", created_at="2026-01-01T00:00:00Z"),
    )
    r = client.post("/v1/generations", json={"model_id": model_id, "n_pairs": 3, "seed": 0}, headers=A)
    assert r.status_code == 202, r.text
    job_id = r.json()["job_id"]
    jobs = JobStore(redis.Redis.from_url(settings.redis_url))
    jobs.transition(job_id, {JobState.queued}, JobState.running)
    return job_id, ctx.storage.path("tenant-a", "outputs", job_id), jobs


def test_download_streams_pairs_as_they_are_produced(client, generation_job):
    job_id, out, jobs = generation_job
    _write_pair(out, 0)
    (out / "imagesTr" / ".synth_00001_0000.nii.gz.tmp").write_bytes(b"partial")  # never sent

    def worker():
        time.sleep(0.3)
        for i in (1, 2):
            _write_pair(out, i)
            jobs.set_progress(job_id, JobProgress(done=i + 1, total=3, unit="pairs"))
            time.sleep(0.2)
        (out / "dataset.json").write_text("{}")
        (out / "manifest.json").write_text("{}")
        (out / "imagesTr" / ".synth_00001_0000.nii.gz.tmp").unlink()
        jobs.transition(job_id, {JobState.running}, JobState.succeeded)

    t = threading.Thread(target=worker)
    t.start()
    first_chunk_at, start = None, time.monotonic()
    buf = io.BytesIO()
    with client.stream("GET", f"/v1/jobs/{job_id}/download", headers=A) as r:
        assert r.status_code == 200 and r.headers["content-type"] == "application/zip"
        for chunk in r.iter_bytes():
            first_chunk_at = first_chunk_at or time.monotonic() - start
            buf.write(chunk)
    t.join()
    assert first_chunk_at < 0.3  # pair 0 went out before the job finished
    names = zipfile.ZipFile(buf).namelist()
    assert names[-2:] == ["dataset.json", "manifest.json"]
    assert sorted(n for n in names if n.endswith(".nii.gz")) == sorted(
        [f"imagesTr/synth_{i:05d}_0000.nii.gz" for i in range(3)]
        + [f"labelsTr/synth_{i:05d}.nii.gz" for i in range(3)]
    )
    zf = zipfile.ZipFile(buf)
    assert zf.testzip() is None
    for n in names:
        if n.endswith(".nii.gz"):
            assert zf.read(n) == (out / n).read_bytes()

    png = client.get(f"/v1/jobs/{job_id}/preview.png?n=3", headers=A)
    assert png.status_code == 200 and png.content.startswith(b"\x89PNG")
    assert client.get(f"/v1/jobs/{job_id}/download", headers=B).status_code == 404


def test_download_of_failed_job_is_409(client, generation_job):
    job_id, _, jobs = generation_job
    assert client.get(f"/v1/jobs/{job_id}/preview.png", headers=A).status_code == 409  # nothing yet
    jobs.transition(job_id, {JobState.running}, JobState.failed)
    assert client.get(f"/v1/jobs/{job_id}/download", headers=A).status_code == 409


# ---------------------------------------------------------------------------------------------- models
def test_import_refuses_a_non_checkpoint_at_once(client, settings):
    r = client.post(
        "/v1/models", content=b"not a torch file", headers={**A, "Content-Type": "application/octet-stream"}
    )
    assert r.status_code == 422 and r.json()["problems"]
    assert client.get("/v1/models", headers=A).json()["items"] == [] and leftovers(settings) == []


def test_import_waits_for_a_worker_then_202(client, settings):
    data = zips.make_zip([("archive/data.pkl", b"x")])
    r = client.post("/v1/models", content=data, headers={**A, "Content-Type": "application/octet-stream"})
    assert r.status_code == 202 and r.json()["model_id"]
    assert queued_messages(settings)[0]["headers"]["task"] == "dhvae.import_model"


def test_health(client):
    assert client.get("/health/live").json() == {"status": "ok"}
    r = client.get("/health/ready")
    assert r.status_code == 503 and r.json()["checks"]["redis"] == "ok"


def test_redis_down_is_503_with_retry_after(client, redis_server):
    redis_server.stop()
    try:
        r = client.get(f"/v1/jobs/job_{'0' * 32}", headers=A)
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert client.get("/health/ready").status_code == 503
    finally:
        redis_server.start()


@pytest.mark.parametrize(
    ("method", "generator"), [("lsgan", "lsgan"), ("hvae", "hvae"), ("insert_healthy_dhvae", "dhvae")]
)
def test_a_baseline_generator_is_passed_to_the_worker(client, settings, cohort_id, method, generator):
    """The method travels to the worker as asked; the model the job makes is the generator it trains
    (a donor insertion's is its dHVAE)."""
    r = client.post(
        "/v1/augmentations",
        json={"cohort_id": cohort_id, "model": method, "n_pairs": 2, "steps": 3, "seed": 1},
        headers=A,
    )
    assert r.status_code == 202, r.text
    [msg] = queued_messages(settings)
    assert msg["headers"]["task"] == "dhvae.augment"
    payload = json.loads(__import__("base64").b64decode(msg["body"]))[1]["payload"]
    assert payload["model"] == method
    model = client.get(f"/v1/models/{r.json()['model_id']}", headers=A).json()
    assert model["model"] == generator


def test_an_unknown_generator_is_422(client, cohort_id):
    r = client.post(
        "/v1/trainings", json={"cohort_id": cohort_id, "model": "stylegan", "steps": 3}, headers=A
    )
    assert r.status_code == 422


# ---------------------------------------------------------------------------------------------- evaluations
def test_evaluation_payload_has_each_n_seed_and_protocol_once(client, settings, cohort_id):
    body = {
        "cohort_id": cohort_id,
        "n_pairs": [8, 4, 8],
        "seeds": [3, 1, 3],
        "protocols": ["step_matched"] * 2,
    }
    assert client.post("/v1/evaluations", json=body, headers=A).status_code == 202
    [msg] = queued_messages(settings)
    payload = json.loads(__import__("base64").b64decode(msg["body"]))[1]["payload"]
    assert (payload["n_pairs"], payload["seeds"], payload["protocols"]) == ([4, 8], [1, 3], ["step_matched"])


def test_evaluation_is_queued_with_its_grid(client, settings, cohort_id):
    body = {
        "cohort_id": cohort_id,
        "n_pairs": [8, 4, 8],
        "seeds": 2,
        "test_fraction": 0.5,
        "baselines": ["traditional"],
    }
    r = client.post("/v1/evaluations", json=body, headers=A)
    assert r.status_code == 202, r.text
    job_id = r.json()["job_id"]
    [msg] = queued_messages(settings)
    assert msg["headers"]["task"] == "dhvae.evaluate"
    job = client.get(f"/v1/jobs/{job_id}", headers=A).json()
    assert job["kind"] == "evaluation" and job["state"] == "queued"
    # (real-only + 2 generators x 2 distinct N) x 2 seeds x 2 protocols
    assert job["progress"] == {**job["progress"], "total": 20, "unit": "runs"}
    assert job["links"]["report"] == f"/v1/jobs/{job_id}/report.json"
    # no report before the job has succeeded; no dataset for an evaluation; nothing for another tenant
    assert client.get(f"/v1/jobs/{job_id}/report.json", headers=A).status_code == 409
    assert client.get(f"/v1/jobs/{job_id}/download", headers=A).status_code == 409
    assert client.get(f"/v1/jobs/{job_id}/report.png", headers=B).status_code == 404


@pytest.mark.parametrize(
    "change, status",
    [
        ({"n_pairs": []}, 422),
        ({"n_pairs": [0]}, 422),
        ({"seeds": 0}, 422),
        ({"seeds": [-1]}, 422),
        ({"test_fraction": 1.0}, 422),
        ({"baselines": ["stylegan"]}, 422),
        ({"protocols": ["longer"]}, 422),
        ({"n_pairs": [1, 2, 3, 4, 5, 6, 7, 8, 9], "seeds": 20, "baselines": ["traditional", "vae"]}, 422),
        ({"cohort_id": "coh_" + "0" * 32}, 404),
        ({"model_id": "mdl_" + "0" * 32}, 404),
    ],
)
def test_bad_evaluations(client, cohort_id, change, status):
    r = client.post("/v1/evaluations", json={"cohort_id": cohort_id, **change}, headers=A)
    assert r.status_code == status, r.text


def test_evaluation_refuses_a_model_trained_on_the_same_cohort(client, settings, cohort_id):
    from service.lookups import create_model_record

    ctx = client.app.state.ctx
    create_model_record(
        ctx, "tenant-a", "mdl_" + "1" * 32, source="training", cohort_id=cohort_id, status="ready"
    )
    r = client.post(
        "/v1/evaluations", json={"cohort_id": cohort_id, "model_id": "mdl_" + "1" * 32}, headers=A
    )
    assert r.status_code == 409 and "test patients" in r.json()["detail"]
    assert queued_messages(settings) == []


def test_a_crossval_evaluation_of_too_few_patients_is_refused(client, cohort_id):
    body = {"cohort_id": cohort_id, "design": "crossval", "folds": 2, "seeds": 1}
    r = client.post("/v1/evaluations", json=body, headers=A)
    assert r.status_code == 422 and "too few for 2 folds" in r.json()["detail"]
