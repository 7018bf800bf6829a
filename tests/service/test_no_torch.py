"""The API process never imports torch (the API image has none): upload validation is torch-free."""

from __future__ import annotations

import subprocess
import sys

CODE = """
import sys
import service.main
from service.main import create_app
from service.settings import Settings
app = create_app(Settings(redis_url="redis://127.0.0.1:1/0", api_keys="a:b"))
import service.uploads, imaging.cohort, imaging.preprocess, imaging.errors  # what validation loads
heavy = sorted(m for m in ("torch", "monai", "worker", "pipeline.pipeline") if m in sys.modules)
print(",".join(heavy))
"""


def test_importing_the_api_leaves_torch_out():
    out = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ""
