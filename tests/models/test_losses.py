"""Loss terms against hand-computed values, and the two adaptive-weight modes against each other."""

import math

import pytest
import torch

from models import losses
from models.config import get_preset
from models.registry import build_model


def test_log_bernoulli_matches_hand_value():
    logits = torch.tensor([[[[0.0, 2.0]], [[-1.0, 0.5]]]])  # (1, 2, 1, 2)
    x = torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]]]])
    p = torch.sigmoid(logits)
    hand = sum(
        math.log(v)
        for v in [
            p[0, 0, 0, 0].item(),
            1 - p[0, 0, 0, 1].item(),
            1 - p[0, 1, 0, 0].item(),
            p[0, 1, 0, 1].item(),
        ]
    )
    assert losses.log_bernoulli(logits, x).item() == pytest.approx(hand, rel=1e-6)


def test_log_standard_normal():
    v = torch.tensor([[1.0, -2.0]])
    hand = -0.5 * (1 + 4) - math.log(2 * math.pi)
    assert losses.log_standard_normal(v).item() == pytest.approx(hand)


def test_hvae_loss_hand_value():
    logits = torch.zeros(1, 2, 1, 1)  # p = 0.5 everywhere: log p(x|z) = 2 log 0.5
    x = torch.ones(1, 2, 1, 1)
    z, rho, e0 = torch.tensor([[1.0]]), torch.tensor([[2.0]]), torch.tensor([[0.5]])
    logvar = torch.tensor([[0.4]])
    c = -0.5 * math.log(2 * math.pi)
    elbo = 2 * math.log(0.5) + (c - 0.5) + (c - 2.0) - (c - 0.125) + 0.2
    assert losses.hvae_loss(logits, x, z, rho, e0, logvar).item() == pytest.approx(-elbo, rel=1e-6)


def test_vae_loss_kl_zero_at_prior():
    logits, x = torch.zeros(2, 2, 2, 2), torch.ones(2, 2, 2, 2)
    val = losses.vae_loss(logits, x, torch.zeros(2, 5), torch.zeros(2, 5)).item()
    assert val == pytest.approx(8 * math.log(2))


def test_reconstruction_loss_broadcasts_perceptual_over_pixels():
    x, x_hat = torch.zeros(2, 2, 4, 4), torch.full((2, 2, 4, 4), 0.25)
    assert losses.reconstruction_loss(x, x_hat).item() == pytest.approx(0.25 * 32)
    lp = lambda xh: torch.full((2, 1, 1, 1), 0.1)  # noqa: E731
    assert losses.reconstruction_loss(x, x_hat, lp, 2.0).item() == pytest.approx((0.25 + 0.2) * 32)


def test_hinge_losses():
    real, fake = torch.tensor([2.0, 0.0]), torch.tensor([-2.0, 0.5])
    # relu(1-2)=0, relu(1-0)=1 -> mean .5 ; relu(1-2)=0, relu(1+.5)=1.5 -> mean .75
    assert losses.discriminator_hinge_loss(real, fake).item() == pytest.approx(0.5 * (0.5 + 0.75))
    assert losses.generator_hinge_loss(fake).item() == pytest.approx(0.75)


def test_adaptive_weight_is_norm_ratio_and_clamped():
    w = torch.tensor([1.0, 2.0], requires_grad=True)
    rec = (3.0 * w).sum()  # grad (3,3), norm 3 sqrt 2
    g = (w * torch.tensor([1.0, 0.0])).sum()  # grad (1,0), norm 1
    lam = losses.adaptive_weight(rec, g, w)
    assert lam.item() == pytest.approx(3 * math.sqrt(2) / (1 + 1e-4), rel=1e-6)
    assert not lam.requires_grad
    assert losses.adaptive_weight(rec * 1e9, g, w).item() == pytest.approx(1e4)


def test_lsgan_losses():
    assert losses.lsgan_generator_loss(torch.tensor([1.0, 3.0])).item() == pytest.approx(0.5 * 2.0)
    assert losses.lsgan_discriminator_loss(torch.tensor([1.0]), torch.tensor([2.0])).item() == pytest.approx(
        2.0
    )


def _lambda(mode: str) -> float:
    torch.manual_seed(0)
    cfg = get_preset("tiny").replace(
        **{
            "loss.adaptive_weight": mode,
            "loss.disc_start": 0,
            "loss.adaptive_weight_max": 1e12,
            "network.image_size": 64,
        }
    )
    model = build_model(cfg)
    x = torch.rand(2, 2, 64, 64)
    out = model.training_losses(x, step=0, rng=torch.Generator().manual_seed(1))
    return out.metrics["lambda"]


def test_final_decode_adaptive_weight_close_to_full():
    """The final-decode shortcut is the same norm ratio with z_K held fixed; with eps = 1e-3 the
    leapfrog decodes barely move z, so the two agree closely (both sides measured, not assumed)."""
    full, final = _lambda("full"), _lambda("final_decode")
    assert final == pytest.approx(full, rel=0.05)
