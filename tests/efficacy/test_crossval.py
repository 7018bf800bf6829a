"""The cross-validated protocol (efficacy/crossval.py, efficacy/online.py, the mixed loader of
efficacy/segmenter.py) on a phantom cohort with tiny settings."""

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage

import efficacy.crossval as crossval
from efficacy.crossval import (
    ARMS,
    LCC_METRICS,
    POST_METRIC,
    REFERENCE,
    CVConfig,
    choose_budget,
    choose_postprocessing,
    crossval_markdown,
    fold_data,
    foreign_seeds,
    inner_curve_path,
    make_folds,
    paired_gain,
    postprocess_choice,
    postprocess_path,
    remeasure,
    restore_arm_curves,
    restore_work_dir,
    run_crossval,
    summarise,
    write_crossval,
)
from efficacy.grid import pairs_path
from efficacy.online import OnlineAugment
from efficacy.segmenter import LoaderRecipe, SegmenterConfig, train_segmenter
from imaging.cohort import CohortSpec
from imaging.errors import DHVAEError
from imaging.phantoms import make_phantom_cohort
from imaging.preprocess import PreprocessConfig
from pipeline import pipeline

TINY_UNET = SegmenterConfig(channels=(4, 8), strides=(2,), num_res_units=0, batch_size=8, epochs=1)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("cv")
    path = make_phantom_cohort(root / "cohort", n_cases=4, shape=(40, 40, 20), seed=2)
    return pipeline.ingest(
        path, cache_dir=root / "cache", spec=CohortSpec(), prep=PreprocessConfig(shape=(32, 32, 16))
    )


def test_folds_test_every_patient_once():
    ids = [f"p{i}" for i in range(6)]
    folds = make_folds(ids, 3, seed=0)
    assert sorted(p for f in folds for p in f.test) == ids
    for f in folds:
        assert len(f.test) == 2 and len(f.train) == 4 and not set(f.train) & set(f.test)
    assert make_folds(ids, 3, seed=0) == folds
    with pytest.raises(DHVAEError, match="cannot make 2 folds"):
        make_folds(ids[:3], 2, seed=0)  # a fold would train on one patient: no inner validation


def test_no_test_patient_reaches_a_fold_s_training_data(cohort):
    cfg = CVConfig(seeds=(0,), segmenter=TINY_UNET)
    for i, split in enumerate(make_folds([c.case_id for c in cohort.slices.cases], 2, seed=0)):
        fold = fold_data(cohort, split, i, cfg)
        assert {c.case_id for c in fold.train_cases} == set(split.train)
        assert set(fold.data.generator_slices.slices.case_ids) <= set(split.train)
        assert {c.case_id for c in fold.data.test_cases} == set(split.test)
        n_free = len(fold.real_pool) - len(fold.data.real_train)
        assert n_free == round(cfg.tumour_free_ratio * len(fold.data.real_train))
        assert fold.real_pool[len(fold.data.real_train) :, 1].sum() == 0  # tumour-free indeed


def _marked(n: int, value: float) -> np.ndarray:
    x = np.zeros((n, 2, 16, 16), np.float32)
    x[:, 0] = value
    x[:, 1, 4:8, 4:8] = 1
    return x


def test_the_loader_keeps_the_real_fraction_and_pretrains_on_synthetic():
    seen: list[int] = []

    def count(batch, seed, step):
        seen.append(int((batch[:, 0, 0, 0] == 0.25).sum()))  # synthetic slices in this batch
        return batch

    cfg = SegmenterConfig(channels=(4, 8), strides=(2,), num_res_units=0, batch_size=8)
    train_segmenter(
        _marked(10, 0.75),
        synthetic=_marked(50, 0.25),
        recipe=LoaderRecipe(real_fraction=0.75, pretrain_steps=2),
        online=[count],
        seed=0,
        cfg=cfg,
        protocol="step_matched",
        steps=6,
    )
    assert seen == [8, 8, 2, 2, 2, 2]  # 2 pretraining steps, then 3:1
    with pytest.raises(DHVAEError, match="real_fraction"):
        LoaderRecipe(real_fraction=0.0)


def test_online_augmentation_is_seeded_and_keeps_masks_binary():
    aug = OnlineAugment()
    batch = torch.from_numpy(_marked(4, 0.5))
    a, b = aug(batch, 0, 3), aug(batch, 0, 3)
    torch.testing.assert_close(a, b)
    assert a.shape == batch.shape and set(torch.unique(a[:, 1]).tolist()) <= {0.0, 1.0}
    assert not torch.equal(aug(batch, 0, 4), a)
    assert 0.0 <= float(a[:, 0].min()) and float(a[:, 0].max()) <= 1.0


def _row(fold, arm, seed, dice, cases):
    return {
        "fold": fold,
        "arm": arm,
        "seed": seed,
        "dice_slice": dice,
        "dice_3d": dice,
        "hd95": 1.0,
        "fp_volume": 0.0,
        "per_case": [
            {"case_id": c, "dice_slice": dice + d, "dice_3d": dice + d, "hd95": 1.0, "fp_volume": 0.0}
            for c, d in cases
        ],
    }


