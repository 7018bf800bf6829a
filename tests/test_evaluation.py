"""Downstream evaluation and quality metrics: metric functions against hand-computed values, the patient-level
split never leaking, a tiny U-Net trained a few steps and evaluated on volumes."""

import math
from dataclasses import dataclass, replace

import numpy as np
import pytest
import torch

from models.errors import DHVAEError
from models.evaluation import (
    SegmenterConfig,
    cross_patient_distances,
    dice_score,
    evaluate_segmenter,
    frechet_distance,
    frechet_distance_from_features,
    frechet_vgg16_distance,
    hd95,
    js_divergence,
    mask_area_js,
    memorisation,
    nearest_neighbours,
    patient_split,
    predict_slices,
    psnr,
    quality_metrics,
    run_downstream,
    segment_volume,
    soft_dice,
    ssim,
    step_matched_steps,
    summarize,
    train_segmenter,
    training_steps,
)
from models.perceptual import default_weights_path

SIZE = 32


def toy_pairs(n: int, seed: int = 0, size: int = SIZE) -> np.ndarray:
    """Bright discs with their mask: (n, 2, size, size) float32 in [0, 1]."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    out = np.zeros((n, 2, size, size), np.float32)
    for i in range(n):
        cy, cx = rng.uniform(0.3, 0.7, 2) * size
        r = rng.uniform(0.1, 0.2) * size
        disc = ((yy - cy) ** 2 + (xx - cx) ** 2 < r * r).astype(np.float32)
        out[i, 0] = 0.2 + 0.6 * disc + 0.05 * rng.random((size, size))
        out[i, 1] = disc
    return out


@dataclass
class Case:
    case_id: str
    image: np.ndarray  # (H, W, D)
    mask: np.ndarray
    affine: np.ndarray | None = None


def toy_case(case_id: str, seed: int, depth: int = 4) -> Case:
    pairs = toy_pairs(depth, seed)
    pairs[0, 1] = 0  # one slice without tumour: excluded from dice_slice
    return Case(
        case_id, np.moveaxis(pairs[:, 0], 0, -1).copy(), np.moveaxis(pairs[:, 1], 0, -1).astype(np.uint8)
    )


TINY_UNET = SegmenterConfig(channels=(4, 8), strides=(2,), num_res_units=0, batch_size=4, epochs=1)


# --- segmentation metrics -------------------------------------------------------------------------


def test_soft_dice_hand_computed_and_matches_monai_loss():
    prob = np.array([[[0.5, 0.5], [0.0, 0.0]], [[1.0, 0.0], [0.0, 0.0]]])
    target = np.array([[[1, 0], [0, 0]], [[1, 0], [0, 0]]])
    # slice 0: 2 * 0.5 / (1 + 1) = 0.5; slice 1: perfect
    np.testing.assert_allclose(soft_dice(prob, target), [0.5, 1.0], atol=1e-5)
    from monai.losses import DiceLoss

    logits = torch.randn(3, 1, 8, 8)
    t = (torch.rand(3, 1, 8, 8) > 0.5).float()
    monai_dice = 1 - DiceLoss(sigmoid=True, reduction="none")(logits, t).flatten()
    np.testing.assert_allclose(
        soft_dice(torch.sigmoid(logits)[:, 0].numpy(), t[:, 0].numpy()), monai_dice.numpy(), rtol=1e-5
    )


def test_hard_dice_hand_computed():
    p = np.zeros((4, 4, 2), bool)
    t = np.zeros((4, 4, 2), bool)
    p[0, 0:3, 0] = True  # 3 voxels
    t[0, 1:4, 0] = True  # 3 voxels, 2 shared
    assert dice_score(p, t) == pytest.approx(4 / 6)
    assert dice_score(np.zeros(5), np.zeros(5)) == 1.0
    assert dice_score(p, np.zeros_like(t)) == 0.0


def test_hd95_hand_computed_and_empty_conventions():
    t = np.zeros((12, 12, 6), bool)
    t[3:7, 3:7, 2:4] = True
    p = np.roll(t, 1, axis=0)  # the same block, one voxel further along x
    assert hd95(p, t) == pytest.approx(1.0)
    assert hd95(p, t, spacing=(2.0, 1.0, 1.0)) == pytest.approx(2.0)  # mm: 2 mm voxels along x
    assert hd95(t, t) == 0.0
    assert hd95(np.zeros_like(t), np.zeros_like(t)) == 0.0
    diagonal = math.sqrt(12**2 + 12**2 + 6**2)
    assert hd95(np.zeros_like(t), t) == pytest.approx(diagonal)  # missed tumour: worst case
    assert hd95(t, np.zeros_like(t)) == pytest.approx(diagonal)


def test_summarize_t_interval():
    s = summarize([1.0, 2.0, 3.0])
    half = 4.302652729911275 / math.sqrt(3)  # t_{0.975, 2} * std(=1) / sqrt(3)
    assert s["mean"] == 2.0 and s["std"] == pytest.approx(1.0) and s["n"] == 3
    assert s["ci_low"] == pytest.approx(2.0 - half) and s["ci_high"] == pytest.approx(2.0 + half)
    one = summarize([0.7])
    assert one["mean"] == 0.7 and math.isnan(one["std"])


# --- patient split --------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_patient_split_never_leaks(seed):
    patients = [f"p{i:02d}" for i in range(13)]
    slice_ids = [p for p in patients for _ in range(3)]  # three slices per patient
    split = patient_split(slice_ids, seed=seed, test_fraction=0.3)
    assert not set(split.train) & set(split.test)
    assert set(split.train) | set(split.test) == set(patients)
    assert len(split.test) == 4
    tr, te = split.slice_indices(slice_ids, "train"), split.slice_indices(slice_ids, "test")
    assert not {slice_ids[i] for i in tr} & {slice_ids[i] for i in te}
    assert len(tr) + len(te) == len(slice_ids)
    assert patient_split(slice_ids, seed=seed, test_fraction=0.3) == split  # seeded
    paper = patient_split(patients, seed=seed, n_train=3, n_test=5)  # the paper: 10 train, 30 test
    assert len(paper.train) == 3 and len(paper.test) == 5 and not set(paper.train) & set(paper.test)


def test_patient_split_errors():
    with pytest.raises(DHVAEError, match="at least one patient"):
        patient_split(["a", "a", "a"], seed=0, test_fraction=0.5)
    with pytest.raises(DHVAEError):
        patient_split(["a", "b"], seed=0, n_train=2, n_test=1)
    with pytest.raises(ValueError, match="either"):
        patient_split(["a", "b"], seed=0)


# --- quality metrics ------------------------------------------------------------------------------


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


def test_training_length_protocols():
    cfg = SegmenterConfig()
    assert step_matched_steps(100, 2000, cfg) == 40 * (2100 // 32)  # the last partial batch dropped
    assert training_steps(100, cfg, "fixed_epochs", None) == 40 * 3
    keep = replace(cfg, drop_last=False)
    assert step_matched_steps(100, 2000, keep) == 40 * math.ceil(2100 / 32)
    assert training_steps(100, keep, "fixed_epochs", None) == 40 * 4
    assert training_steps(10, cfg, "fixed_epochs", None) == 40  # fewer slices than a batch: one batch
    assert training_steps(100, cfg, "step_matched", 999) == 999
    with pytest.raises(ValueError, match="budget"):
        training_steps(100, cfg, "step_matched", None)


def test_authors_optimiser_learns_where_plain_rmsprop_barely_moves():
    """RMSprop lr 1e-4 without the authors' momentum 0.999 leaves the U-Net near its start (the bug that
    made the efficacy pilot's real-only baseline score 0.09); with it the same steps fit the discs."""
    data = toy_pairs(16, seed=3)
    cfg = replace(TINY_UNET, batch_size=8, epochs=40)

    def train_dice(c: SegmenterConfig) -> float:
        model = train_segmenter(data, seed=0, cfg=c)
        return float(soft_dice(predict_slices(model, data[:, 0]), data[:, 1]).mean())

    authors, plain = train_dice(cfg), train_dice(replace(cfg, momentum=0.0))
    assert authors > 0.45 and authors > plain + 0.25, (authors, plain)  # measured: 0.57 vs 0.18


