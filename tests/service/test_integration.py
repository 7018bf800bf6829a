"""The real thing: redis-server, a Celery worker (prefork) and uvicorn as subprocesses, the tiny preset.

Order matters (one stack per module, to pay the worker's start-up once): the flow trains the model
that later tests generate from.
"""

from __future__ import annotations

import hashlib
import io
import json
import signal
import threading
import zipfile

import httpx
import nibabel as nib
import pytest

from tests.service.conftest import A, B
from tests.service.procs import pool_child_pids
from tests.service.stack import TIMEOUT, Stack, live_stack

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    yield from live_stack(tmp_path_factory.mktemp("stack"))


@pytest.fixture(scope="module")
def cohort(stack, brats_zip) -> str:
    r = stack.http.post("/v1/cohorts", content=brats_zip, headers={**A, "Content-Type": "application/zip"})
    assert r.status_code == 201, r.text
    assert r.json()["cases"] == ["brats_2013_pat0005_1", "brats_2013_pat0006_1"]
    return r.json()["id"]


def collect_events(stack: Stack, job_id: str, sink: list[dict]) -> threading.Thread:
    def run():
        with (
            httpx.Client(base_url=stack.url, timeout=None) as c,
            c.stream("GET", f"/v1/jobs/{job_id}/events", headers=A) as r,
        ):
            for line in r.iter_lines():
                if line.startswith("data:"):
                    sink.append(json.loads(line[5:]))

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def download(stack: Stack, job_id: str) -> zipfile.ZipFile:
    buf = io.BytesIO()
    with stack.http.stream("GET", f"/v1/jobs/{job_id}/download", headers=A, timeout=TIMEOUT) as r:
        assert r.status_code == 200, r.read()
        for chunk in r.iter_bytes():
            buf.write(chunk)
    zf = zipfile.ZipFile(buf)
    assert zf.testzip() is None
    return zf


def synthetic_bytes(zf: zipfile.ZipFile) -> dict[str, bytes]:
    return {n: zf.read(n) for n in zf.namelist() if "/synth_" in n}


# ---------------------------------------------------------------------------------------------- flow
def test_whole_flow_upload_augment_events_download(stack, cohort, tmp_path):
    n_pairs = 3
    r = stack.http.post(
        "/v1/augmentations",
        json={"cohort_id": cohort, "n_pairs": n_pairs, "preset": "tiny", "steps": 3, "seed": 7},
        headers=A,
    )
    assert r.status_code == 202, r.text
    job_id, model_id = r.json()["job_id"], r.json()["model_id"]
    events: list[dict] = []
    listener = collect_events(stack, job_id, events)
    zf = download(stack, job_id)  # starts while the job is queued; ends when the last file is written
    job = stack.done(job_id)
    listener.join(10)

    # events: every change up to the final state, progress never going backwards within a stage
    assert events[0]["state"] == "queued" and events[-1]["state"] == "succeeded"
    stages = [(e["progress"]["stage"], e["progress"]["done"]) for e in events if e["state"] == "running"]
    assert {"train", "generate"} <= {s for s, _ in stages}
    for (s1, d1), (s2, d2) in zip(stages, stages[1:], strict=False):
        assert s1 != s2 or d2 >= d1
    assert job["progress"]["done"] == job["progress"]["total"] == n_pairs
    assert job["started_at"] and job["finished_at"] and job["attempts"] == 1

    # the dataset: 2 real cases + exactly n synthetic pairs, every NIfTI valid, manifest matches
    names = zf.namelist()
    images = sorted(n for n in names if n.startswith("imagesTr/"))
    labels = sorted(n for n in names if n.startswith("labelsTr/"))
    assert len(images) == len(labels) == 2 + n_pairs
    assert sum("synth_" in n for n in labels) == n_pairs
    dataset = json.loads(zf.read("dataset.json"))
    assert dataset["numTraining"] == 2 + n_pairs
    manifest = json.loads(zf.read("manifest.json"))
    for name, entry in manifest["files"].items():
        assert hashlib.sha256(zf.read(name)).hexdigest() == entry["sha256"], name
    for n in images + labels:
        path = tmp_path / n
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(zf.read(n))
        assert len(nib.load(path).shape) == 3
    assert stack.http.get(f"/v1/jobs/{job_id}/preview.png", headers=A).content.startswith(b"\x89PNG")
    model = stack.http.get(f"/v1/models/{model_id}", headers=A).json()
    assert model["status"] == "ready" and model["config"]
    assert stack.http.get(f"/v1/jobs/{job_id}/download", headers=B).status_code == 404