def test_paired_gain_and_the_recommendation():
    rows = []
    for fold, cases in ((0, ["a", "b"]), (1, ["c", "d"])):
        for seed in (0, 1):
            rows.append(_row(fold, REFERENCE, seed, 0.70, [(c, 0.0) for c in cases]))
            rows.append(_row(fold, "insert", seed, 0.74, [(c, 0.02 * k) for k, c in enumerate(cases)]))
            rows.append(_row(fold, "real", seed, 0.69, [(c, 0.0) for c in cases]))
    g = paired_gain(rows, "insert", "dice_slice", folds=2)
    assert g["runs"] == 4 and g["patients"] == 4
    assert g["mean_run_gain"] == pytest.approx(0.04)
    assert g["mean_patient_gain"] == pytest.approx(0.05)  # 0.04 + mean(0, 0.02, 0, 0.02)
    assert 0.04 - 1e-9 <= g["ci95"][0] <= g["ci95"][1] <= 0.06 + 1e-9 and g["helps"]
    assert {c: round(p["gain"], 6) for c, p in g["per_patient"].items()} == {
        "a": 0.04,
        "b": 0.06,
        "c": 0.04,
        "d": 0.06,
    }
    assert {p["runs"] for p in g["per_patient"].values()} == {2}
    assert not paired_gain(rows, "real", "dice_slice", folds=2)["helps"]
    # one fold's patients make an interval (above 0 here), but no verdict on the cohort: not yet
    one_fold = [r for r in rows if r["arm"] != "insert" or r["fold"] == 0]
    g0 = paired_gain(one_fold, "insert", "dice_slice", folds=2)
    assert g0["ci95"][0] > 0 and g0["untested_patients"] == ["c", "d"] and not g0["helps"]
    assert g["untested_patients"] == []
    # nor when every arm, the reference included, ran on that one fold only: the cohort's other fold is
    # untested (the same rows in a one-fold grid give a verdict: the grid's fold count is what decides)
    only_fold0 = [r for r in rows if r["fold"] == 0]
    g00 = paired_gain(only_fold0, "insert", "dice_slice", folds=2)
    assert g00["ci95"][0] > 0 and g00["untested_patients"] == [] and g00["untested_folds"] == [1]
    assert not g00["helps"] and paired_gain(only_fold0, "insert", "dice_slice", folds=1)["helps"]
    one_fold_grid = summarise(only_fold0, CVConfig(arms=(REFERENCE, "insert"), seeds=(0, 1), folds=2))
    assert one_fold_grid["recommendation"]["words"].startswith("Nothing beats your real data")
    one_fold_grid["folds"] = []
    assert "| not yet (fold 1 unpaired) |" in crossval_markdown(one_fold_grid)
    partial = summarise(one_fold, CVConfig(arms=(REFERENCE, "insert"), seeds=(0, 1), folds=2))
    assert partial["recommendation"]["words"].startswith("Nothing beats your real data")
    partial["folds"] = []
    assert "| not yet (2 patients unpaired) |" in crossval_markdown(partial)
    # a pair whose two runs ran on different kinds of CPU does not count (a seed is shared only on one kind)
    moved = [
        {**r, "cpu_flags": ["avx2"]} if (r["arm"], r["fold"], r["seed"]) == ("insert", 0, 1) else r
        for r in rows
    ]
    g1 = paired_gain(moved, "insert", "dice_slice", folds=2)
    assert g1["runs"] == 3 and g1["cross_cpu_pairs"] == 1 and g["cross_cpu_pairs"] == 0
    moved_report = summarise(moved, CVConfig(arms=("real", REFERENCE, "insert"), seeds=(0, 1), folds=2))
    assert "different kinds of CPU: insert 1." in crossval_markdown(moved_report)
    report = summarise(rows, CVConfig(arms=("real", REFERENCE, "insert"), seeds=(0, 1), folds=2))
    assert (
        report["recommendation"]["arm"] == "insert"
        and "beats your real data" in report["recommendation"]["words"]
    )
    assert report["recommendation"]["words"].startswith("insert (500 insert pairs) beats")
    # how many patients carry the gain: a, b, c, d gain 4, 6, 4 and 6 points
    assert report["recommendation"]["patients_gaining"] == [4, 4]
    assert report["recommendation"]["median_patient_gain_points"] == pytest.approx(5.0)
    assert (
        "It gains on 4 of 4 test patients, +5.0 points on the median one."
        in report["recommendation"]["words"]
    )
    # an online recipe is said as the training recipe it is, with its tumours' source
    online = [{**r, "arm": "insert_online_tumour_dhvae"} if r["arm"] == "insert" else r for r in rows]
    said = summarise(online, CVConfig(arms=(REFERENCE, "insert_online_tumour_dhvae"), seeds=(0, 1), folds=2))
    assert said["recommendation"]["online_donors"] == "dhvae" and said["recommendation"]["n"] == 0
    assert (
        "dHVAE-generated tumours pasted into the slices that carry a tumour"
        in said["recommendation"]["words"]
    )
    flat = summarise(
        [r for r in rows if r["arm"] != "insert"], CVConfig(arms=("real", REFERENCE), seeds=(0, 1), folds=2)
    )
    assert flat["recommendation"]["words"].startswith("Nothing beats your real data")
    # the post-processed 3D metrics: only the pairs whose two rows measured them count
    assert (
        paired_gain(rows, "insert", "dice_3d_lcc", folds=2) is None
        and "dice_3d_lcc" not in report["gains"]["insert"]
    )
    for r in rows:
        if r["seed"] == 0:
            for m in (r, *r["per_case"]):
                m |= {"dice_3d_lcc": m["dice_3d"] + (0.1 if r["arm"] == "insert" else 0.0)}
                m |= {"hd95_lcc": m["hd95"], "fp_volume_lcc": m["fp_volume"]}
    g = paired_gain(rows, "insert", "dice_3d_lcc", folds=2)
    assert g["runs"] == 2 and g["mean_run_gain"] == pytest.approx(0.14) and g["helps"]
    report = summarise(rows, CVConfig(arms=("real", REFERENCE, "insert"), seeds=(0, 1), folds=2))
    pooled = next(t for t in report["table"] if t["arm"] == "insert" and t["fold"] == "pooled")
    assert pooled["dice_3d_lcc"]["n"] == 2 and pooled["dice_3d"]["n"] == 4
    report["folds"] = []
    text = crossval_markdown(report)
    assert "dice_3d gain, post-processed" in text
    # per test patient: slice Dice / post-processed 3D (none here: no fold chose a post-processing)
    assert "| arm | a | b | c | d |" in text and "| insert | +4.0 / n/a | +6.0 / n/a | +4.0 / n/a |" in text


