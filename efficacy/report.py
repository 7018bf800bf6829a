"""The efficacy report: rows summarised over seeds, the verdict per method, the table and the figure.

Everything here works on plain rows (dicts) of :mod:`efficacy.grid`, so a report can be rebuilt from a
work folder's ``rows.jsonl`` without training anything.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from imaging.files import atomic_file
from models.registry import GENERATORS

METRICS = ("dice_slice", "dice_pooled", "dice_3d", "hd95")

# The paper's Dice (%) against synthetic slices added, BraTS FLAIR (method.md, the Dice-evolution figure).
PAPER_BRATS = {
    "lsgan": {0: 66.3, 500: 70.3, 1000: 72.0, 1500: 69.7, 2000: 67.6},
    "vae": {0: 66.3, 500: 74.0, 1000: 77.3, 1500: 75.2, 2000: 70.4},
    "hvae": {0: 66.3, 500: 74.9, 1000: 76.0, 1500: 77.8, 2000: 76.3},
    "dhvae": {0: 66.3, 500: 76.3, 1000: 78.9, 1500: 81.9, 2000: 84.4},
}


def cell_key(row: dict[str, Any]) -> tuple:
    """What names a cell of the grid: (method, protocol, n_synthetic, seed)."""
    return (row["method"], row["protocol"], row["n_synthetic"], row["seed"])


def build_report(
    rows: list[dict[str, Any]],
    expected: list[dict[str, Any]],
    config: dict[str, Any],
    data_summary: dict[str, Any],
    quality: dict[str, Any],
    *,
    step_budget: int,
    failed: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Rows, their summary over seeds, and each generator's best N, per protocol.

    ``expected``: the cells of the grid (:func:`efficacy.grid.cells`) whose generator produced pairs;
    rows of other cells are left out. ``failed``: generators that could not produce their pairs
    (method -> reason)."""
    failed = failed or {}
    wanted = {cell_key(c) for c in expected}
    rows = sorted((r for r in rows if cell_key(r) in wanted), key=cell_key)
    summary = []
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["protocol"], r["method"], r["n_synthetic"]), []).append(r)
    for (protocol, method, n), rs in sorted(groups.items()):
        entry = {"protocol": protocol, "method": method, "n_synthetic": n, "n_seeds": len(rs)}
        for m in METRICS:
            values = [r[m] for r in rs if m in r]  # rows.jsonl of older runs lack dice_pooled
            entry[m] = summarize(values) if values else {"mean": math.nan, "std": math.nan, "n": 0}
        summary.append(entry)
    return {
        "rows": [{k: v for k, v in r.items() if k != "per_case"} for r in rows],
        "per_case": [
            {**{k: r[k] for k in ("method", "protocol", "n_synthetic", "seed")}, "cases": r["per_case"]}
            for r in rows
        ],
        "summary": summary,
        "verdict": verdicts(summary),
        "config": config,
        "data": data_summary,
        "step_budget": step_budget,
        "quality": quality,
        "complete": len(rows) == len(wanted),
        "failed_generators": failed,
    }


def verdicts(summary: list[dict[str, Any]], metric: str = "dice_slice") -> dict[str, Any]:
    """Per protocol: the real-only Dice, each method's best N and its gain, and whether that difference,
    either way, is larger than the seed spread (the 95 % intervals of best-N and real-only do not
    overlap): a gain beyond it helps, a loss beyond it harms."""
    out: dict[str, Any] = {}
    for protocol in sorted({s["protocol"] for s in summary}):
        ours = [s for s in summary if s["protocol"] == protocol]
        base = next((s for s in ours if s["method"] == "none"), None)
        if base is None:
            continue
        per_method = {}
        for method in sorted({s["method"] for s in ours} - {"none"}):
            best = max((s for s in ours if s["method"] == method), key=lambda s: s[metric]["mean"])
            gain = best[metric]["mean"] - base[metric]["mean"]
            lo, hi = best[metric]["ci_low"], best[metric]["ci_high"]
            separated = lo > base[metric]["ci_high"] or hi < base[metric]["ci_low"]
            per_method[method] = {
                "best_n": best["n_synthetic"],
                "best": best[metric]["mean"],
                "gain": gain,
                "beyond_seed_spread": bool(separated) if not math.isnan(lo) else None,
            }
        out[protocol] = {"metric": metric, "none": base[metric]["mean"], "methods": per_method}
    return out


