"""A client generated from openapi/openapi.json by openapi-python-client imports and talks to the
service: /health/live, the cohort list with the bearer key, an upload, and the typed 401."""

from __future__ import annotations

import importlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.service.conftest import A

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
# the service's binary bodies (zip, PNG) are files to the generator
CONFIG = {
    "content_type_overrides": {
        "application/zip": "application/octet-stream",
        "image/png": "application/octet-stream",
    }
}


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    if shutil.which("openapi-python-client", path=str(BIN)) is None:
        pytest.skip("openapi-python-client is not installed (requirements-dev.lock)")
    out = tmp_path_factory.mktemp("generated")
    (out / "config.json").write_text(json.dumps(CONFIG))
    run = subprocess.run(
        [
            str(BIN / "openapi-python-client"),
            "generate",
            "--path",
            str(REPO / "openapi/openapi.json"),
            "--meta",
            "none",
            "--config",
            str(out / "config.json"),
            "--output-path",
            str(out / "dhvae_generated"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={"PATH": f"{BIN}:/usr/bin:/bin"},
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "WARNING" not in run.stdout, run.stdout  # every operation was generated
    sys.path.insert(0, str(out))
    try:
        yield importlib.import_module("dhvae_generated")
    finally:
        sys.path.remove(str(out))


def test_the_generated_client_calls_the_service(generated, client, phantom_zip):
    from dhvae_generated.api.cohorts import list_cohorts_v1_cohorts_get, upload_cohort_v1_cohorts_post
    from dhvae_generated.api.health import live_health_live_get
    from dhvae_generated.models import CohortOut, ErrorOut
    from dhvae_generated.types import File

    anonymous = generated.Client(base_url="http://testserver")
    anonymous.set_httpx_client(client)
    assert live_health_live_get.sync_detailed(client=anonymous).status_code == 200

    authed = generated.AuthenticatedClient(base_url="http://testserver", token=A["Authorization"].split()[1])
    authed.set_httpx_client(client)
    client.headers.update(A)  # the TestClient stands in for the generated client's own httpx client
    try:
        up = upload_cohort_v1_cohorts_post.sync(
            client=authed, body=File(payload=phantom_zip, mime_type="application/zip")
        )
        assert isinstance(up, CohortOut) and up.cases
        listed = list_cohorts_v1_cohorts_get.sync(client=authed)
        assert [c.id for c in listed.items] == [up.id]
    finally:
        client.headers.pop("Authorization")
    refused = list_cohorts_v1_cohorts_get.sync(client=anonymous)
    assert isinstance(refused, ErrorOut) and "API key" in refused.detail
