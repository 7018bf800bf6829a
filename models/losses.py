"""Every loss term of the dHVAE, as pure functions with the equation each comes from (method.md).

Conventions: x and x_hat are (B, 2, H, W) in [0, 1] ([image, mask]); decoder outputs are *logits*
(B, 2, H, W) and x_hat = sigmoid(logits). Per-sample quantities are (B,) sums over all elements;
losses are means over the batch of those sums ("mean over batch of per-sample SUMS").
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

LOG_2PI = math.log(2.0 * math.pi)


# --- likelihood and densities ---------------------------------------------------------------------


def log_bernoulli(logits: Tensor, x: Tensor) -> Tensor:
    """log p(x|z) = -BCE(sigmoid(logits), x) summed over both channels and all pixels. (B,).

    Computed from logits (softplus form) rather than from probabilities: the same value where the
    authors' ``binary_cross_entropy`` is finite, and no clamping at log(0) = -100 inside the
    second-order graph of the leapfrog.
    """
    return -F.binary_cross_entropy_with_logits(logits, x, reduction="none").flatten(1).sum(1)


def log_standard_normal(v: Tensor) -> Tensor:
    """log N(v; 0, I) for v (B, D). (B,)."""
    return -0.5 * (v.pow(2).sum(1) + v.shape[1] * LOG_2PI)


def potential(logits: Tensor, x: Tensor, z: Tensor) -> Tensor:
    """U(z) = -log p(x|z) - log N(z; 0, I), the Hamiltonian's potential energy. (B,)."""
    return -(log_bernoulli(logits, x) + log_standard_normal(z))


# --- the variational objectives -------------------------------------------------------------------


def hvae_loss(logits_k: Tensor, x: Tensor, z_k: Tensor, rho_k: Tensor, e0: Tensor, logvar: Tensor) -> Tensor:
    """Negative HVAE ELBO (Caterini et al. 2018, eq. 9; method.md "Loss"), mean over the batch.

    -[ log p(x|z_K) + log N(z_K) + log N(rho_K) - log N(e0) + 0.5 * sum(logvar) ]
    The last two terms are -log q(z0|x) after the change of variables z0 = mu + sigma * e0.
    """
    elbo = (
        log_bernoulli(logits_k, x)
        + log_standard_normal(z_k)
        + log_standard_normal(rho_k)
        - log_standard_normal(e0)
        + 0.5 * logvar.sum(1)
    )
    return -elbo.mean()


def vae_loss(logits: Tensor, x: Tensor, mu: Tensor, logvar: Tensor) -> Tensor:
    """Plain negative ELBO with the analytic KL (the VAE baseline), mean over the batch."""
    kl = -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(1)
    return (-log_bernoulli(logits, x) + kl).mean()


# --- the discriminative regulariser ---------------------------------------------------------------


def reconstruction_loss(
    x: Tensor,
    x_hat: Tensor,
    perceptual: Callable[[Tensor], Tensor] | None = None,
    perceptual_weight: float = 1.0,
) -> Tensor:
    """L_rec = mean over batch of sum over (C, H, W) of |x - x_hat| + LPIPS(x, x_hat).

    ``perceptual(x_hat)`` returns the per-image LPIPS distance to the (fixed) target, (B, 1, 1, 1);
    as in taming-transformers' VQGAN loss it is broadcast over every element before the sum, so it
    weighs C*H*W times its value.
    """
    rec = (x - x_hat).abs()
    if perceptual is not None:
        rec = rec + perceptual_weight * perceptual(x_hat)
    return rec.flatten(1).sum(1).mean()


def generator_hinge_loss(logits_fake: Tensor) -> Tensor:
    """g = -mean(D(x_hat))."""
    return -logits_fake.mean()


def discriminator_hinge_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """0.5 * (mean(relu(1 - D(x))) + mean(relu(1 + D(x_hat))))."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def adaptive_weight(rec_loss: Tensor, g_loss: Tensor, weight: Tensor, max_value: float = 1e4) -> Tensor:
    """lambda = ||grad_W L_rec|| / (||grad_W g|| + 1e-4), clamped to [0, max_value], detached.

    W is the last decoder conv weight (or an alias of one of its uses; see LossConfig.adaptive_weight).
    """
    g_rec = torch.autograd.grad(rec_loss, weight, retain_graph=True)[0]
    g_adv = torch.autograd.grad(g_loss, weight, retain_graph=True)[0]
    return (g_rec.norm() / (g_adv.norm() + 1e-4)).clamp(0.0, max_value).detach()


# --- LSGAN (baseline) -----------------------------------------------------------------------------


def lsgan_generator_loss(logits_fake: Tensor) -> Tensor:
    """Least-squares GAN (Mao et al. 2017), generator: 0.5 * mean((D(G(z)) - 1)^2)."""
    return 0.5 * (logits_fake - 1.0).pow(2).mean()


def lsgan_discriminator_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """Least-squares GAN, discriminator: 0.5 * mean((D(x) - 1)^2) + 0.5 * mean(D(G(z))^2)."""
    return 0.5 * (logits_real - 1.0).pow(2).mean() + 0.5 * logits_fake.pow(2).mean()
