"""bench/efficacy/bootstrap_check.py: how firm a cross-validation's "helps" is under the bootstrap's seed."""

import importlib.util
import sys
from pathlib import Path

import pytest

from efficacy.crossval import POST_METRIC, REFERENCE

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bootstrap_check():
    sys.path.insert(0, str(REPO / "bench"))
    spec = importlib.util.spec_from_file_location(
        "bootstrap_check", REPO / "bench/efficacy/bootstrap_check.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


METRICS = ("dice_slice", "dice_3d", "dice_3d_lcc")


def _report(gains_by_arm):
    """Two folds of two test patients, one seed; per patient a Dice of 0.7 + its gain in every metric."""
    rows = [
        {"fold": fold, "arm": arm, "seed": 0, **dict.fromkeys(METRICS, 0.7)}
        | {"per_case": [{"case_id": p, **dict.fromkeys(METRICS, 0.7 + gains[p])} for p in patients]}
        for fold, patients in ((0, "ab"), (1, "cd"))
        for arm, gains in gains_by_arm.items()
    ]
    return {
        "arms": dict.fromkeys(gains_by_arm),
        "config": {"bootstrap": 500, "folds": 2},
        "folds": [{"fold": f, "postprocess": {"largest_component": True}} for f in (0, 1)],
        "rows": rows,
    }


def test_a_clear_gain_is_firm_and_a_gain_carried_by_one_patient_is_not(bootstrap_check):
    report = _report(
        {
            REFERENCE: dict.fromkeys("abcd", 0.0),
            "insert": {"a": 0.03, "b": 0.05, "c": 0.04, "d": 0.06},  # every patient gains
            "insert_healthy": {"a": -0.01, "b": -0.01, "c": 0.0, "d": 0.2},  # one patient carries it
        }
    )
    checks = {(c["arm"], c["metric"]): c for c in bootstrap_check.check(report, seeds=5, resamples=20_000)}
    assert set(checks) == {(a, m) for a in ("insert", "insert_healthy") for m in ("dice_slice", POST_METRIC)}
    firm = checks[("insert", "dice_slice")]
    assert firm["helps"] and firm["fine_helps"] and firm["lower_above_0"] == 5
    assert firm["gain_points"] == pytest.approx(4.5) and firm["runs"] == 2
    # the same rows in a grid of 3 folds, one not run yet: an interval above 0, but no verdict on the cohort
    partial = bootstrap_check.check(
        report | {"config": {"bootstrap": 500, "folds": 3}}, seeds=5, resamples=20_000
    )
    unrun = next(c for c in partial if (c["arm"], c["metric"]) == ("insert", "dice_slice"))
    assert unrun["lower_above_0"] == 5 and not unrun["helps"] and not unrun["fine_helps"]
    # and its cells say so in the report's own words, not a bare "no" beside an interval above 0
    said = bootstrap_check.markdown(
        {"source": "x.json", "bootstrap_seeds": 5, "resamples_report": 500, "resamples_fine": 20_000}
        | {"checks": [unrun]}
    )
    assert said.count("| not yet (fold 2 unpaired) |") == 2 and "| no |" not in said
    loose = checks[("insert_healthy", POST_METRIC)]
    assert not loose["fine_helps"] and loose["lower_above_0"] == 0 and loose["lower_range_points"][0] < 0
    text = bootstrap_check.markdown(
        {"source": "x.json", "bootstrap_seeds": 5, "resamples_report": 500, "resamples_fine": 20_000}
        | {"checks": list(checks.values())}
    )
    assert "| insert | dice_slice | 2 | +4.5 |" in text and "| lower > 0, of 5 seeds |" in text
