"""The client's HTTP behaviour against a scripted transport: retries, idempotency keys, typed errors,
the zip it streams for a folder, the integrity check of a download. No service needed."""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from pathlib import Path

import httpx
import pytest
from dhvae_client import (
    AuthError,
    Client,
    CohortInvalid,
    IntegrityError,
    NotFound,
    QuotaExceeded,
    TooLarge,
    verify_dataset,
)
from dhvae_client.client import _cohort_files, _safe_extract, _zip_stream


def scripted(*answers):
    """A transport answering the given (status, json, headers) in turn; records the requests."""
    seen: list[httpx.Request] = []
    queue = list(answers)

    def handle(request: httpx.Request) -> httpx.Response:
        request.read()
        seen.append(request)
        status, body, headers = queue.pop(0)
        return httpx.Response(status, json=body, headers=headers)

    return httpx.MockTransport(handle), seen


def test_a_retried_post_keeps_its_idempotency_key_and_honours_retry_after():
    job = {"id": "job_1", "kind": "training", "state": "queued", "progress": {}}
    transport, seen = scripted(
        (503, {"detail": "Redis unreachable"}, {"Retry-After": "0"}),
        (202, {"job_id": "job_1"}, {}),
        (200, job, {}),
    )
    c = Client("http://svc", "k", transport=transport, backoff=0.0, progress=False)
    j = c.train("coh_x", steps=3)
    assert j.id == "job_1" and "training queued" in repr(j)
    posts = [r for r in seen if r.method == "POST"]
    assert len(posts) == 2 and posts[0].headers["Idempotency-Key"] == posts[1].headers["Idempotency-Key"]
    assert seen[0].headers["Authorization"] == "Bearer k"
    # a new call gets a new key
    transport, seen2 = scripted((202, {"job_id": "job_2"}, {}), (200, {**job, "id": "job_2"}, {}))
    c2 = Client("http://svc", "k", transport=transport, progress=False)
    c2.train("coh_x", steps=3)
    assert seen2[0].headers["Idempotency-Key"] != posts[0].headers["Idempotency-Key"]


@pytest.mark.parametrize(
    ("status", "cls"), [(401, AuthError), (404, NotFound), (413, TooLarge), (507, QuotaExceeded)]
)
def test_errors_are_typed_and_keep_the_service_s_words(status, cls):
    transport, _ = scripted((status, {"detail": "the words", "problems": []}, {}))
    c = Client("http://svc", "k", transport=transport, retries=0, progress=False)
    with pytest.raises(cls, match="the words") as e:
        c.cohorts()
    assert e.value.status == status


def test_a_refused_upload_lists_its_problems(tmp_path: Path):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "x.nii.gz").write_bytes(b"junk")
    body = {"detail": "the cohort is unusable", "problems": [{"file": "x.nii.gz", "problem": "not NIfTI"}]}
    transport, _ = scripted((422, body, {}))
    c = Client("http://svc", "k", transport=transport, retries=0, progress=False)
    with pytest.raises(CohortInvalid) as e:
        c.upload_cohort(tmp_path / "c")
    assert e.value.problems[0].file == "x.nii.gz" and "not NIfTI" in str(e.value)
    with pytest.raises(FileNotFoundError):
        c.upload_cohort(tmp_path / "absent")


def test_a_folder_streams_as_a_valid_zip_without_hidden_files(tmp_path: Path):
    root = tmp_path / "cohort"
    (root / "case1").mkdir(parents=True)
    (root / "case1" / "img.nii.gz").write_bytes(b"a" * 3_000_000)
    (root / "case1" / "seg.nii.gz").write_bytes(b"b" * 10)
    (root / ".DS_Store").write_bytes(b"x")

    class Bar:
        n = 0

        def update(self, k):
            self.n += k

    bar = Bar()
    data = b"".join(_zip_stream(_cohort_files(root), bar))
    zf = zipfile.ZipFile(io.BytesIO(data))
    assert zf.testzip() is None
    assert sorted(zf.namelist()) == ["case1/img.nii.gz", "case1/seg.nii.gz"]
    assert zf.read("case1/img.nii.gz") == b"a" * 3_000_000 and bar.n == 3_000_010


def test_downloads_are_checked_against_the_manifest(tmp_path: Path):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("labelsTr/a.nii.gz", b"label")
        files = {"labelsTr/a.nii.gz": {"sha256": hashlib.sha256(b"label").hexdigest(), "bytes": 5}}
        zf.writestr("manifest.json", json.dumps({"files": files}))
    (tmp_path / "d.zip").write_bytes(buf.getvalue())
    _safe_extract(tmp_path / "d.zip", tmp_path / "out")
    assert verify_dataset(tmp_path / "out")["files"] == files
    (tmp_path / "out" / "labelsTr" / "a.nii.gz").write_bytes(b"LABEL")
    with pytest.raises(IntegrityError, match="a.nii.gz"):
        verify_dataset(tmp_path / "out")
    evil = io.BytesIO()
    with zipfile.ZipFile(evil, "w") as zf:
        zf.writestr("../escape.txt", b"x")
    (tmp_path / "evil.zip").write_bytes(evil.getvalue())
    with pytest.raises(IntegrityError, match="outside"):
        _safe_extract(tmp_path / "evil.zip", tmp_path / "out2")
    assert not (tmp_path / "escape.txt").exists()
