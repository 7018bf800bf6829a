"""The resume journal of a generation: what lets a killed generation finish byte-identical.

A generation writes synthetic pairs 0, 1, 2, ... in order (:mod:`imaging.export`). Its journal,
``out_dir/.generation.json`` (hidden: bookkeeping, not part of the dataset), holds the generation's
settings and, for each candidate batch ``b`` of the sampler, how many pairs had been accepted and how
many candidates had passed the checks before it. A restart keeps the complete prefix of pairs on disk
(:func:`complete_prefix`), skips the sampler to the batch that holds the first missing pair
(:meth:`Journal.resume_point`) and continues the same random stream from there.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import DHVAEError
from .export import image_path, label_path, published_pairs, synthetic_case_id, synthetic_index
from .files import write_json_atomic

JOURNAL = ".generation.json"


@dataclass
class Journal:
    """The journal of the generation in ``out_dir`` (created empty, or read back on a restart)."""

    path: Path
    settings: dict[str, Any]
    accepted_before: dict[int, int]  # batch b -> pairs accepted before b
    passed_before: dict[int, int]  # batch b -> candidates that passed the checks before b
    draws: int

    @classmethod
    def open(cls, out_dir: Path, settings: dict[str, Any]) -> Journal:
        """The folder's journal; a folder holding a generation with other settings is refused rather
        than silently mixed."""
        path = Path(out_dir) / JOURNAL
        if not path.exists():
            return cls(path, settings, {0: 0}, {0: 0}, 0)
        data = json.loads(path.read_text())
        if data["settings"] != settings:
            raise DHVAEError(
                f"{Path(out_dir).name} already holds synthetic pairs generated with other settings "
                f"({data['settings']}); use a new output folder"
            )
        return cls(
            path,
            settings,
            {int(b): a for b, a in data["batches"].items()},
            {int(b): p for b, p in data["passed"].items()},
            data["draws"],
        )

    def resume_point(self, first: int) -> tuple[int, int, int]:
        """``(batch, accepted before it, passed before it)``: where the sampler restarts to produce pair
        (slice) ``first`` and everything after it."""
        batch = max(b for b, a in self.accepted_before.items() if a <= first)
        return batch, self.accepted_before[batch], self.passed_before[batch]

    def record_batch(self, batch: int, accepted_total: int, passed_total: int, draws_total: int) -> None:
        """Batch ``batch`` is done: remember the totals after it, durably."""
        self.accepted_before[batch + 1] = accepted_total
        self.passed_before[batch + 1] = passed_total
        self.draws = max(self.draws, draws_total)
        write_json_atomic(
            self.path,
            {
                "settings": self.settings,
                "batches": {str(b): a for b, a in self.accepted_before.items()},
                "passed": {str(b): p for b, p in self.passed_before.items()},
                "draws": self.draws,
            },
        )

    @property
    def passed(self) -> int:
        """Candidates that passed the checks over every batch drawn so far."""
        return self.passed_before[max(self.passed_before)]


def completed_synthetic_indices(out_dir: Path) -> list[int]:
    """Sorted indices of the synthetic pairs whose image and label are both published in ``out_dir``."""
    indices = (synthetic_index(case) for case, _files in published_pairs(out_dir))
    return sorted(i for i in indices if i is not None)


def complete_prefix(out_dir: Path, n_pairs: int) -> int:
    """Number of synthetic volumes 0..V-1 complete on disk; any pair after a gap or past ``n_pairs`` is
    removed (a volume after a gap cannot exist in a sequential run, so it is not trusted)."""
    complete = completed_synthetic_indices(out_dir)
    v = 0
    while v < len(complete) and complete[v] == v and v < n_pairs:
        v += 1
    for stray in complete[v:]:
        case = synthetic_case_id(stray)
        image_path(out_dir, case).unlink(missing_ok=True)
        label_path(out_dir, case).unlink(missing_ok=True)
    return v
