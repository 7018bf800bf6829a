"""Peak memory of an augmentation that trains nothing (traditional, insert, insert_healthy) against the
pairs it writes: does the export hold one pair or all N?

    OMP_NUM_THREADS=1 .venv/bin/python bench/export_memory.py [--slices 1000 10000] \
        [--baseline-tree /tmp/old]

Each (method, slices) runs in a fresh process on a phantom cohort of 3 cases at 64 x 64 px:
``pipeline.generate_untrained`` writes ``slices / 100`` volumes of 100 slices. The figure is the peak
resident memory above the process's peak after the ingest (``ru_maxrss``). ``--baseline-tree`` runs
the same measurement, side by side, on another checkout of the engine (``git worktree add /tmp/old
<commit>``): the one before the drawn augmentations streamed their pairs.

Results: bench/results/export_memory.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/: machine.py
from machine import footer, provenance, write_report  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
METHODS = ("traditional", "insert", "insert_healthy")
PER_VOLUME = 100

# runs in the child, with the engine of the tree on PYTHONPATH
CHILD = """
import json, resource, sys, tempfile, time
from pathlib import Path
from imaging.cohort import CohortSpec
from imaging.phantoms import make_phantom_cohort
from imaging.preprocess import PreprocessConfig
from pipeline import pipeline
method, slices, per_volume = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
root = Path(tempfile.mkdtemp())
cohort = make_phantom_cohort(root / "cohort", n_cases=3, shape=(80, 80, 40), seed=1)
ing = pipeline.ingest(cohort, cache_dir=root / "cache", spec=CohortSpec(), prep=PreprocessConfig(shape=(64, 64, 32)))
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()
spec = pipeline.SampleSpec(n_pairs=slices // per_volume, slices_per_volume=per_volume)
pipeline.generate_untrained(ing, method, spec, out_dir=root / "out")
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"peak_mb": round(peak / 1024), "above_ingest_mb": round((peak - base) / 1024),
                  "seconds": round(time.perf_counter() - t, 1)}))
"""


def measure(tree: Path, method: str, slices: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    out = subprocess.run(
        [sys.executable, "-c", CHILD, method, str(slices), str(PER_VOLUME)],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slices", nargs="+", type=int, default=[1000, 10000])
    ap.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    ap.add_argument("--baseline-tree", type=Path, help="another checkout, measured side by side")
    ap.add_argument("--out", type=Path, default=REPO / "bench/results")
    args = ap.parse_args()
    started = time.perf_counter()
    trees = {"this": REPO} | ({"baseline": args.baseline_tree.resolve()} if args.baseline_tree else {})
    commits = {
        name: subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=tree, capture_output=True, text=True
        ).stdout.strip()
        for name, tree in trees.items()
    }
    rows = []
    for method in args.methods:
        for slices in args.slices:
            for name, tree in trees.items():
                r = {"tree": name, "commit": commits[name], "method": method, "slices": slices}
                rows.append({**r, **measure(tree, method, slices)})
                print(rows[-1], flush=True)
    report = {
        "rows": rows,
        "per_volume": PER_VOLUME,
        "image_px": 64,
        **provenance("bench/export_memory.py", started, "OMP_NUM_THREADS=1 "),
    }
    mb_per_slice = 2 * 64 * 64 * 4 / 2**20
    lines = [
        "# Export memory of the augmentations that train nothing",
        "",
        f"Peak resident memory above the ingest while `pipeline.generate_untrained` writes N slices "
        f"({PER_VOLUME} per volume, 64 x 64 px phantoms; N pairs held at once would take "
        f"{mb_per_slice * 1000:.0f} MB per 1000). Each row is a fresh process.",
        "",
        "| method | slices | tree (commit) | MB above the ingest | peak MB | seconds |",
        "|---|---|---|---|---|---|",
        *(
            f"| {r['method']} | {r['slices']} | {r['tree']} ({r['commit']}) | {r['above_ingest_mb']} | "
            f"{r['peak_mb']} | {r['seconds']} |"
            for r in rows
        ),
        "",
        footer(report),
        "",
    ]
    write_report(args.out, "export_memory", report, lines)


if __name__ == "__main__":
    main()
