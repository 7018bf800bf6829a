"""Cohort -> training slices, with the summary a user sees. Torch-free: the API validates uploads with it.

read_cohort (imaging/cohort.py: layouts, header checks)
  -> preprocess_cohort (imaging/preprocess.py: voxel checks, resampling, normalisation, balancing, cache)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .cohort import CohortSpec, read_cohort
from .preprocess import PreprocessConfig, SliceSet, preprocess_cohort
from .progress import Progress, ProgressFn


@dataclass
class IngestResult:
    """The preprocessed slices of a cohort, the channel modelled, and a JSON-able summary."""

    slices: SliceSet
    channel: str
    summary: dict[str, Any] = field(default_factory=dict)


def ingest(
    cohort_dir: Path,
    *,
    cache_dir: Path | None = None,
    spec: CohortSpec | None = None,
    prep: PreprocessConfig | None = None,
    progress: ProgressFn | None = None,
) -> IngestResult:
    """Read, validate and preprocess a cohort (cached in ``cache_dir``). Raises CohortError."""
    spec = spec or CohortSpec()
    cohort = read_cohort(Path(cohort_dir), spec)
    report = (lambda d, t: progress(Progress("ingest", d, t, "cases"))) if progress else None
    slices = preprocess_cohort(cohort, spec, prep, cache_dir, progress=report)
    summary = {
        "layout": cohort.layout,
        "cases": [c.case_id for c in cohort.cases],
        "channels": list(cohort.channels),
        "channel": cohort.channel,
        "tumour_slices": int(slices.tumour_slices),
        "training_slices": len(slices.case_ids),
        "warnings": [str(w) for w in (*cohort.warnings, *slices.warnings)],
    }
    return IngestResult(slices, cohort.channel, summary)