def test_crossval_end_to_end_resumes(cohort, tmp_path, monkeypatch):
    cfg = CVConfig(
        arms=("real", REFERENCE, "insert", "insert_online", "real_fixed_epochs", "insert_filtered"),
        folds=2,
        seeds=(0,),
        max_steps=4,
        eval_every=2,
        segmenter=TINY_UNET,
        n_synthetic=8,
    )
    report = run_crossval(cohort, cfg, tmp_path)
    assert report["complete"] and report["runs_done"] == 2 * 6
    filtered = [r for r in report["rows"] if r["arm"] == "insert_filtered"]
    assert all(r["agreement"]["candidates"] == 16 and r["n"] == 8 for r in filtered)  # 2N scored, N kept
    rows = [json.loads(line) for line in (tmp_path / "rows.jsonl").read_text().splitlines()]
    assert {r["arm"] for r in rows} == set(cfg.arms)
    for r in rows:
        assert {
            "fold",
            "method",
            "n",
            "seed",
            "dice_slice",
            "dice_3d",
            "hd95",
            "fp_volume",
            *LCC_METRICS,
            "real_fraction",
        } <= set(r)
        assert set(LCC_METRICS) <= set(r["per_case"][0]) and r["fp_volume_lcc"] <= r["fp_volume"]
        assert r["steps"] == (
            report["folds"][r["fold"]]["budget"]["steps"] if r["arm"] != "real_fixed_epochs" else r["steps"]
        )
    for f in report["folds"]:
        b = f["budget"]
        assert len(b["validation_patients"]) == 1  # 2 training patients: one can be held out
        assert set(b["validation_patients"]) <= set(f["train"]) and b["steps"] in (2, 4)
        assert list(f["postprocess"]["held_out"]) == b["validation_patients"]  # chosen on the same patients
    assert report["recommendation"]["postprocess"] in ("largest_component", "none")
    again = run_crossval(cohort, cfg, tmp_path)  # nothing left to run: the same rows
    assert again["runs_done"] == 12 and len((tmp_path / "rows.jsonl").read_text().splitlines()) == 12
    write_crossval(again, tmp_path / "out")
    md = (tmp_path / "out" / "efficacy_cv.md").read_text()
    assert "Paired gain over `real_aug`" in md and "**Recommendation**" in md
    assert "nnU-Net's post-processing" in md
    assert (tmp_path / "out" / "efficacy_cv.png").stat().st_size > 0
    with pytest.raises(DHVAEError, match="other settings"):
        run_crossval(
            cohort, CVConfig(arms=cfg.arms, folds=2, seeds=(0,), max_steps=6, segmenter=TINY_UNET), tmp_path
        )
    # a new machine: the committed report seeds an empty folder, and nothing is trained again
    committed = json.loads((tmp_path / "out" / "efficacy_cv.json").read_text())
    assert restore_work_dir(committed, tmp_path / "new") == 12
    assert restore_work_dir(committed, tmp_path / "new") == 0  # twice: no duplicate rows

    def no_training(*a, **k):
        raise AssertionError("a restored run was trained again")

    monkeypatch.setattr("efficacy.crossval.train_segmenter", no_training)
    restored = run_crossval(cohort, cfg, tmp_path / "new")
    assert restored["runs_done"] == 12 and restored["gains"] == json.loads(json.dumps(again["gains"]))
    assert [f["budget"] for f in restored["folds"]] == [f["budget"] for f in committed["folds"]]
    with pytest.raises(DHVAEError, match="other settings"):
        run_crossval(cohort, replace(cfg, max_steps=6), tmp_path / "new")
    # rows older than the post-processed metrics: remeasure trains them again, and they reproduce
    old = [{k: v for k, v in r.items() if k not in LCC_METRICS} if r["arm"] == "real" else r for r in rows]
    (tmp_path / "new" / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in old))
    assert remeasure(tmp_path / "new", ["real", "insert"], [0]) == 2  # the insert rows have them already
    assert remeasure(tmp_path / "new", ["real"], [0]) == 0
    monkeypatch.undo()
    redone = run_crossval(cohort, cfg, tmp_path / "new")
    assert redone["runs_done"] == 12
    for r in (r for r in redone["rows"] if r["arm"] == "real"):
        assert set(LCC_METRICS) <= set(r) and r["before"]["dice_slice"] == r["dice_slice"]
        assert r["before"]["dice_3d"] == r["dice_3d"]
    # a fold stopped while choosing its budget: the held-out curves it has travel in the report
    assert all(f["inner_curves"] == {} for f in report["folds"])  # every budget chosen
    held = report["folds"][0]["budget"]["validation_patients"][0]
    (tmp_path / "half" / "fold0").mkdir(parents=True)
    inner_curve_path(tmp_path / "half" / "fold0", held).write_text("[[2, 0.1], [4, 0.2]]")
    half = run_crossval(cohort, cfg, tmp_path / "half", report_only=True)
    assert half["folds"][0]["budget"] is None and half["folds"][0]["inner_curves"] == {
        held: [[2, 0.1], [4, 0.2]]
    }
    assert restore_work_dir(json.loads(json.dumps(half)), tmp_path / "half2") == 0
    assert json.loads(inner_curve_path(tmp_path / "half2" / "fold0", held).read_text()) == [
        [2, 0.1],
        [4, 0.2],
    ]
    # rows of an older insertion (no version recorded: 1) are neither restored nor reported
    inserting = {a for a in cfg.arms if ARMS[a].inserts}
    assert inserting == {"insert", "insert_online", "insert_filtered"}
    stale = [{k: v for k, v in r.items() if k != "insert_version"} for r in committed["rows"]]
    assert restore_work_dir({**committed, "rows": stale}, tmp_path / "old") == 12 - 2 * len(inserting)
    with open(tmp_path / "old" / "rows.jsonl", "a") as sink:
        sink.writelines(json.dumps(r) + "\n" for r in stale if r["arm"] in inserting)
    partial = run_crossval(cohort, cfg, tmp_path / "old", report_only=True)
    assert partial["runs_done"] == 6 and not {r["arm"] for r in partial["rows"]} & inserting
    assert partial["seeds_done"] == [] and partial["seeds_begun"] == [0]  # half of seed 0's runs
    assert "(seeds done: []; begun: [0])" in crossval_markdown(partial)
    # a session with time for one fold's generator fit trains that fold only; the report covers both
    one = run_crossval(cohort, replace(cfg, seeds=(0, 1, 2)), tmp_path, train_seeds=[2], train_folds=[1])
    assert one["runs_done"] == 18 and {(r["seed"], r["fold"]) for r in one["rows"]} == {
        (0, 0),
        (0, 1),
        (2, 1),
    }
    assert one["seeds_done"] == [0] and one["seeds_begun"] == [2]
    # a session on the CPU kind of one seed's rows trains that seed only; the report covers every seed
    more = run_crossval(cohort, replace(cfg, seeds=(0, 1, 2)), tmp_path, train_seeds=[2])
    assert more["runs_done"] == 24 and {r["seed"] for r in more["rows"]} == {0, 2}
    assert more["seeds_done"] == [0, 2] and more["seeds_begun"] == []