def test_cancel_running_training(stack, cohort):
    r = stack.http.post("/v1/trainings", json={"cohort_id": cohort, "steps": 200, "seed": 1}, headers=A)
    job_id, model_id = r.json()["job_id"], r.json()["model_id"]
    stack.wait(job_id, lambda j: j["state"] == "running" and j["progress"]["stage"] == "train")
    assert stack.http.delete(f"/v1/jobs/{job_id}", headers=A).status_code == 202
    job = stack.done(job_id, "cancelled")
    assert job["progress"]["done"] < 200
    model = stack.http.get(f"/v1/models/{model_id}", headers=A).json()
    assert model["status"] == "cancelled"
    model_dir = stack.base / "data" / "tenants" / "tenant-a" / "models" / model_id
    assert not (model_dir / "model.pt").exists() and not (model_dir / "last.pt").exists()


# ---------------------------------------------------------------------------------------------- kill -9
@pytest.fixture(scope="module")
def trained_after_kill(stack, cohort) -> tuple[str, list[dict]]:
    """A training whose worker child is killed -9 after its first checkpoint (step 10 of 14)."""
    r = stack.http.post(
        "/v1/trainings", json={"cohort_id": cohort, "preset": "tiny", "steps": 14, "seed": 3}, headers=A
    )
    job_id, model_id = r.json()["job_id"], r.json()["model_id"]
    events: list[dict] = []
    listener = collect_events(stack, job_id, events)
    stack.wait(
        job_id, lambda j: j["progress"]["stage"] == "train" and j["progress"]["done"] >= 11, timeout=TIMEOUT
    )
    [child] = pool_child_pids(stack.worker)
    import os

    os.kill(child, signal.SIGKILL)
    stack.done(job_id)
    listener.join(10)
    return model_id, job_id, events


def test_kill_worker_mid_training_resumes_from_checkpoint(stack, trained_after_kill):
    model_id, job_id, events = trained_after_kill
    job = stack.job(job_id)
    assert job["attempts"] == 2, job
    train = [
        (e["attempts"], e["progress"]["done"])
        for e in events
        if e["state"] == "running" and e["progress"]["stage"] == "train"
    ]
    first = [d for a, d in train if a == 1]
    second = [d for a, d in train if a == 2]
    assert max(first) >= 11 and second, train
    assert min(second) >= 10, train  # resumed from the step-10 checkpoint, not from step 0
    assert stack.http.get(f"/v1/models/{model_id}", headers=A).json()["status"] == "ready"


def test_kill_worker_mid_generation_gives_exact_identical_pairs(stack, trained_after_kill):
    model_id = trained_after_kill[0]
    n = 40
    req = {"model_id": model_id, "n_pairs": n, "seed": 11, "min_mask_area": 0}  # a 12-step model: accept all
    killed = stack.http.post("/v1/generations", json=req, headers=A).json()["job_id"]
    stack.wait(
        killed, lambda j: j["progress"]["stage"] == "generate" and j["progress"]["done"] >= 3, timeout=TIMEOUT
    )
    [child] = pool_child_pids(stack.worker)
    import os

    os.kill(child, signal.SIGKILL)
    assert stack.done(killed)["attempts"] == 2
    reference = stack.http.post("/v1/generations", json=req, headers=A).json()["job_id"]
    stack.done(reference)
    got, want = synthetic_bytes(download(stack, killed)), synthetic_bytes(download(stack, reference))
    assert len(got) == 2 * n and sorted(got) == sorted(want)
    assert all(got[k] == want[k] for k in want), "resumed generation differs from an uninterrupted one"


