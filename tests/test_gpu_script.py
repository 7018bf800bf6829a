"""bench/gpu.sh, the one prepared device check, in its CPU dry mode: the same two steps at toy sizes,
their JSON under $OUT (a GPU run is the same script without --dry)."""

import json
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def test_gpu_script_dry_run(tmp_path):
    if not (REPO.parent / "shared/data/brats2015-deepmedic").is_dir():
        pytest.skip("the shared BraTS cases are absent")
    env = {**os.environ, "OUT": str(tmp_path / "out"), "OMP_NUM_THREADS": "2"}
    run = subprocess.run(
        ["bash", "bench/gpu.sh", "--dry"], cwd=REPO, env=env, capture_output=True, text=True, timeout=900
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    step = json.loads((tmp_path / "out/gpu_step.json").read_text())
    assert (
        step["preset"] == "tiny"
        and step["median_s_per_step"] > 0
        and step["machine"]["cpu_flags"] is not None
    )
    cv = json.loads((tmp_path / "out/gpu_cv.json").read_text())
    assert cv["complete"] and len(cv["folds"]) == 3 and cv["recommendation"]["words"]
    assert {r["arm"] for r in cv["rows"]} == {"real", "real_aug", "insert"}
    assert (tmp_path / "out/gpu_cv.md").is_file() and not (tmp_path / "out/work/cache").exists()