def _cv(*argv: str) -> subprocess.CompletedProcess[str]:
    """Run bench/efficacy/cv.py from the repository root with ``argv``; its exit code and output."""
    return subprocess.run(
        [sys.executable, "bench/efficacy/cv.py", *argv],
        cwd=Path(__file__).resolve().parents[2],
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize("flag", ["--train-seeds", "--remeasure-seeds"])
def test_cv_refuses_a_seed_outside_its_seeds(flag):
    """Seed 3 in ``--train-seeds`` or ``--remeasure-seeds`` with ``--seeds 3`` would train nothing: refused."""
    run = _cv("--seeds", "3", flag, "1", "3", "--report-only")
    assert run.returncode == 2 and f"{flag} [1, 3]: every seed must lie in 0..2" in run.stderr


def test_cv_refuses_a_fold_outside_its_folds():
    """Fold 3 in ``--train-folds`` with ``--folds 3`` would train nothing: refused."""
    run = _cv("--folds", "3", "--train-folds", "0", "3", "--report-only")
    assert run.returncode == 2 and "--train-folds [0, 3]: every fold must lie in 0..2" in run.stderr


def test_foreign_seeds_names_the_seeds_another_cpu_kind_began(tmp_path):
    """A seed whose runs ran on another CPU kind is named with that kind; this kind's own seeds are not."""
    amx, epyc = ["avx2", "avx512f", "amx_bf16"], ["avx2", "avx512f"]
    rows = [
        {"fold": 0, "arm": "real_aug", "seed": 0, "cpu_flags": epyc},
        {"fold": 1, "arm": "insert", "seed": 1, "cpu_flags": amx},
        {"fold": 0, "arm": "real_aug", "seed": 1, "cpu_flags": epyc},
        {"fold": 0, "arm": "real_aug", "seed": 2},  # an untagged row names no kind
    ]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert foreign_seeds(tmp_path, [0, 1, 2], epyc) == {1: ["avx2, avx512f, amx_bf16"]}
    assert foreign_seeds(tmp_path, [0, 1, 2], ["avx2"]) == {
        0: ["avx2, avx512f"],
        1: ["avx2, avx512f", "avx2, avx512f, amx_bf16"],
    }
    assert foreign_seeds(tmp_path, [0], epyc) == {}
    assert foreign_seeds(tmp_path / "empty", [0, 1], amx) == {}


def test_cv_refuses_to_train_a_seed_another_cpu_kind_began(tmp_path):
    """cv.py stops before any training when a seed it would train began on another CPU kind."""
    row = {"fold": 0, "arm": "real_aug", "seed": 1, "cpu_flags": ["another_kind"]}
    (tmp_path / "rows.jsonl").write_text(json.dumps(row) + "\n")
    run = _cv("--seeds", "3", "--train-seeds", "1", "--work", str(tmp_path))
    assert run.returncode == 2 and "seed 1: another_kind" in run.stderr and "pair with nothing" in run.stderr


def test_unknown_arm_is_refused():
    with pytest.raises(DHVAEError, match="unknown arm"):
        CVConfig(arms=("stylegan",))
    assert REFERENCE in CVConfig(arms=("real",)).arms
    assert ARMS["insert"].method == "insert"


def test_the_agreement_filter_drops_disagreeing_pairs_and_favours_hard_ones(cohort, tmp_path):
    from efficacy.crossval import agreement_filter

    cfg = CVConfig(seeds=(0,), segmenter=TINY_UNET, folds=2)
    split = make_folds([c.case_id for c in cohort.slices.cases], 2, seed=0)[0]
    fold = fold_data(cohort, split, 0, cfg)
    good = fold.data.real_train[:6].copy()
    bad = good.copy()
    bad[:, 1] = np.roll(bad[:, 1], 12, axis=-1)  # masks moved off their tumours: disagreement
    arm = ARMS["insert_filtered"]
    candidates = np.concatenate([good, bad])
    dice = np.r_[np.full(6, 0.9), np.full(6, 0.1)]
    (tmp_path / arm.method).mkdir()
    np.save(tmp_path / arm.method / "agreement.npy", dice)  # the scorer's verdicts, as cached
    chosen, summary = agreement_filter(candidates, 8, fold, arm, cfg, tmp_path, budget=2)
    assert summary["kept"] == 6 and len(chosen) == 8
    assert all(any(np.array_equal(c, g) for g in good) for c in chosen)  # only agreeing pairs
    import dataclasses

    strict = dataclasses.replace(arm, filter_dice=0.95)
    _, summary = agreement_filter(candidates, 4, fold, strict, cfg, tmp_path, budget=2)
    assert summary["fallback_best_tenth"] and summary["kept"] == 1  # nothing agrees: the best tenth, flagged
    # without a cache the scorer is trained on the fold's real slices (tiny: 2 steps) and scores all
    fresh = tmp_path / "fresh"
    chosen, summary = agreement_filter(
        candidates, 4, fold, dataclasses.replace(arm, filter_dice=0.0), cfg, fresh, budget=2
    )
    assert summary["candidates"] == 12 and len(np.load(fresh / arm.method / "agreement.npy")) == 12


def test_the_budget_smoothing_does_not_count_an_end_point_twice():
    from efficacy.crossval import smooth3

    # fold 0 of the first run: a noisy first point that edge padding weighted twice (0.55 instead of 0.5)
    np.testing.assert_allclose(smooth3([0.65, 0.35, 0.40, 0.58]), [0.5, 0.4667, 0.4433, 0.49], atol=1e-4)
    np.testing.assert_allclose(smooth3([0.3]), [0.3])
    np.testing.assert_allclose(smooth3([0.2, 0.4]), [0.3, 0.3])


def test_the_budget_averages_the_held_out_patients_curves(cohort, tmp_path):
    """Two held-out training patients: their curves are averaged before the plateau rule. Alone, the
    first patient's noisy first point would set a 100-step budget; the mean curve rises to 400. The
    curves come from the resumable per-patient cache, so nothing is trained here."""
    from efficacy.crossval import choose_budget, inner_validation_patients, smooth3
    from efficacy.segmenter import PatientSplit

    ids = sorted(c.case_id for c in cohort.slices.cases)
    cfg = CVConfig(inner_patients=2, max_steps=400, eval_every=100, segmenter=TINY_UNET)
    fold = fold_data(cohort, PatientSplit(tuple(ids[:3]), (ids[3],)), 0, cfg)
    held = inner_validation_patients(fold, cfg)
    assert len(held) == 2 and set(held) <= set(ids[:3])
    assert len(inner_validation_patients(fold, replace(cfg, inner_patients=5))) == 2  # all but one
    curves = {held[0]: [0.7, 0.4, 0.5, 0.6], held[1]: [0.1, 0.4, 0.6, 0.7]}
    for p, dice in curves.items():
        (tmp_path / f"inner_{p}.json").write_text(
            json.dumps([[100 * (i + 1), d] for i, d in enumerate(dice)])
        )
    calls = []
    budget = choose_budget(cohort, fold, cfg, tmp_path, on_inner_run=lambda: calls.append(1))
    assert budget["steps"] == 400 and budget["validation_patients"] == held and not calls
    np.testing.assert_allclose([p["dice_slice"] for p in budget["curve"]], [0.4, 0.4, 0.55, 0.65])
    assert budget["curve"][0][held[0]] == 0.7
    alone = smooth3(curves[held[0]])
    assert np.flatnonzero(alone >= alone.max() - cfg.plateau_tol)[0] == 0  # the 100-step budget


def test_an_arm_s_inner_curve_draws_its_pairs_from_the_inner_training_patients(cohort, tmp_path, monkeypatch):
    """The arm probe (bench/efficacy/inner_probe.py --arms): an arm with offline pairs is trained on the
    fold's training patients but the held-out one, its pairs drawn from those only; the curve is cached
    beside the reference's (which it never overwrites). An agreement filter's scorer is trained on those
    patients too, for the fold's budget, which it cannot do without."""
    from efficacy.crossval import cached_inner_curve
    from efficacy.segmenter import PatientSplit
    from models.insert import recipient_slices

    ids = sorted(c.case_id for c in cohort.slices.cases)
    cfg = CVConfig(max_steps=4, eval_every=2, segmenter=TINY_UNET, n_synthetic=6)
    fold = fold_data(cohort, PatientSplit(tuple(ids[:3]), (ids[3],)), 0, cfg)
    held = ids[0]
    curve = cached_inner_curve(cohort, fold, cfg.arm("insert_healthy"), held, cfg, tmp_path)
    assert [s for s, _ in curve] == [2, 4] and all(0 <= d <= 1 for _, d in curve)
    assert inner_curve_path(tmp_path, held, "insert_healthy").is_file()
    assert not inner_curve_path(tmp_path, held).exists()  # the reference's budget curve is its own
    pairs = np.load(pairs_path(tmp_path / f"inner_pairs_{held}", "insert_healthy"))
    assert len(pairs) == 6

    def background_of(cases):
        return recipient_slices(cases)[:, 0]

    by_id = {c.case_id: c for c in cohort.slices.cases}
    inner_bg = background_of([by_id[i] for i in ids[1:3]])
    for other in (held, ids[3]):  # neither the held-out patient nor the test patient
        outside = background_of([by_id[other]])
        for p in pairs:
            far = ~np.asarray(torch.nn.functional.max_pool2d(torch.tensor(p[1])[None], 21, 1, 10)[0] > 0)
            assert min(np.abs(p[0] - b)[far].max() for b in inner_bg) < 1e-3  # a recipient of the inner train
            assert min(np.abs(p[0] - b)[far].max() for b in outside) > 1e-3

    def no_training(*a, **k):
        raise AssertionError("a cached inner curve was trained again")

    monkeypatch.setattr("efficacy.crossval.train_segmenter", no_training)
    assert cached_inner_curve(cohort, fold, cfg.arm("insert_healthy"), held, cfg, tmp_path) == [
        tuple(p) for p in curve
    ]
    filtered = cfg.arm("insert_filtered")
    with pytest.raises(DHVAEError, match="step budget"):  # its scorer's steps are the fold's budget
        cached_inner_curve(cohort, fold, filtered, held, cfg, tmp_path)
    monkeypatch.undo()
    scored = []

    def scorer(pool, **kw):  # the agreement filter's scorer: the inner training patients' slices only
        scored.append((len(pool), kw.get("steps")))
        return train_segmenter(pool, **kw)

    monkeypatch.setattr("efficacy.crossval.train_segmenter", scorer)
    curve = cached_inner_curve(cohort, fold, filtered, held, cfg, tmp_path, budget=2)
    assert [s for s, _ in curve] == [2, 4] and all(0 <= d <= 1 for _, d in curve)
    inner_pool = len(crossval.inner_fold(cohort, fold, held, cfg).real_pool)
    assert scored[0] == (inner_pool, 2) and inner_pool < len(fold.real_pool)
    agreement = np.load(tmp_path / f"inner_pairs_{held}" / "insert" / "agreement.npy")
    assert len(agreement) == 12  # twice the 6 pairs it keeps


def test_a_cached_draw_of_another_insertion_version_is_not_served(cohort, tmp_path):
    """A work folder's pairs of an inserting method are kept under the insertion's version: pairs drawn
    by an older recipe (``pairs.npy``, version 1) are never served as this version's."""
    from efficacy.crossval import fold_pairs
    from efficacy.segmenter import PatientSplit
    from models.insert import INSERT_VERSION

    assert INSERT_VERSION > 1  # else the two paths coincide and there is nothing to test
    ids = sorted(c.case_id for c in cohort.slices.cases)
    cfg = CVConfig(segmenter=TINY_UNET, n_synthetic=4)
    fold = fold_data(cohort, PatientSplit(tuple(ids[:3]), (ids[3],)), 0, cfg)
    stale = pairs_path(tmp_path, "insert", version=1)
    stale.parent.mkdir(parents=True)
    np.save(stale, np.full((8, 2, 32, 32), 7.0, np.float32))  # a longer draw: it would serve n = 4
    pairs = fold_pairs("insert", 4, fold, cfg, tmp_path)
    assert pairs.shape == (4, 2, 32, 32) and not np.any(pairs == 7.0)
    assert pairs_path(tmp_path, "insert") == tmp_path / "insert" / f"pairs-v{INSERT_VERSION}.npy"
    np.testing.assert_array_equal(np.load(pairs_path(tmp_path, "insert")), pairs)
    assert pairs_path(tmp_path, "vae") == tmp_path / "vae" / "pairs.npy"  # a generator without versions


def test_dhvae_tumours_are_pasted_where_their_real_twin_pastes(cohort, tmp_path):
    """``insert_healthy_dhvae`` pastes the fold's dHVAE tumours into its tumour-free slices only, as
    ``insert_healthy`` pastes real ones; ``insert_dhvae`` into any slice, as ``insert``. The dHVAE's
    pairs are taken from the work folder's cache, so no generator is fitted here."""
    from efficacy.crossval import fold_pairs
    from efficacy.segmenter import PatientSplit
    from models.insert import INSERT_VERSION, InsertConfig, insert_pairs, recipient_slices

    ids = sorted(c.case_id for c in cohort.slices.cases)
    cfg = CVConfig(segmenter=TINY_UNET, n_synthetic=6)
    fold = fold_data(cohort, PatientSplit(tuple(ids[:3]), (ids[3],)), 0, cfg)
    pool = fold.real_pool[fold.real_pool[:, 1].any(axis=(1, 2))]  # the fold's real tumour slices
    donors = np.concatenate([pool] * (-(-6 // len(pool))))[:6]  # stand-ins for the dHVAE's pairs
    cached = pairs_path(tmp_path, "dhvae")
    cached.parent.mkdir(parents=True)
    np.save(cached, donors)
    for method, recipients in (("insert_healthy_dhvae", "tumour_free"), ("insert_dhvae", "any")):
        pairs = fold_pairs(method, 6, fold, cfg, tmp_path)
        where = recipient_slices(fold.train_cases, InsertConfig(recipients=recipients))
        np.testing.assert_array_equal(pairs, insert_pairs(donors, where, 6, seed=cfg.sample_seed))
        assert (tmp_path / method / f"pairs-v{INSERT_VERSION}.npy").is_file()  # cached by version
        assert set(np.unique(pairs[:, 1])) <= {0.0, 1.0} and pairs[:, 1].any(axis=(1, 2)).all()
    assert ARMS["insert_healthy_dhvae"].real_donor_twin() == "insert_healthy"
    assert ARMS["insert_healthy_dhvae"].inserts


def test_a_probe_report_restores_the_arms_curves_whose_settings_still_hold(tmp_path):
    """A new machine probes only the arms it adds: the committed report's curves are written where
    cached_inner_curve reads them, unless the arm's settings changed since (or it is the reference's)."""
    curve = [[100, 0.5], [200, 0.6]]
    rows = [
        {"fold": 0, "held_out": "p1", "arm": a, "curve": curve}
        for a in (REFERENCE, "insert", "insert_online")
    ]
    settings = {a: ARMS[a].settings() for a in (REFERENCE, "insert", "insert_online")}
    del settings["insert"]["insert_match"]  # a setting added after the report, at its default: still valid
    settings["insert_online"]["online_insert"] = 0.9  # not the recipe the arm has now
    restored = restore_arm_curves({"rows": rows, "arms": settings}, tmp_path)
    assert restored == ["insert@p1"]
    assert json.loads(inner_curve_path(tmp_path / "fold0", "p1", "insert").read_text()) == curve
    assert not inner_curve_path(tmp_path / "fold0", "p1", "insert_online").exists()
    assert not inner_curve_path(
        tmp_path / "fold0", "p1", REFERENCE
    ).exists()  # the budget's: cv.py restores it
    assert restore_arm_curves({"rows": rows, "arms": settings}, tmp_path) == []  # nothing written twice


def test_the_post_processing_rule_keeps_the_largest_component_only_when_it_raises_the_3d_dice():
    raises = [{"dice_3d": 0.6, "dice_3d_lcc": 0.7}, {"dice_3d": 0.8, "dice_3d_lcc": 0.75}]
    assert postprocess_choice(raises) == pytest.approx(
        {"dice_3d": 0.7, "dice_3d_lcc": 0.725, "largest_component": True}
    )
    assert not postprocess_choice([{"dice_3d": 0.6, "dice_3d_lcc": 0.6}])["largest_component"]  # a tie
    assert not postprocess_choice([{"dice_3d": 0.6, "dice_3d_lcc": 0.5}])["largest_component"]


def test_the_post_processing_is_chosen_on_the_held_out_training_patients(cohort, tmp_path, monkeypatch):
    """The strong baseline at the budget, on each held-out training patient: the test patient is never
    segmented, the run is the one the budget's curve had at that step, and the choice is cached."""
    from efficacy.segmenter import PatientSplit

    ids = sorted(c.case_id for c in cohort.slices.cases)
    cfg = CVConfig(inner_patients=2, max_steps=4, eval_every=2, segmenter=TINY_UNET)
    fold = fold_data(cohort, PatientSplit(tuple(ids[:3]), (ids[3],)), 0, cfg)
    budget = choose_budget(cohort, fold, cfg, tmp_path)
    segmented = []
    real_evaluate = crossval.evaluate_segmenter

    def spy(model, cases, **kw):
        segmented.extend(c.case_id for c in cases)
        return real_evaluate(model, cases, **kw)

    monkeypatch.setattr("efficacy.crossval.evaluate_segmenter", spy)
    calls = []
    chosen = choose_postprocessing(cohort, fold, cfg, tmp_path, budget, on_inner_run=lambda: calls.append(1))
    held = budget["validation_patients"]
    assert segmented == held and ids[3] not in segmented and len(calls) == 2
    assert list(chosen["held_out"]) == held and chosen["steps"] == budget["steps"]
    for m in chosen["held_out"].values():
        assert m["dice_slice"] == m["curve_dice_slice"]  # the curve's model at the budget, reproduced
        assert {"dice_3d", "dice_3d_lcc", "fp_volume_lcc"} <= set(m)
    assert chosen["largest_component"] == (chosen["dice_3d_lcc"] > chosen["dice_3d"])

    def no_training(*a, **k):
        raise AssertionError("a cached choice was trained again")

    monkeypatch.setattr("efficacy.crossval.train_segmenter", no_training)
    assert choose_postprocessing(cohort, fold, cfg, tmp_path, budget) == chosen
    (tmp_path / "postprocess.json").unlink()  # stopped after both held-out runs: they resume from cache
    assert postprocess_path(tmp_path, held[0]).is_file()
    assert choose_postprocessing(cohort, fold, cfg, tmp_path, budget) == chosen


def test_the_report_pairs_the_3d_dice_each_fold_post_processed_as_chosen():
    rows = []
    for fold, cases in ((0, ["a", "b"]), (1, ["c", "d"])):
        for arm, lcc in ((REFERENCE, 0.0), ("insert", 0.1)):
            r = _row(fold, arm, 0, 0.70, [(c, 0.0) for c in cases])
            for m in (r, *r["per_case"]):
                m |= {"dice_3d_lcc": m["dice_3d"] + lcc, "hd95_lcc": 1.0, "fp_volume_lcc": 0.0}
            rows.append(r)
    held_out = {
        0: {"a": {"dice_3d": 0.5, "dice_3d_lcc": 0.6}},
        1: {"c": {"dice_3d": 0.6, "dice_3d_lcc": 0.55}},
    }
    chose = {
        i: {"fold": i, **postprocess_choice(h.values()), "held_out": h, "steps": 4}
        for i, h in held_out.items()
    }
    assert [c["largest_component"] for c in chose.values()] == [True, False]
    cfg = CVConfig(arms=(REFERENCE, "insert"), seeds=(0,), folds=2)
    report = summarise(rows, cfg, chose)
    g = report["gains"]["insert"][POST_METRIC]
    assert g["mean_run_gain"] == pytest.approx(0.05)  # +0.1 on the fold that keeps it, 0 on the other
    assert POST_METRIC not in report["rows"][0]  # the report's rows stay as they ran
    # both folds' held-out patients together: 0.55 without, 0.575 with
    assert report["recommendation"]["postprocess"] == "largest_component"
    assert "keep the largest 3D connected component" in report["recommendation"]["words"]
    for c in chose.values():
        for m in c["held_out"].values():
            m |= {"dice_slice": 0.7, "curve_dice_slice": 0.7}
    split = {"train": ["b"], "test": ["a"], "tumour_slices": 8, "real_pool": 10}
    report["folds"] = [{"fold": i, **split, "postprocess": c} for i, c in chose.items()]
    assert "post-processed as chosen" in crossval_markdown(report)
    assert POST_METRIC not in summarise(rows, cfg)["gains"]["insert"]  # no choice made: no such gain


def test_each_dhvae_donor_arm_is_paired_with_its_real_donor_twin():
    """The generator's question: a dHVAE-donor arm against the arm that pastes real tumours, all else equal."""
    assert crossval.ARMS["insert_online_tumour_dhvae"].real_donor_twin() == "insert_online_tumour"
    assert crossval.ARMS["insert_online_tumour_dhvae_lcc"].real_donor_twin() == "insert_online_tumour"
    assert crossval.ARMS["insert_dhvae"].real_donor_twin() == "insert"
    assert crossval.ARMS["insert_online_tumour"].real_donor_twin() is None
    assert crossval.ARMS["dhvae"].real_donor_twin() is None
    rows = []
    for fold, cases in ((0, ["a", "b"]), (1, ["c", "d"])):
        for arm, dice, fp_ml in (
            (REFERENCE, 0.70, 0.0),
            ("insert_online_tumour", 0.74, 4.0),
            ("insert_online_tumour_dhvae", 0.72, 1.5),
        ):
            rows.append(_row(fold, arm, 0, dice, [(c, 0.0) for c in cases]))
            for m in (rows[-1], *rows[-1]["per_case"]):
                m["fp_volume"] = fp_ml
    cfg = CVConfig(
        arms=(REFERENCE, "insert_online_tumour", "insert_online_tumour_dhvae"), seeds=(0,), folds=2
    )
    report = summarise(rows, cfg)
    g = report["donor_gains"]["insert_online_tumour_dhvae"]
    assert g["against"] == "insert_online_tumour" and g["dice_slice"]["runs"] == 2
    assert g["dice_slice"]["mean_patient_gain"] == pytest.approx(-0.02)  # 0.72 - 0.74, not - 0.70
    over_baseline = report["gains"]["insert_online_tumour_dhvae"]["dice_slice"]
    assert over_baseline["mean_patient_gain"] == pytest.approx(0.02)
    assert list(report["donor_gains"]) == ["insert_online_tumour_dhvae"]  # no twin, no row
    # every metric of the pair, HD95 in mm and the false-positive volume in ml rather than points; no
    # post-processing chosen
    assert (
        "| insert_online_tumour_dhvae | insert_online_tumour | 2 | 4 | -2.0 | [-2.0, -2.0] | -2.0 | [-2.0, -2.0] "
        "| n/a | n/a | +0.0 | [+0.0, +0.0] | -2.5 | [-2.5, -2.5] |"
    ) in crossval_markdown(report)
    alone = CVConfig(arms=(REFERENCE, "insert_online_tumour_dhvae"), seeds=(0,), folds=2)
    assert summarise(rows, alone)["donor_gains"] == {}  # its twin did not run: nothing to pair
    assert "dHVAE-generated tumours over real ones" not in crossval_markdown(summarise(rows, alone))


def test_an_online_insertion_with_dhvae_donors_pastes_tumours_of_a_dhvae_fitted_on_the_inner_patients(
    cohort, tmp_path, monkeypatch
):
    """``insert_online_tumour_dhvae``: the loader pastes tumours cut from pairs of a dHVAE fitted on the
    training patients the curve trains on (never the held-out one), drawn once and cached; the real
    copy-paste arms keep the fold's real tumour slices, and an arm that pastes nothing has no donors."""
    from efficacy.crossval import DHVAE_DONORS, cached_inner_curve, online_donors
    from efficacy.segmenter import PatientSplit
    from models.insert import OnlineInsert

    ids = sorted(c.case_id for c in cohort.slices.cases)
    cfg = CVConfig(max_steps=2, eval_every=2, segmenter=TINY_UNET)
    fold = fold_data(cohort, PatientSplit(tuple(ids[:3]), (ids[3],)), 0, cfg)
    held = ids[0]
    fitted_on: list[tuple[str, ...]] = []

    def fake_dhvae(method, data, ecfg, work_dir, **kw):  # the fold's tumour slices, marked
        fitted_on.append(tuple(data.split.train))
        assert method == "dhvae" and ecfg.n_synthetic == (DHVAE_DONORS,)
        pairs = np.resize(data.real_train, (DHVAE_DONORS, *data.real_train.shape[1:])).copy()
        pairs[:, 0] = np.where(pairs[:, 1] > 0.5, 0.123, pairs[:, 0])
        pairs_path(work_dir, method).parent.mkdir(parents=True, exist_ok=True)
        np.save(pairs_path(work_dir, method), pairs)  # where synthetic_pairs caches its draw
        return pairs

    donors_seen: list[np.ndarray] = []

    def spy_training(pool, *, online, **kw):
        donors_seen.append(next(t for t in online if isinstance(t, OnlineInsert)).donors)
        return train_segmenter(pool, online=online, **kw)

    monkeypatch.setattr("efficacy.crossval.synthetic_pairs", fake_dhvae)
    monkeypatch.setattr("efficacy.crossval.train_segmenter", spy_training)
    arm = cfg.arm("insert_online_tumour_dhvae")
    assert (arm.online_recipients, arm.online_insert) == (
        "tumour",
        ARMS["insert_online_tumour"].online_insert,
    )
    curve = cached_inner_curve(cohort, fold, arm, held, cfg, tmp_path)
    assert [s for s, _ in curve] == [2]
    assert fitted_on == [tuple(ids[1:3])]  # neither the held-out nor the test patient
    (donors,) = donors_seen
    assert len(donors) and np.all(donors[:, 0][donors[:, 1] > 0.5] == np.float32(0.123))
    # the draw is cached in the held-out patient's pair folder: a second call fits nothing
    inner = crossval.inner_fold(cohort, fold, held, cfg)
    again = online_donors(arm, inner, cfg, tmp_path / f"inner_pairs_{held}")
    assert fitted_on == [tuple(ids[1:3])] and len(again) == DHVAE_DONORS
    # the _lcc arm cuts each generated mask to its largest component: a speck far from the tumour goes
    specked = np.load(pairs_path(tmp_path / f"inner_pairs_{held}", "dhvae"))
    specked[:, 1, 0, 0] = 1.0
    np.save(pairs_path(tmp_path / f"inner_pairs_{held}", "dhvae"), specked)
    kept = online_donors(
        cfg.arm("insert_online_tumour_dhvae_lcc"), inner, cfg, tmp_path / f"inner_pairs_{held}"
    )
    assert kept.dtype == np.float32 and np.all(kept[:, 1, 0, 0] == 0) and set(np.unique(kept[:, 1])) <= {0, 1}
    assert all(ndimage.label(m)[1] == 1 for m in kept[:, 1] if m.any())
    np.testing.assert_array_equal(kept[:, 0], specked[:, 0])  # the images are not touched
    assert "largest component" in cfg.arm("insert_online_tumour_dhvae_lcc").recipe()
    # the real copy-paste arms paste the fold's own tumour slices; the others paste nothing
    real = online_donors(cfg.arm("insert_online_tumour"), fold, cfg, None)
    np.testing.assert_array_equal(real, fold.data.real_train)
    assert online_donors(cfg.arm(REFERENCE), fold, cfg, None) is None
    with pytest.raises(DHVAEError, match="need a folder"):
        online_donors(arm, fold, cfg, None)
    with pytest.raises(DHVAEError, match="needs donors"):
        crossval.arm_training(arm, fold, None, budget=2, cfg=cfg)
    with pytest.raises(DHVAEError, match="online_insert > 0"):
        crossval.Arm("x", online_donors="dhvae")
    with pytest.raises(DHVAEError, match="online_insert > 0"):
        crossval.Arm("x", donor_largest_component=True)
