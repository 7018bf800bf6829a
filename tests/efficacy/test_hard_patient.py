"""bench/efficacy/hard_patient.py's measurement of one test patient: recall and precision, the predicted
volume, and slice Dice split at the training patients' largest tumour slice."""

import importlib.util
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def hard_patient():
    sys.path.insert(0, str(REPO / "bench"))
    spec = importlib.util.spec_from_file_location("hard_patient", REPO / "bench/efficacy/hard_patient.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Oracle(nn.Module):
    """Logits of +-20 where ``region`` (a function of the image) is true: a U-Net that draws exactly it."""

    def __init__(self, region):
        super().__init__()
        self.region, self.anchor = region, nn.Parameter(torch.zeros(()))

    def forward(self, x):
        return torch.where(self.region(x), 20.0, -20.0) + 0 * self.anchor


def case_with_two_tumour_sizes():
    """A 16 x 16 x 4 volume: slices 0-1 carry a 2 x 2 tumour (4 px), slices 2-3 a 4 x 4 one (16 px)."""
    image, mask = np.zeros((16, 16, 4), np.float32), np.zeros((16, 16, 4), np.uint8)
    mask[2:4, 2:4, :2] = 1
    mask[2:6, 2:6, 2:] = 1
    image[mask > 0] = 1.0
    return SimpleNamespace(case_id="p", image=image, mask=mask, affine=np.diag([2.0, 2.0, 2.5, 1.0]))


def test_a_perfect_prediction_scores_one_everywhere(hard_patient):
    case = case_with_two_tumour_sizes()
    out = hard_patient.measure_case(Oracle(lambda x: x > 0.5), case, train_max_px=8, threshold=0.5)
    assert out["recall"] == out["precision"] == out["recall_lcc"] == 1.0
    assert out["volume_ml"] == pytest.approx(40 * 10 / 1000) == out["predicted_volume_ml"]
    assert out["largest_slice_px"] == 16 and (out["slices_within"], out["slices_above"]) == (2, 2)
    assert out["dice_slice_within"] == pytest.approx(1.0, abs=1e-4)
    assert out["dice_slice_above"] == pytest.approx(1.0, abs=1e-4)


def test_a_prediction_that_misses_the_large_tumours_shows_in_recall_and_above(hard_patient):
    """Only the small tumours drawn (rows 2-3, columns 2-3 of every slice): the large tumours' slices are
    under-segmented, precision stays whole."""
    case = case_with_two_tumour_sizes()
    small = torch.zeros(16, 16, dtype=torch.bool)
    small[2:4, 2:4] = True
    out = hard_patient.measure_case(Oracle(lambda x: small.expand_as(x)), case, train_max_px=8, threshold=0.5)
    assert out["precision"] == 1.0 and out["recall"] == pytest.approx(16 / 40)
    assert out["predicted_volume_ml"] == pytest.approx(16 * 10 / 1000)
    assert out["dice_slice_within"] == pytest.approx(1.0, abs=1e-4)
    assert out["dice_slice_above"] == pytest.approx(2 * 4 / (4 + 16), abs=1e-4)
