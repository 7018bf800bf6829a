"""Masks first (issue 11, B.2; our extension beyond the paper, after GenSeg and SPADE): the tumour mask is
drawn first, from real masks moved, resized and deformed, and an image is then rendered for it.

    label map   one-hot (background, brain, tumour) of a slice: brain = :func:`models.insert.brain_mask`
    renderer    MONAI's ``SPADENet`` in VAE mode: an encoder gives a style code s ~ q(s | image); the
                SPADE decoder renders sigmoid(D(label map, s)), an image in [0, 1]
    critic      the dHVAE's PatchGAN (models/discriminator.py) on the [image, mask] pair
    losses      l1_weight * |x - x_hat| + kl_weight * KL(q(s | x) || N(0, I))
                + adv_weight * LSGAN(D([x_hat, mask]))  (the last after ``loss.disc_start``)

Training sees the real slices only (their label maps); a reservoir of ``bank_size`` of them is kept in
the model (buffers, so a checkpoint carries it: label maps only, uint8). Generation
(:meth:`MasksFirst.decode`) reads everything from the sampler's latent ``z ~ N(0, I)``, so seeds,
checkpoints, sampling with rejection and export are the dHVAE's, unchanged. Through the normal CDF,
z's first coordinates pick

1. a brain (the label map of one training slice) and a tumour mask (of another);
2. the tumour's new area, log-uniform over ``area_range`` times the cohort's smallest..largest area (the
   rare sizes come as often as the common ones), its rotation (0..360 deg), and a smooth elastic
   displacement (``elastic_px``);
3. its centre, one of the brain's pixels; the moved mask is cut to the brain;

and the following ``z_dim`` coordinates are the style code. The mask channel of a pair is exactly the
drawn mask (binary), the image channel is the rendering.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from imaging.errors import DHVAEError

from . import losses
from .config import DHVAEConfig
from .dhvae import StepLosses
from .discriminator import PatchDiscriminator
from .insert import brain_mask

N_CONTROL = (
    8  # latent coordinates that choose and move the mask (brain, tumour, area, angle, centre x2, spare)
)
ELASTIC_GRID = 4  # the elastic displacement: a 2 x 4 x 4 grid of z coordinates, upsampled
N_ELASTIC = 2 * ELASTIC_GRID**2


def one_hot(brain: Tensor, tumour: Tensor) -> Tensor:
    """Bool ``(B, H, W)`` brain (tumour included) and tumour -> one-hot ``(B, 3, H, W)`` float
    (background, brain, tumour): the three channels partition every slice."""
    return torch.stack([~brain, brain & ~tumour, tumour], 1).float()


def label_map(pairs: Tensor) -> Tensor:
    """``(B, 2, H, W)`` [image, mask] -> :func:`one_hot` label map; the tumour counts as brain."""
    image = pairs[:, 0].detach().float().cpu().numpy()
    brain = torch.from_numpy(np.stack([brain_mask(i) for i in image])).to(pairs.device)
    tumour = pairs[:, 1] > 0.5
    return one_hot(brain | tumour, tumour)


class MasksFirst(nn.Module):
    """SPADE renderer + PatchGAN critic + a bank of real label maps (the masks-first generator ``spade``).

    Shapes: training batches ``x`` are ``(B, 2, H, W)`` in [0, 1]; ``decode(z)`` takes the sampler's
    ``(B, latent_dim)`` and returns ``(B, 2, H, W)``: [rendered image, drawn binary mask].
    """

    needs_perceptual = False  # L1 + KL + LSGAN; no LPIPS term
    bank: Tensor  # (bank_size, 2, H, W) uint8: [brain (tumour included), tumour] label maps
    bank_seen: Tensor  # () long: training slices offered to the reservoir so far

    def __init__(self, cfg: DHVAEConfig):
        super().__init__()
        if cfg.model != "spade":
            raise ValueError(f"MasksFirst cannot build model {cfg.model!r}")
        from monai.networks.nets import SPADENet

        self.cfg = cfg
        net, mf = cfg.network, cfg.masks_first
        need = N_CONTROL + N_ELASTIC + mf.z_dim
        if net.latent_dim < need:
            raise DHVAEError(
                f"spade needs a latent of at least {need} coordinates, the config gives {net.latent_dim}"
            )
        size = net.image_size
        self.renderer = SPADENet(
            spatial_dims=2,
            in_channels=1,
            out_channels=1,
            label_nc=3,
            input_shape=(size, size),
            channels=[net.base_channels * m for m in net.channel_mult],
            z_dim=mf.z_dim,
            is_vae=True,
            spade_intermediate_channels=net.base_channels * 2,
            last_act=None,
        )
        self.discriminator = PatchDiscriminator(
            net.in_channels, cfg.discriminator.base_channels, cfg.discriminator.n_layers
        )
        self.register_buffer("bank", torch.zeros(mf.bank_size, 2, size, size, dtype=torch.uint8))
        self.register_buffer("bank_seen", torch.zeros((), dtype=torch.long))

    def generator_parameters(self) -> list[nn.Parameter]:
        return list(self.renderer.parameters())

    def discriminator_parameters(self) -> list[nn.Parameter]:
        return list(self.discriminator.parameters())

    # --- training ---------------------------------------------------------------------------------

    def remember(self, labels: Tensor, rng: torch.Generator | None) -> None:
        """Reservoir sampling of the training label maps into the bank (Vitter's algorithm R)."""
        keep = torch.stack([labels[:, 1] + labels[:, 2], labels[:, 2]], 1).to(torch.uint8)
        size = int(self.bank.shape[0])
        for row in keep:
            seen = int(self.bank_seen)
            if seen < size:
                self.bank[seen] = row
            else:
                j = int(torch.randint(seen + 1, (1,), generator=rng))
                if j < size:
                    self.bank[j] = row
            self.bank_seen += 1

    def training_losses(self, x: Tensor, step: int, rng: torch.Generator | None = None) -> StepLosses:
        """Render the batch's images from their own label maps (style from the encoder) and score them."""
        mf = self.cfg.masks_first
        labels = label_map(x)
        self.remember(labels, rng)
        out, mu, logvar = self.renderer(labels, x[:, :1])
        x_hat = torch.sigmoid(out)
        l1 = (x_hat - x[:, :1]).abs().mean()
        kl = -0.5 * torch.mean(1 + logvar - mu.pow(2) - logvar.exp())
        fake = torch.cat([x_hat, x[:, 1:]], 1)
        loss = mf.l1_weight * l1 + mf.kl_weight * kl
        metrics = {"l1": l1.item(), "kl": kl.item()}
        if step >= self.cfg.loss.disc_start:
            g = losses.lsgan_generator_loss(self.discriminator(fake))
            loss = loss + mf.adv_weight * g
            metrics["g"] = g.item()
        return StepLosses(loss, fake.detach(), metrics)

    def discriminator_loss(self, x: Tensor, fake: Tensor, step: int) -> Tensor | None:
        """Least-squares loss of the PatchGAN on real pairs vs rendered ones; None before ``disc_start``."""
        if step < self.cfg.loss.disc_start:
            return None
        return losses.lsgan_discriminator_loss(self.discriminator(x), self.discriminator(fake.detach()))

    # --- generation -------------------------------------------------------------------------------

    def draw_masks(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """From z's control coordinates: (brain, tumour) ``(B, H, W)`` bool, the tumour moved, resized,
        rotated, deformed and cut to the brain (see the module docstring)."""
        n_bank = min(int(self.bank_seen), int(self.bank.shape[0]))
        if n_bank == 0:
            raise DHVAEError("the masks-first generator has no training label maps: train it first")
        mf = self.cfg.masks_first
        u = torch.special.ndtr(z[:, :N_CONTROL].float().cpu())  # uniform (0, 1)
        bank = self.bank[:n_bank].cpu()
        brains = bank[(u[:, 0] * n_bank).long().clamp(max=n_bank - 1), 0].bool()
        donors = bank[(u[:, 1] * n_bank).long().clamp(max=n_bank - 1), 1].float()
        areas = bank[:, 1].flatten(1).sum(1).float()
        areas = areas[areas > 0]
        if not len(areas):
            raise DHVAEError("the masks-first generator's bank holds no tumour")
        lo, hi = (
            math.log(mf.area_range[0] * float(areas.min())),
            math.log(mf.area_range[1] * float(areas.max())),
        )
        target = torch.exp(lo + u[:, 2] * (hi - lo))
        b, size = len(z), int(bank.shape[-1])
        coords = torch.linspace(-1, 1, size)
        yy, xx = torch.meshgrid(coords, coords, indexing="ij")
        own = donors.flatten(1).sum(1).clamp(min=1)
        scale = torch.sqrt(own / target)  # output-to-input zoom: < 1 enlarges the tumour
        cy = (donors * yy).flatten(1).sum(1) / own
        cx = (donors * xx).flatten(1).sum(1) / own
        # the new centre: a brain pixel of the chosen brain, picked by u[:, 4]
        centres = []
        for i in range(b):
            pix = torch.nonzero(brains[i])
            if not len(pix):
                pix = torch.tensor([[size // 2, size // 2]])
            k = int((u[i, 4] * len(pix)).long().clamp(max=len(pix) - 1))
            centres.append(pix[k].float() / (size - 1) * 2 - 1)
        ny, nx = torch.stack(centres).unbind(1)
        angle = 2 * math.pi * u[:, 3]
        cos, sin = torch.cos(angle) * scale, torch.sin(angle) * scale
        # input = R S (output - new centre) + donor centre, for grid_sample's (x, y) order
        theta = torch.stack(
            [
                torch.stack([cos, -sin, cx - cos * nx + sin * ny], 1),
                torch.stack([sin, cos, cy - sin * nx - cos * ny], 1),
            ],
            1,
        )
        grid = F.affine_grid(theta, [b, 1, size, size], align_corners=True)
        coarse = z[:, N_CONTROL : N_CONTROL + N_ELASTIC].float().cpu().view(b, 2, ELASTIC_GRID, ELASTIC_GRID)
        shift = F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=True)
        amplitude = mf.elastic_px * size / 128  # pixels at 128 x 128, scaled with the slice
        grid = grid + amplitude * 2 / (size - 1) * shift.permute(0, 2, 3, 1)
        moved = F.grid_sample(
            donors[:, None], grid, mode="bilinear", padding_mode="zeros", align_corners=True
        )
        tumour = (moved[:, 0] > 0.5) & brains
        return brains, tumour

    @torch.no_grad()
    def decode(self, z: Tensor) -> Tensor:
        """z ``(B, latent_dim)`` -> [rendered image, drawn mask] ``(B, 2, H, W)``."""
        brains, tumour = self.draw_masks(z)
        labels = one_hot(brains, tumour).to(z.device)
        style = z[:, N_CONTROL + N_ELASTIC : N_CONTROL + N_ELASTIC + self.cfg.masks_first.z_dim]
        image = torch.sigmoid(self.renderer.decode(labels, style.to(z.device)))
        return torch.cat([image, tumour[:, None].float().to(z.device)], 1)
