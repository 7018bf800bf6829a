"""Deployment files (Docker does not run here): docker-compose.yml, Dockerfile and .env.example agree
with the code and with the commands the integration tests run (scripts/run_service.py)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from scripts.run_service import API_ARGV, WORKER_ARGV

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
API_IN_CONTAINER = [*API_ARGV, "--host", "0.0.0.0", "--port", "8000"]


def test_compose_services_volumes_and_commands():
    services = COMPOSE["services"]
    assert {"redis", "api", "worker", "flower"} <= set(services)
    assert services["flower"]["profiles"] == ["monitoring"]  # optional
    redis = services["redis"]
    assert (
        "--appendonly" in redis["command"]
        and redis["command"][redis["command"].index("--appendonly") + 1] == "yes"
    )
    volume_names = set(COMPOSE["volumes"])
    assert any(v.split(":")[0] in volume_names and v.endswith(":/data") for v in redis["volumes"])
    for name in ("api", "worker"):
        svc = services[name]
        env = svc["environment"]
        assert env["DHVAE_REDIS_URL"].startswith("redis://redis:")
        data = [v for v in svc["volumes"] if v.endswith(":" + env["DHVAE_DATA_DIR"])]
        assert data and data[0].split(":")[0] in volume_names  # one shared data volume
        assert svc["build"]["target"] == name
    # the commands are the ones `make run` and the integration tests start
    assert services["api"]["command"] == API_IN_CONTAINER
    assert services["worker"]["command"] == WORKER_ARGV
    assert services["api"]["volumes"][0].split(":")[0] == services["worker"]["volumes"][0].split(":")[0]


def test_worker_reserves_one_gpu():
    [device] = COMPOSE["services"]["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["count"] == 1 and "gpu" in device["capabilities"]
    assert "--concurrency=1" in COMPOSE["services"]["worker"]["command"]  # one process per GPU
    assert "deploy" not in COMPOSE["services"]["api"]


def _stage(dockerfile: str, name: str) -> str:
    parts = re.split(r"(?m)^FROM ", dockerfile)
    chain, stages = {}, {}
    for part in parts[1:]:
        header = part.splitlines()[0].split()
        stages[header[-1]] = part
        chain[header[-1]] = header[0]
    text, cur = "", name
    while cur in stages:  # a stage and the stages it is built FROM
        text = stages[cur] + text
        cur = chain[cur]
    return text


def test_dockerfile_api_image_has_no_torch_and_commands_match():
    dockerfile = (ROOT / "Dockerfile").read_text()
    api, worker = _stage(dockerfile, "api"), _stage(dockerfile, "worker")
    assert "grep -v -E '^(torch|monai" in api and "TORCH_INDEX_URL" not in api
    assert "TORCH_INDEX_URL" in worker and "fetch_vgg16.py" in worker

    def cmd(stage: str) -> list[str]:
        return json.loads(re.findall(r"(?m)^CMD (\[.*\])$", stage)[-1])

    assert cmd(api) == API_IN_CONTAINER
    assert cmd(worker) == WORKER_ARGV


def test_images_carry_their_packages_and_no_dev_tools():
    dockerfile = (ROOT / "Dockerfile").read_text()
    api, worker = _stage(dockerfile, "api"), _stage(dockerfile, "worker")

    def copied(stage: str) -> set[str]:
        return {m for m in re.findall(r"(?m)^COPY (\S+) \./\S+$", stage) if (ROOT / m).is_dir()}

    # the import rules (tests/test_imports.py) are what make the API image's subset enough
    assert copied(api) == {"contract", "runtime", "imaging", "service"}
    assert copied(worker) == {"contract", "runtime", "imaging", "models", "pipeline", "efficacy", "worker"}
    for stage in (api, worker):
        assert "requirements-dev.lock" not in stage
    runtime_lock = (ROOT / "requirements.lock").read_text().lower()
    for tool in ("pytest", "ruff", "mypy", "import-linter"):
        assert f"\n{tool}==" not in "\n" + runtime_lock, tool


def test_env_example_lists_every_setting():
    from service.settings import Settings
    from worker.settings import WorkerSettings

    listed = set(re.findall(r"(?m)^#? ?(DHVAE_[A-Z0-9_]+)=", (ROOT / ".env.example").read_text()))
    fields = {f"DHVAE_{n.upper()}" for n in {*Settings.model_fields, *WorkerSettings.model_fields}}
    assert fields <= listed, sorted(fields - listed)
