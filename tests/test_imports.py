"""The import rules of docs/architecture.md: every module the API process can load leaves torch out,
and the import-linter contracts in pyproject.toml hold, and break when a rule is broken."""

from __future__ import annotations

import pkgutil
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
API_PACKAGES = ("contract", "runtime", "imaging", "service")  # everything the API image can import
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def all_api_modules() -> list[str]:
    names = []
    for package in API_PACKAGES:
        for info in pkgutil.walk_packages([str(ROOT / package)], prefix=f"{package}."):
            names.append(info.name)
        names.append(package)
    return sorted(names)


def test_every_module_the_api_can_load_leaves_torch_out():
    modules = all_api_modules()
    assert "imaging.ingest" in modules and "service.routes.jobs" in modules  # the walk finds the lazy ones
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}: importlib.import_module(name)\n"
        "from service.main import create_app\n"
        "from service.settings import Settings\n"
        "create_app(Settings(redis_url='redis://127.0.0.1:1/0', api_keys='a:b'))\n"
        "heavy = [m for m in ('torch', 'monai', 'models', 'pipeline', 'efficacy', 'worker') if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ""


def _lint(tree: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(LINT_IMPORTS), "--config", str(tree / "pyproject.toml"), "--no-cache"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tree,
        env={"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin"},
    )


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    """A copy of the packages and pyproject.toml, to break rules in."""
    dst = tmp_path_factory.mktemp("tree")
    for package in ("contract", "runtime", "imaging", "models", "pipeline", "efficacy", "service", "worker"):
        shutil.copytree(ROOT / package, dst / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", dst)
    return dst


def test_the_import_rules_hold(tree):
    out = _lint(tree)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize(
    "module, line, broken",
    [
        ("imaging/ingest.py", "import torch", "imaging is torch-free"),
        ("service/lookups.py", "import models", "service imports only contract, runtime and imaging"),
        ("contract/schemas.py", "import runtime.jobs", "contract is the wire format"),
        ("models/train.py", "import pipeline.pipeline", "models is the generators"),
    ],
)
def test_breaking_a_rule_fails_the_check(tree, module, line, broken):
    path = tree / module
    original = path.read_text()
    try:
        path.write_text(original + f"\n{line}  # injected by the test\n")
        out = _lint(tree)
    finally:
        path.write_text(original)
    assert out.returncode != 0
    assert f"{broken}" in out.stdout and "BROKEN" in out.stdout, out.stdout
