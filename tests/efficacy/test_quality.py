"""Quality of synthetic pairs: PSNR, SSIM, JS divergence, Frechet distances and memorisation against
hand-computed values."""

import math

import numpy as np
import pytest

from efficacy.quality import (
    cross_patient_distances,
    frechet_distance,
    frechet_distance_from_features,
    frechet_vgg16_distance,
    js_divergence,
    mask_area_js,
    memorisation,
    nearest_neighbours,
    psnr,
    quality_metrics,
    ssim,
)
from models.perceptual import default_weights_path
from tests.efficacy.toys import toy_pairs


def test_psnr_ssim_hand_computed():
    x = np.zeros((2, 16, 16))
    y = np.full((2, 16, 16), 0.1)  # MSE 0.01 -> 10 log10(1 / 0.01) = 20 dB
    np.testing.assert_allclose(psnr(x, y), [20.0, 20.0])
    assert np.isinf(psnr(y, y)).all()
    img = toy_pairs(2)[:, 0]
    np.testing.assert_allclose(ssim(img, img), [1.0, 1.0], atol=1e-5)
    assert (ssim(img, img[::-1]) < 0.9).all()


def test_js_divergence_hand_computed():
    assert js_divergence([1, 0], [0, 1]) == pytest.approx(1.0)
    assert js_divergence([3, 1], [6, 2]) == pytest.approx(0.0)  # normalised first
    # p = (.5, .5), q = (1, 0), m = (.75, .25): 0.5 [.5 log2(2/3) + .5 log2 2] + 0.5 log2(4/3)
    expected = 0.5 * (0.5 * math.log2(2 / 3) + 0.5) + 0.5 * math.log2(4 / 3)
    assert js_divergence([0.5, 0.5], [1, 0]) == pytest.approx(expected)
    masks = toy_pairs(5)[:, 1]
    assert mask_area_js(masks, masks) == pytest.approx(0.0)
    small, large = np.zeros((3, 32, 32)), np.zeros((3, 32, 32))
    small[:, :5, :5] = 1  # 25 px
    large[:, :20, :20] = 1  # 400 px
    assert mask_area_js(small, large) == pytest.approx(1.0)


def test_frechet_distance_identical_and_shifted_gaussians():
    rng = np.random.default_rng(0)
    d = 4
    a = rng.standard_normal((500, d))
    assert frechet_distance_from_features(a, a) == pytest.approx(0.0, abs=1e-6)
    shift = np.array([1.0, -2.0, 0.5, 0.0])
    # analytic: N(0, I) vs N(shift, 4 I): ||shift||^2 + tr(I + 4I - 2 * 2I) = 5.25 + d
    assert frechet_distance(np.zeros(d), np.eye(d), shift, 4 * np.eye(d)) == pytest.approx(5.25 + d)
    cov = np.array([[2.0, 0.5, 0, 0], [0.5, 1.0, 0, 0], [0, 0, 1.0, 0], [0, 0, 0, 3.0]])
    # equal covariances: ||shift||^2
    assert frechet_distance(np.zeros(d), cov, shift, cov) == pytest.approx(5.25)
    # from samples: a shifted copy of a set is at exactly ||shift||^2
    assert frechet_distance_from_features(a, a + shift) == pytest.approx(5.25, rel=1e-6)
    # and independent large samples approach the analytic value
    b = 2.0 * rng.standard_normal((20000, d)) + shift
    big = rng.standard_normal((20000, d))
    assert frechet_distance_from_features(big, b) == pytest.approx(5.25 + d, rel=0.05)


@pytest.mark.skipif(
    not default_weights_path().is_file(), reason="VGG16/LPIPS weights not installed (make setup)"
)
def test_frechet_vgg16_distance_of_identical_sets_is_zero_and_quality_metrics():
    from models.perceptual import LPIPS

    net = LPIPS(in_channels=2, input_range="unit")
    real = toy_pairs(6, seed=1)
    assert frechet_vgg16_distance(real, real, net) == pytest.approx(0.0, abs=1e-3)
    noisy = np.clip(real + 0.3 * np.random.default_rng(0).random(real.shape), 0, 1).astype(np.float32)
    assert frechet_vgg16_distance(real, noisy, net) > 1e-3
    q = quality_metrics(real[:3], real[3:], real, net=net)
    assert set(q) >= {"psnr_db", "ssim", "lpips", "frechet_vgg16", "mask_area_js_bits", "memorisation"}
    assert q["memorisation"]["fraction_near_copies"] == 1.0  # the "synthetic" pairs are training slices


def test_memorisation_and_nearest_neighbours():
    train = toy_pairs(5, seed=2)
    copy = train[[3]].copy()
    copy[:, 0] += 0.001  # a near-copy of training slice 3
    fresh = toy_pairs(1, seed=99)
    idx, dist = nearest_neighbours(copy[:, 0], train[:, 0])
    assert idx.tolist() == [3] and dist[0] == pytest.approx(0.001)  # RMS pixel difference
    rep = memorisation(np.concatenate([copy, fresh]), train, threshold=0.02)
    assert rep.fraction_near_copies == 0.5 and rep.nearest_index[0] == 3
    q = quality_metrics(fresh, train, train, include_vgg=False)
    assert q["memorisation"]["fraction_near_copies"] == 0.0 and math.isfinite(q["psnr_db"])


def test_cross_patient_reference_distance_ignores_same_patient():
    base = np.zeros((4, 8, 8))
    base[1] = 0.001  # patient "a": two nearly identical slices (0 and 1)
    base[2] = 0.5  # patient "b": far from both of "a"
    base[3] = 0.6
    ids = ["a", "a", "b", "b"]
    np.testing.assert_allclose(cross_patient_distances(base, ids), [0.5, 0.499, 0.499, 0.599])
    pairs = np.stack([base, np.zeros_like(base)], 1)
    rep = memorisation(pairs[:1], pairs, train_case_ids=ids)
    assert rep.reference_median == pytest.approx(0.4995) and rep.fraction_near_copies == 1.0


# --- the downstream U-Net -------------------------------------------------------------------------
