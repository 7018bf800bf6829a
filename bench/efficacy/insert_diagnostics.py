"""What do inserted pairs look like next to the real tumour slices? (issue 11, "why insertion hurts")

For each cross-validation fold, on its *training* patients only (the test patients are not read): the
real tumour slices, ``insert`` pairs (every brain slice a recipient) and ``insert_healthy`` pairs
(tumour-free recipients only), drawn exactly as the grid draws them (the registry's draw, the grid's
sample seed), and both again without the intensity match (``InsertConfig.match="none"``, the
``insert_online_unscaled`` arm's). Per kind of pair: the tumour area per slice, the tumour components
per slice, the contrast (mean tumour intensity over the mean of the rest of the brain) and the share of
tumour pixels saturated at the image's top (>= 0.999); and the share of the recipients that carry a
tumour of their own. Numpy only, about a minute.

    .venv/bin/python bench/efficacy/insert_diagnostics.py

Results: bench/results/insert_diagnostics.{json,md}.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/: the shared-data helpers
from machine import footer, provenance, write_report  # noqa: E402

from brats import REPO, combined_cohort  # noqa: E402
from efficacy.crossval import CVConfig, cohort_splits, fold_data  # noqa: E402
from imaging.cohort import CohortSpec  # noqa: E402
from models.insert import InsertConfig, brain_mask, draw_insert, recipient_slices  # noqa: E402
from models.registry import REGISTRY  # noqa: E402
from pipeline import pipeline  # noqa: E402

# the inserted kinds: the registry's insert and insert_healthy (draw_insert with their configs), each
# with and without the ring intensity match
KINDS: dict[str, InsertConfig] = {
    **{name: REGISTRY[name].config for name in ("insert", "insert_healthy")},
    **{
        f"{name}_unscaled": replace(REGISTRY[name].config, match="none")
        for name in ("insert", "insert_healthy")
    },
}


def pair_stats(pairs: np.ndarray) -> dict[str, float]:
    """Median tumour area (px), mean components, tumour/brain contrast and saturated share of ``pairs``."""
    masks = pairs[:, 1] > 0.5
    areas, parts, contrast, saturated = [], [], [], []
    for image, mask in zip(pairs[:, 0], masks, strict=True):
        if not mask.any():
            continue
        rest = brain_mask(image) & ~mask
        areas.append(mask.sum())
        parts.append(ndimage.label(mask)[1])
        saturated.append((image[mask] >= 0.999).mean())
        if rest.any():
            contrast.append(image[mask].mean() / max(image[rest].mean(), 1e-6))
    return {
        "pairs": len(pairs),
        "median_area_px": float(np.median(areas)),
        "mean_components": float(np.mean(parts)),
        "mean_contrast": float(np.mean(contrast)),
        "saturated_share": float(np.mean(saturated)),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=300, help="pairs drawn per kind and fold")
    ap.add_argument("--work", type=Path, default=REPO / "runs" / "efficacy_cv", help="its ingest cache")
    ap.add_argument("--out", type=Path, default=REPO / "bench/results")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    cfg = CVConfig()
    with tempfile.TemporaryDirectory() as tmp:
        cohort = combined_cohort(["train", "validation", "test"], Path(tmp))
        ing = pipeline.ingest(cohort, cache_dir=args.work / "cache", spec=CohortSpec(channel="flair"))
    splits = cohort_splits(ing, cfg)
    folds = []
    for i, split in enumerate(splits):
        fold = fold_data(ing, split, i, cfg)  # its training patients only
        slices = fold.data.generator_slices.slices
        recipients = recipient_slices(fold.train_cases)
        kinds = {"real": fold.data.real_train}
        for name, icfg in KINDS.items():
            kinds[name] = np.stack(list(draw_insert(slices, args.n, cfg.sample_seed, icfg)))
        folds.append(
            {
                "fold": i,
                "train": list(split.train),
                "recipients": len(recipients),
                "recipients_with_tumour": int(sum(r[1].any() for r in recipients)),
                **{k: pair_stats(p) for k, p in kinds.items()},
            }
        )
    report = {"folds": folds, **provenance("bench/efficacy/insert_diagnostics.py", t0)}
    lines = [
        "# Inserted pairs next to the real tumour slices (training patients of each fold only)",
        "",
        "| fold | recipients with a tumour | kind | pairs | median tumour area (px) | components | contrast | saturated |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for f in folds:
        share = f"{f['recipients_with_tumour']} / {f['recipients']}"
        for k in ("real", *KINDS):
            s = f[k]
            lines.append(
                f"| {f['fold']} | {share if k == 'insert' else ''} | {k} | {s['pairs']} | "
                f"{s['median_area_px']:.0f} | {s['mean_components']:.2f} | {s['mean_contrast']:.2f} | {100 * s['saturated_share']:.1f} % |"
            )
    lines += [
        "",
        "Contrast: the mean tumour intensity over the mean of the rest of the brain (FLAIR), per slice.",
        "Saturated: the share of tumour pixels at the image's top (>= 0.999), per slice.",
        "",
        footer(report),
        "",
    ]
    write_report(args.out, "insert_diagnostics", report, lines)


if __name__ == "__main__":
    main()
