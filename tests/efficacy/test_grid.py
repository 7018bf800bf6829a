"""The efficacy protocol (efficacy/grid.py, efficacy/report.py) end to end on a phantom cohort with tiny settings."""

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest

from efficacy.grid import EfficacyConfig, cells, run_efficacy, split_cohort, synthetic_pairs
from efficacy.report import build_report, plot_report, report_markdown, verdicts
from efficacy.segmenter import SegmenterConfig
from imaging.cohort import CohortSpec
from imaging.errors import Cancelled, DHVAEError
from imaging.phantoms import make_phantom_cohort
from imaging.preprocess import PreprocessConfig
from pipeline import pipeline

PREP = PreprocessConfig(shape=(32, 32, 16))
TINY_UNET = SegmenterConfig(channels=(4, 8), strides=(2,), num_res_units=0, batch_size=8, epochs=1)
# Generators too weak to reach a floor in 3 steps: accept any mask, so the grid always runs.
TINY = dict(
    preset="tiny",
    generator_steps=3,
    segmenter=TINY_UNET,
    generator_overrides={"sampling.min_mask_area": 0},
    quality=False,
)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("eff")
    path = make_phantom_cohort(root / "cohort", n_cases=4, shape=(40, 40, 20), seed=2)
    return pipeline.ingest(path, cache_dir=root / "cache", spec=CohortSpec(), prep=PREP)


def test_split_keeps_every_test_patient_away_from_the_generators(cohort):
    data = split_cohort(cohort, seed=0, test_fraction=0.5)
    assert len(data.split.train) == 2 and len(data.split.test) == 2
    assert not set(data.split.train) & set(data.split.test)
    assert set(data.generator_slices.slices.case_ids) <= set(data.split.train)
    assert {c.case_id for c in data.generator_slices.slices.cases} == set(data.split.train)
    assert {c.case_id for c in data.test_cases} == set(data.split.test)
    # the U-Net's real slices: every tumour slice of the training patients, more than the balanced ones
    n_tumour = sum(int((c.mask.sum((0, 1)) > 0).sum()) for c in data.generator_slices.slices.cases)
    assert len(data.real_train) == n_tumour >= len(data.generator_slices.slices.case_ids)
    explicit = split_cohort(cohort, train_ids=["phantom_000"], test_ids=["phantom_003"])
    assert explicit.split.train == ("phantom_000",) and explicit.split.test == ("phantom_003",)
    with pytest.raises(DHVAEError, match="disjoint"):
        split_cohort(cohort, train_ids=["phantom_000"], test_ids=["phantom_000"])


def test_grid_cells():
    cfg = EfficacyConfig(methods=("dhvae", "traditional"), n_synthetic=(4, 8), seeds=(0, 1))
    assert cfg.methods[0] == "none"
    grid = cells(cfg)
    # none: 1 N x 2 seeds; each generator: 2 N x 2 seeds; times 2 protocols
    assert len(grid) == 2 * (2 + 2 * 2 * 2)
    assert {c["n_synthetic"] for c in grid if c["method"] == "none"} == {0}
    with pytest.raises(DHVAEError, match="unknown method"):
        EfficacyConfig(methods=("stylegan",))


def test_protocols_share_the_u_net_they_both_train(cohort, tmp_path: Path, monkeypatch):
    """At the largest N, fixed_epochs and step_matched train the same U-Net (same slices, seed, steps):
    it is trained once and its result serves both rows."""
    import efficacy.grid as eff

    trained = []
    real = eff.run_downstream
    monkeypatch.setattr(eff, "run_downstream", lambda *a, **k: trained.append(k) or real(*a, **k))
    data = split_cohort(cohort, seed=0, test_fraction=0.5)
    cfg = EfficacyConfig(methods=("traditional",), n_synthetic=(4, 8), seeds=(0,), **TINY)
    report = run_efficacy(data, cfg, tmp_path / "w")
    assert len(report["rows"]) == len(cells(cfg)) == 6
    assert len(trained) == 5  # traditional N = 8 is trained once for both protocols
    rows = {(r["protocol"], r["method"], r["n_synthetic"]): r for r in report["rows"]}
    a, b = rows[("fixed_epochs", "traditional", 8)], rows[("step_matched", "traditional", 8)]
    assert a["steps"] == b["steps"] and a["dice_slice"] == b["dice_slice"]