class Thresholder(torch.nn.Module):
    """A stand-in segmenter: logit = 20 (x - 0.5), so the toy discs (0.8 on 0.2) come out near-binary."""

    def __init__(self):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # gives the module a device

    def forward(self, x):
        return 20 * (x - 0.5) + 0 * self.anchor


def test_dice_pooled_is_the_authors_batch_pooled_soft_dice():
    cases = [toy_case("a", 1), toy_case("b", 2)]
    res = evaluate_segmenter(Thresholder(), cases, pooled_batch=4)
    probs, masks = [], []
    for c in cases:
        keep = c.mask.reshape(-1, c.mask.shape[-1]).any(0)
        p = torch.sigmoid(20 * (torch.from_numpy(c.image[..., keep]) - 0.5)).numpy()
        probs.append(np.moveaxis(p, -1, 0))
        masks.append(np.moveaxis(c.mask[..., keep], -1, 0).astype(np.float64))
    p, t = np.concatenate(probs), np.concatenate(masks)  # 6 tumour slices: batches of 4 and 2
    want = np.mean(
        [2 * (p[i : i + 4] * t[i : i + 4]).sum() / (p[i : i + 4].sum() + t[i : i + 4].sum()) for i in (0, 4)]
    )
    assert res["dice_pooled"] == pytest.approx(want, rel=1e-4)
    assert res["dice_slice"] == pytest.approx(soft_dice(p, t).mean(), rel=1e-4)


def test_unet_trains_and_evaluate_returns_metrics():
    data = toy_pairs(6)
    losses: list[float] = []
    model = train_segmenter(data, seed=0, cfg=TINY_UNET, progress=lambda s, t, loss: losses.append(loss))
    assert len(losses) == 1  # fixed_epochs: 1 epoch of 6 // 4 batches (the partial one dropped)
    again = train_segmenter(data, seed=0, cfg=TINY_UNET)
    assert all(
        torch.equal(a, b)
        for a, b in zip(model.state_dict().values(), again.state_dict().values(), strict=True)
    )

    cases = [toy_case("a", 1), toy_case("b", 2)]
    cases[1].affine = np.diag([2.0, 2.0, 3.0, 1.0])
    prob = segment_volume(model, cases[0].image)
    assert prob.shape == cases[0].image.shape and 0 <= prob.min() and prob.max() <= 1
    res = evaluate_segmenter(model, cases)
    assert res["n_cases"] == 2 and res["n_tumour_slices"] == 6  # 3 tumour slices per case
    assert res["hd95_unit"] == "mixed"
    for key in ("dice_slice", "dice_3d"):
        assert 0.0 <= res[key] <= 1.0
    assert res["hd95"] >= 0.0 and [c["case_id"] for c in res["per_case"]] == ["a", "b"]

    row = run_downstream(
        data, toy_pairs(2, seed=5), cases, seed=1, cfg=TINY_UNET, protocol="step_matched", steps=3
    )
    assert (row["n_real"], row["n_synthetic"], row["steps"], row["protocol"]) == (6, 2, 3, "step_matched")
    assert {"dice_slice", "dice_3d", "hd95"} <= set(row)