def test_import_checkpoint(stack, trained_after_kill):
    model_id = trained_after_kill[0]
    weights = stack.base / "data" / "tenants" / "tenant-a" / "models" / model_id / "model.pt"
    r = stack.http.post(
        "/v1/models", content=weights.read_bytes(), headers={**A, "Content-Type": "application/octet-stream"}
    )
    assert r.status_code in (201, 202), r.text
    new_id = r.json().get("id") or r.json()["model_id"]
    if r.status_code == 202:
        stack.done(r.json()["job_id"])
    assert stack.http.get(f"/v1/models/{new_id}", headers=A).json()["status"] == "ready"
    # a zip that is not a checkpoint: rejected by the worker, nothing kept
    bad = io.BytesIO()
    with zipfile.ZipFile(bad, "w") as zf:
        zf.writestr("archive/data.pkl", b"\x80\x04K\x01.")
    r = stack.http.post(
        "/v1/models", content=bad.getvalue(), headers={**A, "Content-Type": "application/octet-stream"}
    )
    if r.status_code == 202:
        stack.done(r.json()["job_id"], "failed")
        assert stack.http.get(f"/v1/models/{r.json()['model_id']}", headers=A).status_code == 404
    else:
        assert r.status_code == 422, r.text


# ---------------------------------------------------------------------------------------------- redis restart
def test_redis_restart_mid_job_keeps_records(stack, cohort):
    r = stack.http.post(
        "/v1/trainings", json={"cohort_id": cohort, "preset": "tiny", "steps": 8, "seed": 5}, headers=A
    )
    job_id = r.json()["job_id"]
    before = stack.wait(job_id, lambda j: j["progress"]["stage"] == "train" and j["progress"]["done"] >= 2)
    stack.redis.restart(signal.SIGKILL, down_s=1.0)
    job = stack.done(job_id)
    assert job["created_at"] == before["created_at"] and job["started_at"] == before["started_at"]
    assert job["progress"]["done"] == 8
    assert any(j["id"] == job_id for j in stack.http.get("/v1/jobs", headers=A).json()["items"])
    stack.wait_ready()


def test_whole_worker_killed_job_is_requeued_by_janitor(stack, cohort):
    """kill -9 of the whole worker (parent and child): only the janitor of the next worker brings the
    job back (the visibility timeout is days)."""
    r = stack.http.post(
        "/v1/trainings", json={"cohort_id": cohort, "preset": "tiny", "steps": 14, "seed": 9}, headers=A
    )
    job_id = r.json()["job_id"]
    stack.wait(job_id, lambda j: j["progress"]["stage"] == "train" and j["progress"]["done"] >= 11)
    stack.restart_worker()
    job = stack.done(job_id)
    assert job["attempts"] == 2


# ---------------------------------------------------------------------------------------------- evaluation
def test_evaluation_end_to_end_report_and_plot(stack, cohort):
    body = {
        "cohort_id": cohort,
        "preset": "tiny",
        "steps": 3,
        "n_pairs": [4],
        "seeds": 2,
        "test_fraction": 0.5,
        "baselines": ["traditional"],
        "unet": "tiny",
        "unet_epochs": 1,
    }
    r = stack.http.post("/v1/evaluations", json=body, headers=A)
    assert r.status_code == 202, r.text
    job_id = r.json()["job_id"]
    job = stack.done(job_id)
    assert job["kind"] == "evaluation" and job["progress"]["unit"] == "runs"
    report = stack.http.get(f"/v1/jobs/{job_id}/report.json", headers=A).json()
    assert report["complete"] is True
    train, test = report["data"]["train_patients"], report["data"]["test_patients"]
    assert len(train) == len(test) == 1 and set(train) | set(test) == {
        "brats_2013_pat0005_1",
        "brats_2013_pat0006_1",
    }
    working = [m for m in ("dhvae", "traditional") if m not in report["failed_generators"]]
    assert "traditional" in working
    assert len(report["rows"]) == (1 + len(working)) * 2 * 2  # (none + generators) x seeds x protocols
    for row in report["rows"]:
        assert {"method", "protocol", "n_synthetic", "seed", "dice_slice", "dice_3d", "hd95"} <= set(row)
        assert 0.0 <= row["dice_slice"] <= 1.0
    assert set(report["verdict"]) == {"fixed_epochs", "step_matched"}
    png = stack.http.get(f"/v1/jobs/{job_id}/report.png", headers=A)
    assert png.status_code == 200 and png.content.startswith(b"\x89PNG")
    assert stack.http.get(f"/v1/jobs/{job_id}/report.json", headers=B).status_code == 404
