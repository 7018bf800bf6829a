"""openapi/openapi.json is generated from the app: regenerate with `make openapi` when this fails."""

from __future__ import annotations

from service.openapi_export import TARGET, render


def test_openapi_json_matches_the_app():
    assert TARGET.exists(), "openapi/openapi.json is missing: run `make openapi`"
    assert TARGET.read_text() == render(), "openapi/openapi.json is stale: run `make openapi` and commit it"


def test_contract_paths_are_in_the_schema():
    import json

    paths = json.loads(TARGET.read_text())["paths"]
    for path, methods in {
        "/v1/cohorts": {"get", "post"},
        "/v1/cohorts/{cohort_id}": {"get", "delete"},
        "/v1/trainings": {"post"},
        "/v1/generations": {"post"},
        "/v1/augmentations": {"post"},
        "/v1/models": {"get", "post"},
        "/v1/models/{model_id}": {"get"},
        "/v1/jobs/{job_id}": {"get", "delete"},
        "/v1/jobs/{job_id}/events": {"get"},
        "/v1/jobs/{job_id}/download": {"get"},
        "/v1/jobs/{job_id}/preview.png": {"get"},
        "/health/live": {"get"},
        "/health/ready": {"get"},
    }.items():
        assert methods <= set(paths[path]), path
