"""Fixtures of the service tests: a real redis-server (no mock), the app, API keys, cohort zips."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import pytest
import redis

from tests.service.procs import RedisServer

SHARED_TRAIN = Path(__file__).resolve().parents[3] / "shared" / "data" / "brats2015-deepmedic" / "train"
A = {"Authorization": "Bearer key-a"}
B = {"Authorization": "Bearer key-b"}


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server) -> str:
    if redis_server.proc is None or redis_server.proc.poll() is not None:
        redis_server.start()
    redis.Redis.from_url(redis_server.url).flushall()
    return redis_server.url


@pytest.fixture
def settings(tmp_path, redis_url):
    from service.settings import Settings

    return Settings(
        data_dir=tmp_path / "data",
        redis_url=redis_url,
        api_keys="tenant-a:key-a,tenant-b:key-b",
        max_upload_bytes=64 << 20,
        max_uncompressed_bytes=256 << 20,
        import_wait_s=0.5,
        download_poll_s=0.05,
        ready_timeout_s=0.3,
        body_timeout_s=1.0,
    )


@pytest.fixture
def app(settings):
    from service.main import create_app

    return create_app(settings)


@pytest.fixture
def client(app):
    from fastapi.testclient import TestClient

    with TestClient(app) as c:
        yield c


def zip_dir(folder: Path, *, prefix: str = "", compression: int = zipfile.ZIP_STORED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression) as zf:
        for p in sorted(folder.rglob("*")):
            if p.is_file():
                zf.write(p, prefix + p.relative_to(folder).as_posix())
    return buf.getvalue()


@pytest.fixture(scope="session")
def phantom_dir(tmp_path_factory) -> Path:
    from imaging.phantoms import make_phantom_cohort

    return make_phantom_cohort(tmp_path_factory.mktemp("phantom") / "cohort", n_cases=2, shape=(48, 48, 16))


@pytest.fixture(scope="session")
def phantom_zip(phantom_dir) -> bytes:
    return zip_dir(phantom_dir, prefix="cohort/")


@pytest.fixture(scope="session")
def brats_zip() -> bytes:
    if not SHARED_TRAIN.is_dir():
        pytest.skip(f"{SHARED_TRAIN} is absent")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for p in sorted(SHARED_TRAIN.rglob("*")):
            # the two files the default spec uses (FLAIR, whole-tumour labels) keep the upload small
            if p.is_file() and (p.name.startswith("Flair") or p.name.startswith("OTMultiClass")):
                zf.write(p, "train/" + p.relative_to(SHARED_TRAIN).as_posix())
    return buf.getvalue()


@pytest.fixture
def cohort_id(client, phantom_zip) -> str:
    """A phantom cohort (2 patients) uploaded for tenant-a."""
    r = client.post("/v1/cohorts", content=phantom_zip, headers={**A, "Content-Type": "application/zip"})
    assert r.status_code == 201, r.text
    return r.json()["id"]