def test_pretrained_generator_is_sampled_with_the_runs_sampling_overrides(cohort, tmp_path: Path):
    """A checkpoint given as ``pretrained`` is not retrained; ``sampling.*`` overrides (here the
    rejection floor) apply to its sampling, the rest of its config is its own."""
    data = split_cohort(cohort, seed=0, test_fraction=0.5)
    cfg = EfficacyConfig(methods=("vae",), n_synthetic=(8,), seeds=(0,), **TINY)
    trained = synthetic_pairs("vae", data, cfg, tmp_path / "a")
    ckpt = str(tmp_path / "a/vae/model/model.pt")
    same = synthetic_pairs("vae", data, dataclasses.replace(cfg, pretrained={"vae": ckpt}), tmp_path / "b")
    np.testing.assert_array_equal(same, trained)  # same checkpoint, floor and seed: the same pairs

    areas = (trained[:, 1] > 0.5).sum((1, 2))
    floor = int(np.median(areas)) + 1
    assert (areas < floor).any()  # the trained run kept masks the new floor rejects
    raised = dataclasses.replace(
        cfg, pretrained={"vae": ckpt}, generator_overrides={"sampling.min_mask_area": floor}
    )
    pairs = synthetic_pairs("vae", data, raised, tmp_path / "c")
    assert len(pairs) == 8 and ((pairs[:, 1] > 0.5).sum((1, 2)) >= floor).all()
    assert not (tmp_path / "c/vae/model").exists()  # sampled, not trained


def test_run_is_resumable_and_reports(cohort, tmp_path: Path):
    data = split_cohort(cohort, seed=0, test_fraction=0.5)
    cfg = EfficacyConfig(methods=("traditional", "vae"), n_synthetic=(4, 8), seeds=(0, 1), **TINY)
    stops = iter([False] * 5 + [True])
    with pytest.raises(Cancelled):  # killed part-way through the grid
        run_efficacy(data, cfg, tmp_path / "w", should_stop=lambda: next(stops, True))
    partial = [json.loads(line) for line in (tmp_path / "w/rows.jsonl").read_text().splitlines()]
    assert 0 < len(partial) < len(cells(cfg))
    snapshot = run_efficacy(data, cfg, tmp_path / "w", report_only=True)  # what is there, nothing more
    assert not snapshot["complete"] and len(snapshot["rows"]) == len(partial)

    seen = []
    report = run_efficacy(data, cfg, tmp_path / "w", progress=seen.append)
    assert report["complete"] and len(report["rows"]) == len(cells(cfg))
    assert seen[0].done == len(partial)  # resumed: the finished cells were not run again
    again = run_efficacy(data, cfg, tmp_path / "w")  # everything done: the same report
    assert again["rows"] == report["rows"]

    for row in report["rows"]:
        assert 0.0 <= row["dice_slice"] <= 1.0 and 0.0 <= row["dice_3d"] <= 1.0 and row["hd95"] >= 0
    budget = report["step_budget"]
    step_matched = [r for r in report["rows"] if r["protocol"] == "step_matched"]
    assert {r["steps"] for r in step_matched} == {budget}  # every run of the grid, real-only included
    fixed = {
        (r["method"], r["n_synthetic"]): r["steps"] for r in report["rows"] if r["protocol"] == "fixed_epochs"
    }
    assert fixed[("none", 0)] < fixed[("vae", 8)] == budget  # fixed epochs: more slices, more steps
    # the same generator pairs serve both protocols and nest: N=4 is a prefix of N=8
    pairs = np.load(tmp_path / "w/vae/pairs.npy")
    assert pairs.shape[0] == 8 and pairs.shape[1:] == (2, 32, 32)

    summary = {(s["protocol"], s["method"], s["n_synthetic"]): s for s in report["summary"]}
    assert summary[("step_matched", "none", 0)]["n_seeds"] == 2
    assert set(report["verdict"]) == {"fixed_epochs", "step_matched"}
    md = report_markdown(report, paper=True)
    assert "| step_matched | vae | 8 | 2 |" in md and "84.4" in md
    drawn = plot_report(report, tmp_path / "plot.png")
    assert drawn == {p: ["no augmentation", "traditional", "vae"] for p in ("fixed_epochs", "step_matched")}
    from PIL import Image

    with Image.open(tmp_path / "plot.png") as png:  # two panels side by side
        assert png.format == "PNG" and png.width > 1.8 * png.height

    # the same folder reports on fewer methods (or runs more) without redoing any finished cell
    fewer = EfficacyConfig(methods=("traditional",), n_synthetic=(4, 8), seeds=(0, 1), **TINY)
    seen = []
    subset = run_efficacy(data, fewer, tmp_path / "w", progress=seen.append)
    assert subset["complete"] and subset["rows"] == [
        r for r in report["rows"] if r["method"] in ("none", "traditional")
    ]
    assert seen[0].done == seen[0].total == len(cells(fewer))
    other = EfficacyConfig(methods=("traditional",), n_synthetic=(4,), seeds=(0,), **TINY)
    with pytest.raises(DHVAEError, match="other settings"):
        run_efficacy(data, other, tmp_path / "w")


