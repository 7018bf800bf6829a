"""The shared BraTS cases (../shared/data/brats2015-deepmedic, CC BY-NC-SA: read in place, never copied)."""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# DHVAE_BRATS: another place for the cases (a device run carries them in a git-ignored folder)
DATA = Path(os.environ.get("DHVAE_BRATS") or REPO.parent / "shared/data/brats2015-deepmedic")


def combined_cohort(splits: list[str], tmp: Path) -> Path:
    """A cohort folder of symlinks to the cases of several splits (no data is copied)."""
    root = tmp / "cohort"
    root.mkdir()
    for split in splits:
        for case in sorted((DATA / split).iterdir()):
            (root / case.name).symlink_to(case.resolve(), target_is_directory=True)
    return root


def split_ids(split: str) -> list[str]:
    """The case ids of one split (folder names)."""
    return sorted(p.name for p in (DATA / split).iterdir() if p.is_dir())


def efficacy_data(cache_dir: Path):
    """The efficacy split of the shared cases (FLAIR): train + validation patients learn, test patients test."""
    import tempfile

    from efficacy import grid
    from imaging.cohort import CohortSpec
    from pipeline import pipeline

    with tempfile.TemporaryDirectory() as tmp:
        cohort = combined_cohort(["train", "validation", "test"], Path(tmp))
        ing = pipeline.ingest(cohort, cache_dir=cache_dir, spec=CohortSpec(channel="flair"))
    return grid.split_cohort(
        ing, train_ids=split_ids("train") + split_ids("validation"), test_ids=split_ids("test")
    )