def plot_report(report: dict[str, Any], path: Path, metric: str = "dice_slice") -> dict[str, list[str]]:
    """Dice against N per method, one panel per protocol (the paper's Dice-evolution figure), as PNG.

    A generator that produced no pairs gets a legend entry saying so. Returns each panel's legend
    labels (protocol -> labels), what a reader of the figure sees drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    protocols = sorted({s["protocol"] for s in report["summary"]})
    fig, axes = plt.subplots(
        1, max(1, len(protocols)), figsize=(6 * max(1, len(protocols)), 4.2), squeeze=False
    )
    drawn: dict[str, list[str]] = {}
    failed = report.get("failed_generators") or {}
    for ax, protocol in zip(axes[0], protocols, strict=False):
        ours = [s for s in report["summary"] if s["protocol"] == protocol]
        base = next((s for s in ours if s["method"] == "none"), None)
        for method in [m for m in GENERATORS if any(s["method"] == m for s in ours)]:
            pts = sorted((s for s in ours if s["method"] == method), key=lambda s: s["n_synthetic"])
            if base is not None:
                pts = [base, *pts]
            x = [s["n_synthetic"] for s in pts]
            y = [100 * s[metric]["mean"] for s in pts]
            err = [0 if math.isnan(s[metric]["std"]) else 100 * s[metric]["std"] for s in pts]
            ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=method)
        if base is not None:
            ax.axhline(100 * base[metric]["mean"], color="grey", ls=":", lw=1, label="no augmentation")
        for method in failed:
            ax.plot([], [], ls="none", marker="x", color="red", label=f"{method}: failed, no pairs")
        ax.set_title(f"{protocol.replace('_', ' ')}")
        ax.set_xlabel("synthetic slices added (N)")
        ax.set_ylabel(f"{metric.replace('_', ' ')} (%), mean +- std over seeds")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        drawn[protocol] = [t.get_text() for t in ax.get_legend().get_texts()]
    fig.tight_layout()
    with atomic_file(Path(path)) as f:
        fig.savefig(f, dpi=110, format="png")
    plt.close(fig)
    return drawn


def report_markdown(report: dict[str, Any], *, paper: bool = False, title: str = "Efficacy") -> str:
    """The summary table (mean +- std [95 % CI] per cell), the verdicts and, for BraTS, the paper's numbers."""
    d, c = report["data"], report["config"]
    lines = [f"# {title}", ""]
    for method, why in report.get("failed_generators", {}).items():
        lines.append(f"**Warning: {method} produced no pairs, so it was not evaluated** ({why}).")
    if report.get("failed_generators"):
        lines.append("")
    lines += [
        f"Patients: train {', '.join(d['train_patients'])}; test {', '.join(d['test_patients'])}. "
        f"Generators see {d['generator_slices']} balanced tumour slices of the training patients; the U-Net "
        f"{d['unet_real_slices']} real tumour slices (+ N synthetic); tested on {d['test_tumour_slices']} "
        f"tumour slices of the test patients.",
        f"Generators: preset `{c['preset']}`, {c['generator_steps']} steps, seed {c['generator_seed']}. "
        f"U-Net: {c['segmenter']['epochs']} epochs (fixed_epochs) or {report['step_budget']} steps for every "
        f"run (step_matched), batch {c['segmenter']['batch_size']}, seeds {c['seeds']}."
        + ("" if report["complete"] else " **Partial: not every cell of the grid has run yet.**"),
        "",
        "| protocol | method | N | seeds | dice_slice (%) | dice_pooled (%) | dice_3d (%) | hd95 |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def fmt(s: dict[str, float], scale: float = 100.0) -> str:
        if math.isnan(s["std"]):
            return f"{scale * s['mean']:.1f}"
        return f"{scale * s['mean']:.1f} +- {scale * s['std']:.1f} [{scale * s['ci_low']:.1f}, {scale * s['ci_high']:.1f}]"

    for s in report["summary"]:
        lines.append(
            f"| {s['protocol']} | {s['method']} | {s['n_synthetic']} | {s['n_seeds']} | {fmt(s['dice_slice'])} "
            f"| {fmt(s['dice_pooled'])} | {fmt(s['dice_3d'])} | {fmt(s['hd95'], 1.0)} |"
        )
    lines += ["", "Best N per method (dice_slice), gain over no augmentation:", ""]
    for protocol, v in report["verdict"].items():
        for method, b in v["methods"].items():
            sep = {True: "beyond the seed spread", False: "within the seed spread", None: "one seed"}[
                b["beyond_seed_spread"]
            ]
            lines.append(
                f"- {protocol}, {method}: best N = {b['best_n']}, {100 * b['best']:.1f} % "
                f"({100 * b['gain']:+.1f} points vs {100 * v['none']:.1f} %, {sep})"
            )
    if paper:
        lines += [
            "",
            "The paper's BraTS figures (dice_slice %, 10 training / 30 test patients, fixed epochs):",
            "",
            "| method | " + " | ".join(str(n) for n in PAPER_BRATS["dhvae"]) + " |",
            "|---|" + "---|" * len(PAPER_BRATS["dhvae"]),
        ]
        for method, vals in PAPER_BRATS.items():
            lines.append(f"| {method} | " + " | ".join(f"{v:.1f}" for v in vals.values()) + " |")
    q = report.get("quality") or {}
    if q and "note" not in q:
        keys = ["psnr_db", "ssim", "lpips", "frechet_vgg16", "mask_area_js_bits"]
        lines += [
            "",
            "Quality of each generator's pairs against the test patients' slices (real_train: the training "
            "slices themselves, what a perfect generator would score):",
            "",
            "| generator | " + " | ".join(keys) + " | near-copies |",
            "|---|" + "---|" * (len(keys) + 1),
        ]
        for name, m in q.items():
            cells_ = [f"{m[k]:.3f}" if k in m else "-" for k in keys]
            mem = m.get("memorisation")
            near = f"{mem['fraction_near_copies']:.1%}" if mem else "-"
            lines.append(f"| {name} | " + " | ".join(cells_) + f" | {near} |")
    return "\n".join(lines) + "\n"


def json_safe(obj: Any) -> Any:
    """The report with NaN and infinities as None (null), for strict JSON (a single seed has no std)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    return obj


# --- aggregation over seeds -----------------------------------------------------------------------


def summarize(values: Sequence[float], confidence: float = 0.95) -> dict[str, float]:
    """Mean, sample standard deviation (ddof 1) and a two-sided t-interval for the mean over seeds.

    ``ci_low, ci_high = mean -+ t_{(1+confidence)/2, n-1} * std / sqrt(n)``. With one value the std and
    the interval are NaN (a single seed says nothing about the spread).
    """
    from scipy import stats

    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        raise ValueError("no values to summarize")
    mean = float(v.mean())
    if v.size == 1:
        return {"mean": mean, "std": float("nan"), "ci_low": float("nan"), "ci_high": float("nan"), "n": 1}
    std = float(v.std(ddof=1))
    half = float(stats.t.ppf(0.5 + confidence / 2, v.size - 1)) * std / math.sqrt(v.size)
    return {"mean": mean, "std": std, "ci_low": mean - half, "ci_high": mean + half, "n": int(v.size)}
