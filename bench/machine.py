"""What a benchmark ran on: the CPU (model and the flags that change torch's speed), cores, torch."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")


def machine() -> dict[str, Any]:
    import torch

    model, flags = platform.processor(), set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    return {
        "cpu": model,
        "cpu_flags": [f for f in FLAGS if f in flags],
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def describe(m: dict[str, Any]) -> str:
    """One line for a report: CPU, cores, the speed-relevant flags, torch, threads and the GPU if any."""
    flags = ", ".join(m["cpu_flags"]) or "none of avx2/avx512"
    gpu = f", {m['cuda']}" if m["cuda"] else ""
    return f"{m['cpu']} ({m['cores']} cores, flags {flags}), torch {m['torch']}, {m['threads']} threads{gpu}"


def provenance(script: str, started: float, env: str = "") -> dict[str, Any]:
    """What a report needs to be reproduced: the machine, the command line (``env`` before it, e.g.
    ``"OMP_NUM_THREADS=2 "``) and the wall time in minutes since ``started`` (``time.perf_counter()``)."""
    import shlex
    import sys
    import time

    return {
        "machine": machine(),
        "command": " ".join([f"{env}.venv/bin/python {script}", *map(shlex.quote, sys.argv[1:])]),
        "wall_minutes": round((time.perf_counter() - started) / 60, 1),
    }


def footer(report: dict[str, Any]) -> str:
    """The Markdown line under a report made with :func:`provenance`'s fields."""
    return (
        f"Command: `{report['command']}` ({report['wall_minutes']} min). "
        f"Machine: {describe(report['machine'])}."
    )


def write_report(out: Path, stem: str, report: dict[str, Any], lines: list[str]) -> None:
    """``out/<stem>.json`` (the report) and ``out/<stem>.md`` (``lines``), the Markdown printed too."""
    import json

    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(report, indent=1, default=str))
    text = "\n".join(lines)
    (out / f"{stem}.md").write_text(text)
    print(text)
