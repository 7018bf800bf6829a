"""The client (dhvae_client) and its CLI against a live stack: redis-server, a Celery worker and
uvicorn as subprocesses. Upload (a folder, zipped on the fly), augment, wait on the events, download
and verify; every typed error; the 401 and 413 on a 12 MB body; retries through a Redis restart."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
import requests
from dhvae_client import (
    AuthError,
    BadRequest,
    Client,
    CohortInvalid,
    Conflict,
    JobFailed,
    NotFound,
    TooLarge,
    TooManyJobs,
)
from dhvae_client.cli import main as remote

from tests.service.conftest import SHARED_TRAIN
from tests.service.stack import live_stack

pytestmark = pytest.mark.slow
MAX_UPLOAD = 10 << 20  # the stack's body limit: a 12 MB body is past it


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    yield from live_stack(
        tmp_path_factory.mktemp("client-stack"),
        DHVAE_MAX_UPLOAD_BYTES=str(MAX_UPLOAD),
        DHVAE_MAX_ACTIVE_JOBS="2",
    )


@pytest.fixture(scope="module")
def cohort_folder(tmp_path_factory) -> Path:
    """The shared BraTS training cases, FLAIR and labels only (symlinks: no data is copied)."""
    if not SHARED_TRAIN.is_dir():
        pytest.skip(f"{SHARED_TRAIN} is absent")
    root = tmp_path_factory.mktemp("cohort") / "brats"
    for case in sorted(SHARED_TRAIN.iterdir()):
        (root / case.name).mkdir(parents=True)
        for f in case.iterdir():
            if f.name.startswith(("Flair", "OTMultiClass")):
                (root / case.name / f.name).symlink_to(f)
    return root


@pytest.fixture(scope="module")
def client(stack):
    with Client(stack.url, "key-a", progress=False, backoff=0.2) as c:
        yield c


def test_upload_augment_wait_download_verify(client, cohort_folder, tmp_path):
    cohort = client.upload_cohort(cohort_folder)
    assert cohort.cases == ["brats_2013_pat0005_1", "brats_2013_pat0006_1"]
    assert "2 cases" in repr(cohort)
    job = client.augment(cohort, n_pairs=3, steps=4, preset="tiny", seed=1)
    assert job.kind == "augmentation" and job.id in repr(job)
    job.wait(timeout=600)
    assert job.state == "succeeded" and "succeeded" in repr(job)
    out = job.download(tmp_path / "augmented")
    labels = sorted(p.name for p in (out / "labelsTr").iterdir())
    assert sum(n.startswith("synth_") for n in labels) == 3 and len(labels) == 3 + 2
    assert (out / "dataset.json").is_file() and not list(out.glob(".download-*"))
    assert client.case_preview(cohort, cohort.cases[0])[:8] == b"\x89PNG\r\n\x1a\n"
    assert job.preview(n=2)[:4] == b"\x89PNG"
    with pytest.raises(Conflict, match="already succeeded"):
        job.cancel()


def test_typed_errors_carry_the_service_s_words(stack, client, tmp_path):
    with pytest.raises(AuthError, match="401"), Client(stack.url, "wrong", progress=False) as bad:
        bad.cohorts()
    with pytest.raises(NotFound, match="job_"):
        client.job("job_" + "0" * 32)
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "case1").mkdir()
    (junk / "case1" / "image.nii.gz").write_bytes(b"not a nifti")
    with pytest.raises(CohortInvalid) as e:
        client.upload_cohort(junk)
    assert e.value.status == 422 and e.value.problems and all(p.problem for p in e.value.problems)
    with pytest.raises(NotFound, match="cohort"):
        client.train("coh_" + "0" * 32, steps=1)


def test_a_big_body_gets_its_401_and_413_not_a_reset(stack, tmp_path):
    big = tmp_path / "big.zip"
    big.write_bytes(os.urandom(12 << 20))
    with pytest.raises(AuthError), Client(stack.url, "wrong", progress=False, retries=0) as bad:
        bad.upload_cohort(big)
    with pytest.raises(TooLarge, match="413"), Client(stack.url, "key-a", progress=False, retries=0) as c:
        c.upload_cohort(big)
    with open(big, "rb") as f:  # and with requests, the same answers
        r = requests.post(
            f"{stack.url}/v1/cohorts",
            data=f,
            headers={"Authorization": "Bearer wrong", "Content-Type": "application/zip"},
            timeout=60,
        )
    assert r.status_code == 401
    with open(big, "rb") as f:
        r = requests.post(
            f"{stack.url}/v1/cohorts",
            data=f,
            headers={"Authorization": "Bearer key-a", "Content-Type": "application/zip"},
            timeout=60,
        )
    assert r.status_code == 413 and "limit" in r.json()["detail"]


def test_calls_ride_through_a_redis_restart(stack, client):
    done = threading.Event()

    def bounce():
        stack.redis.restart(down_s=2.0)
        done.set()

    t = threading.Thread(target=bounce)
    t.start()
    try:
        items = client.jobs()  # 503 + Retry-After while Redis is down: retried until it is back
    finally:
        t.join()
    assert done.is_set() and isinstance(items, list)


def test_a_cancelled_job_raises_on_wait(client, cohort_folder):
    cohort = client.cohorts()[0]
    job = client.train(cohort, steps=100000 // 100, preset="tiny")
    job.cancel()
    with pytest.raises(JobFailed, match="cancelled"):
        job.wait(timeout=120)


def test_the_cli_uploads_follows_and_downloads(stack, cohort_folder, tmp_path, capsys):
    base = ["--url", stack.url, "--key", "key-a", "--no-progress"]
    assert remote([*base, "upload", str(cohort_folder)]) == 0
    cohort_id = capsys.readouterr().out.strip().splitlines()[-1]
    assert cohort_id.startswith("coh_")
    out = tmp_path / "aug"
    assert (
        remote(
            [*base, "augment", cohort_id, "--n-pairs", "2", "--steps", "3", "--wait", "--download", str(out)]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "succeeded" in printed and (out / "manifest.json").is_file()
    assert remote([*base, "status", "job_" + "0" * 32]) == 1
    assert "404" in capsys.readouterr().err


def test_too_many_jobs_and_a_bad_request(stack, cohort_folder):
    """Last in the module: tenant b fills its active-job cap (2 here), then cancels."""
    with Client(stack.url, "key-b", progress=False, retries=0) as c:
        cohort = c.upload_cohort(cohort_folder)
        with pytest.raises(BadRequest) as e:
            c.augment(cohort, n_pairs=0, steps=1)
        assert e.value.status == 422 and any(p.file.endswith("n_pairs") for p in e.value.problems)
        jobs = [c.train(cohort, steps=5000) for _ in range(2)]
        with pytest.raises(TooManyJobs, match="429"):
            c.train(cohort, steps=5000)
        for job in jobs:
            job.cancel()