def test_verdict_gain_and_seed_spread():
    def s(method, n, mean, std):
        half = 2.0 * std
        m = {"mean": mean, "std": std, "ci_low": mean - half, "ci_high": mean + half, "n": 3}
        return {"protocol": "step_matched", "method": method, "n_synthetic": n, "n_seeds": 3, "dice_slice": m}

    summary = [
        s("none", 0, 0.5, 0.01),
        s("dhvae", 10, 0.6, 0.01),
        s("dhvae", 20, 0.55, 0.01),
        s("vae", 10, 0.51, 0.02),
        s("lsgan", 10, 0.4, 0.01),
    ]
    v = verdicts(summary)["step_matched"]
    assert v["none"] == 0.5
    assert v["methods"]["dhvae"]["best_n"] == 10 and math.isclose(v["methods"]["dhvae"]["gain"], 0.1)
    assert v["methods"]["dhvae"]["beyond_seed_spread"] is True
    assert v["methods"]["vae"]["beyond_seed_spread"] is False
    assert v["methods"]["lsgan"]["beyond_seed_spread"] is True  # a loss beyond the spread: it harms
    assert v["methods"]["lsgan"]["gain"] < 0
    cfg = EfficacyConfig(seeds=(0,))
    report = build_report([], cells(cfg), cfg.to_dict(), {}, {}, step_budget=1)
    assert report["rows"] == [] and not report["complete"]


def test_a_failed_generator_is_in_the_figure_and_the_table(tmp_path):
    s = {"mean": 0.5, "std": 0.01, "ci_low": 0.49, "ci_high": 0.51, "n": 2}
    summary_row = {"protocol": "step_matched", "method": "none", "n_synthetic": 0, "n_seeds": 2}
    report = {
        "summary": [{**summary_row, **{m: s for m in ("dice_slice", "dice_pooled", "dice_3d", "hd95")}}],
        "failed_generators": {"dhvae": "only 0 of 20 pairs reached the mask-area floor"},
    }
    assert plot_report(report, tmp_path / "p.png") == {
        "step_matched": ["no augmentation", "dhvae: failed, no pairs"]
    }
