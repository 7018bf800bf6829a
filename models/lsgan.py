"""The LSGAN baseline of the paper (method.md, "Baselines"): joint 2-channel [image, mask] pairs from noise.

Least-squares GAN (Mao et al. 2017) built from this project's own parts so that the comparison with the
dHVAE isolates the training objective, not the architecture:
    generator      x_fake = sigmoid(Decoder(z)), z ~ N(0, I) of ``cfg.network.latent_dim`` (models/network.py)
    discriminator  the PatchGAN of the dHVAE (models/discriminator.py), patch logits on the pair
    losses         G: 0.5 * mean((D(x_fake) - 1)^2);  D: 0.5 * mean((D(x) - 1)^2) + 0.5 * mean(D(x_fake)^2)
                   (models/losses.py, ``lsgan_generator_loss`` / ``lsgan_discriminator_loss``)

It has the interface :func:`models.train.fit` and :func:`models.sampler.sample_pairs` expect of a model
(``training_losses``, ``discriminator_loss``, ``generator_parameters``, ``discriminator_parameters``,
``decode``, ``cfg``), so training, checkpoints, sampling with rejection and export are the dHVAE's, unchanged.
Config fields used: ``network`` (decoder), ``discriminator``, ``train`` (AdamW for both, ``lr``; ``disc_lr``, unset, follows it)
and ``sampling``; ``flow`` and ``loss`` are ignored (no encoder, no flow, no reconstruction term, and the
adversarial game runs from step 0: ``loss.disc_start`` does not apply).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from . import losses
from .config import DHVAEConfig
from .dhvae import StepLosses
from .discriminator import PatchDiscriminator
from .network import Decoder


class LSGAN(nn.Module):
    """Decoder-as-generator and PatchGAN discriminator, trained with least-squares losses.

    Shapes: real batches ``x`` are ``(B, 2, H, W)`` in [0, 1]; ``z`` is ``(B, latent_dim)``; generated pairs
    are ``(B, 2, H, W)`` probabilities (the mask channel is thresholded by the sampler).
    """

    needs_perceptual = False  # no LPIPS term: pipeline.attach_perceptual skips it

    def __init__(self, cfg: DHVAEConfig):
        super().__init__()
        if cfg.model != "lsgan":
            raise ValueError(f"LSGAN cannot build model {cfg.model!r}")
        self.cfg = cfg
        self.decoder = Decoder(cfg.network)
        self.discriminator = PatchDiscriminator(
            cfg.network.in_channels, cfg.discriminator.base_channels, cfg.discriminator.n_layers
        )

    def generator_parameters(self) -> list[nn.Parameter]:
        return list(self.decoder.parameters())

    def discriminator_parameters(self) -> list[nn.Parameter]:
        return list(self.discriminator.parameters())

    def sample_latent(self, batch: int, rng: torch.Generator | None, device: torch.device) -> Tensor:
        """z ~ N(0, I) ``(batch, latent_dim)``, drawn on the CPU generator: runs reproduce on any device."""
        return torch.randn(batch, self.cfg.network.latent_dim, generator=rng).to(device)

    def training_losses(self, x: Tensor, step: int, rng: torch.Generator | None = None) -> StepLosses:
        """Generator objective for one step: fakes from fresh noise, as many as the real batch ``x``.

        ``fake`` is returned detached for :meth:`discriminator_loss`, which ``fit`` calls right after.
        The backward of this loss also fills the discriminator's ``.grad``; ``fit`` zeroes those before the
        discriminator's own step, and only the generator's optimiser steps on this loss.
        """
        z = self.sample_latent(x.shape[0], rng, x.device)
        fake = torch.sigmoid(self.decoder(z))
        g = losses.lsgan_generator_loss(self.discriminator(fake))
        return StepLosses(g, fake.detach(), {"g": g.item()})

    def discriminator_loss(self, x: Tensor, fake: Tensor, step: int) -> Tensor:
        """Least-squares loss of the PatchGAN on real ``x`` vs generated ``fake`` (both ``(B, 2, H, W)``)."""
        return losses.lsgan_discriminator_loss(self.discriminator(x), self.discriminator(fake.detach()))

    @torch.no_grad()
    def decode(self, z: Tensor) -> Tensor:
        """z ``(B, latent_dim)`` -> [image, mask] probabilities ``(B, 2, H, W)`` (the generator)."""
        return torch.sigmoid(self.decoder(z))
