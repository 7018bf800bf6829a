"""The discriminative Hamiltonian VAE (Kebaili et al. 2024) and its VAE / HVAE special cases.

One forward pass (method.md):
    mu, logvar = Encoder(x);  z0 = mu + sigma * e0;  rho0 = gamma / sqrt(beta0)
    (z_K, rho_K) = K tempered leapfrog steps on U(z) = -log p(x|z) - log N(z)   [models/hamiltonian.py]
    x_hat = sigmoid(Decoder(z_K))
and the objective (models/losses.py):
    L = (1 - alpha) * L_HVAE + alpha * (L_rec + lambda * g)
with the PatchGAN trained on real slices against the reconstructions x_hat.

``cfg.model`` selects the variant: "dhvae" (the paper), "hvae" (no discriminative regulariser) or
"vae" (no flow, analytic KL): the two baselines of the paper that share this network.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from . import losses
from .config import DHVAEConfig
from .discriminator import PatchDiscriminator
from .hamiltonian import FlowState, leapfrog_flow
from .network import Decoder, Encoder


@dataclass
class StepLosses:
    """What one generator step produces: the loss to minimise, the fakes for D, and scalars to log."""

    loss: Tensor
    fake: Tensor  # (B, 2, H, W) reconstructions in [0, 1], detached
    metrics: dict[str, float]


def _randn_like(t: Tensor, rng: torch.Generator | None) -> Tensor:
    """Standard normal noise shaped like t, drawn on the CPU generator so runs are reproducible anywhere."""
    return torch.randn(t.shape, generator=rng, dtype=t.dtype).to(t.device)


class DHVAE(nn.Module):
    """Encoder, decoder and (for "dhvae") the PatchGAN discriminator.

    The perceptual network is attached with :meth:`set_perceptual` and deliberately kept out of the
    module tree: its frozen ImageNet weights are not part of a checkpoint.
    """

    def __init__(self, cfg: DHVAEConfig):
        super().__init__()
        from .registry import REGISTRY

        if cfg.model not in REGISTRY or REGISTRY[cfg.model].model_class is not DHVAE:
            raise ValueError(f"DHVAE cannot build model {cfg.model!r}")
        self.cfg = cfg
        self.encoder = Encoder(cfg.network)
        self.decoder = Decoder(cfg.network)
        self.discriminator: PatchDiscriminator | None = None
        if self.adversarial:
            self.discriminator = PatchDiscriminator(
                cfg.network.in_channels, cfg.discriminator.base_channels, cfg.discriminator.n_layers
            )
        self._perceptual: list[Any] = []

    # --- structure --------------------------------------------------------------------------------

    @property
    def adversarial(self) -> bool:
        return self.cfg.model == "dhvae" and self.cfg.loss.discriminative

    @property
    def needs_perceptual(self) -> bool:
        return self.adversarial and self.cfg.loss.perceptual != "none"

    def set_perceptual(self, net: nn.Module | None) -> None:
        self._perceptual = [net] if net is not None else []

    def generator_parameters(self) -> list[nn.Parameter]:
        return [*self.encoder.parameters(), *self.decoder.parameters()]

    def discriminator_parameters(self) -> list[nn.Parameter]:
        return list(self.discriminator.parameters()) if self.discriminator is not None else []

    # --- the Hamiltonian forward pass -------------------------------------------------------------

    def _potential_grad(self, x: Tensor, create_graph: bool):
        """The closure z -> (dU/dz, (logits, head_weight_alias)) for :func:`leapfrog_flow`.

        Each call decodes through a fresh alias of the last conv weight, so a gradient w.r.t. the
        alias returned with the final decode is that weight's gradient through the final decode only.
        """
        head = self.decoder.head.weight

        def grad_u(z: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor]]:
            if not z.requires_grad:
                z = z.detach().requires_grad_(True)
            w = head.view_as(head)
            logits = self.decoder(z, head_weight=w)
            u = losses.potential(logits, x, z).sum()  # samples are independent: sum gives per-sample grads
            (g,) = torch.autograd.grad(u, z, create_graph=create_graph)
            return g, (logits, w)

        return grad_u

    def flow(self, x: Tensor, rng: torch.Generator | None = None) -> tuple[FlowState, Tensor, Tensor, Tensor]:
        """Encode x (B,2,H,W), sample z0, run the flow. Returns (state, e0, mu, logvar)."""
        mu, logvar = self.encoder(x)
        e0 = _randn_like(mu, rng)
        z0 = mu + (0.5 * logvar).exp() * e0
        f = self.cfg.flow
        gamma = _randn_like(mu, rng)
        rho0 = gamma / f.sqrt_beta0 if f.tempering else gamma
        state = leapfrog_flow(
            z0,
            rho0,
            self._potential_grad(x, create_graph=torch.is_grad_enabled()),
            n_steps=f.n_leapfrog,
            step_size=f.step_size,
            sqrt_beta0=f.sqrt_beta0,
            tempering=f.tempering,
        )
        return state, e0, mu, logvar

    # --- training objective -----------------------------------------------------------------------

    def training_losses(self, x: Tensor, step: int, rng: torch.Generator | None = None) -> StepLosses:
        """The generator's objective for one batch x (B, 2, H, W) in [0, 1] at optimiser step ``step``."""
        cfg = self.cfg
        metrics: dict[str, float] = {}
        if cfg.model == "vae":
            mu, logvar = self.encoder(x)
            e0 = _randn_like(mu, rng)
            logits = self.decoder(mu + (0.5 * logvar).exp() * e0)
            loss = losses.vae_loss(logits, x, mu, logvar)
            metrics["vae"] = loss.item()
            return StepLosses(loss, torch.sigmoid(logits).detach(), metrics)

        state, e0, mu, logvar = self.flow(x, rng)
        logits, head_alias = state.aux
        l_hvae = losses.hvae_loss(logits, x, state.z, state.rho, e0, logvar)
        metrics["hvae"] = l_hvae.item()
        x_hat = torch.sigmoid(logits)
        if not self.adversarial:
            return StepLosses(l_hvae, x_hat.detach(), metrics)

        l_rec = losses.reconstruction_loss(x, x_hat, self._perceptual_distance(x), cfg.loss.perceptual_weight)
        metrics["rec"] = l_rec.item()
        regulariser = l_rec
        if step >= cfg.loss.disc_start:
            assert self.discriminator is not None
            g = losses.generator_hinge_loss(self.discriminator(x_hat))
            # L_rec is needed twice (the adaptive weight's gradient and the main backward): take
            # dL_rec/dx_hat once and continue with a linear stand-in that has L_rec's value and the
            # same gradient, so the VGG16 backward runs once per step instead of twice.
            (d_rec,) = torch.autograd.grad(l_rec, x_hat, retain_graph=False)
            linear = (x_hat * d_rec).sum()
            rec = linear - linear.detach() + l_rec.detach()
            w = head_alias if cfg.loss.adaptive_weight == "final_decode" else self.decoder.head.weight
            lam = losses.adaptive_weight(rec, g, w, cfg.loss.adaptive_weight_max) * cfg.loss.disc_weight
            regulariser = rec + lam * g
            metrics["g"] = g.item()
            metrics["lambda"] = lam.item()
        alpha = cfg.loss.alpha
        loss = (1.0 - alpha) * l_hvae + alpha * regulariser
        return StepLosses(loss, x_hat.detach(), metrics)

    def discriminator_loss(self, x: Tensor, fake: Tensor, step: int) -> Tensor | None:
        """Hinge loss of the PatchGAN on real x vs reconstructions; None before ``disc_start``."""
        if self.discriminator is None or step < self.cfg.loss.disc_start:
            return None
        return losses.discriminator_hinge_loss(self.discriminator(x), self.discriminator(fake.detach()))

    def _perceptual_distance(self, x: Tensor):
        """x_hat -> LPIPS(x, x_hat) (B,1,1,1), with the target's VGG features computed once, no graph."""
        if not self.needs_perceptual:
            return None
        if not self._perceptual:
            raise RuntimeError("perceptual loss enabled but no perceptual network attached (set_perceptual)")
        net = self._perceptual[0]
        with torch.no_grad():
            target = net.features(x)
        return lambda x_hat: net.distance_from_features(target, x_hat)

    # --- generation -------------------------------------------------------------------------------

    @torch.no_grad()
    def decode(self, z: Tensor) -> Tensor:
        """z (B, latent_dim) -> [image, mask] probabilities (B, 2, H, W). No flow at generation time."""
        return torch.sigmoid(self.decoder(z))
