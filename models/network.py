"""The encoder-decoder of the dHVAE: four residual/attention blocks around a 3 x 16 x 16 spatial latent.

method.md, "Network": conv3x3 2 -> C; blocks with channel multipliers (1, 2, 4, 4), each of
``num_res_blocks`` residual blocks (conv3x3 -> GroupNorm -> SiLU, twice; 1x1 skip when widths differ),
self-attention after each residual block of the last block only, avgpool-2 + conv3x3 downsampling in the
first three; a middle of resblock -> attention -> resblock at 16 x 16; GroupNorm -> SiLU -> conv3x3 to
2 * z_channels. The decoder mirrors it with nearest-neighbour x2 upsampling and ends in 2 logits whose
sigmoid is the Bernoulli mean of [image, mask].

Attention is written with plain matmuls rather than ``scaled_dot_product_attention`` because the
Hamiltonian flow differentiates the decoder twice (create_graph=True), and the fused CPU kernels have no
double backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import NetworkConfig


def group_norm(channels: int, num_groups: int) -> nn.GroupNorm:
    """GroupNorm with at most ``num_groups`` groups, fewer when the width is not divisible."""
    g = min(num_groups, channels)
    while channels % g:
        g -= 1
    return nn.GroupNorm(g, channels, eps=1e-6)


class ResBlock(nn.Module):
    """(conv3x3 -> GroupNorm -> SiLU) x 2 plus a skip (1x1 conv when widths differ). (B,Cin,H,W)->(B,Cout,H,W)."""

    def __init__(self, c_in: int, c_out: int, num_groups: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(c_in, c_out, 3, padding=1),
            group_norm(c_out, num_groups),
            nn.SiLU(),
            nn.Conv2d(c_out, c_out, 3, padding=1),
            group_norm(c_out, num_groups),
            nn.SiLU(),
        )
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.skip(x) + self.body(x)


class SelfAttention(nn.Module):
    """Multi-head self-attention over the H*W positions, residual. (B,C,H,W) -> (B,C,H,W)."""

    def __init__(self, channels: int, num_groups: int, heads: int = 1):
        super().__init__()
        if channels % heads:
            raise ValueError(f"attention width {channels} is not divisible by {heads} heads")
        self.heads = heads
        self.norm = group_norm(channels, num_groups)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w).unbind(1)
        attn = torch.softmax(q.transpose(-1, -2) @ k * (c // self.heads) ** -0.5, dim=-1)  # (B,h,HW,HW)
        out = (v @ attn.transpose(-1, -2)).reshape(b, c, h, w)
        return x + self.proj(out)


class Downsample(nn.Module):
    """avgpool 2 then conv3x3 (method.md). (B,C,H,W) -> (B,C,H/2,W/2)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.avg_pool2d(x, 2))


class Upsample(nn.Module):
    """nearest-neighbour x2 then conv3x3. (B,C,H,W) -> (B,C,2H,2W)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _level(c_in: int, c_out: int, cfg: NetworkConfig, attention: bool) -> list[nn.Module]:
    layers: list[nn.Module] = []
    for i in range(cfg.num_res_blocks):
        layers.append(ResBlock(c_in if i == 0 else c_out, c_out, cfg.num_groups))
        if attention:
            layers.append(SelfAttention(c_out, cfg.num_groups, cfg.attn_heads))
    return layers


def _middle(c: int, cfg: NetworkConfig) -> nn.Sequential:
    return nn.Sequential(
        ResBlock(c, c, cfg.num_groups),
        SelfAttention(c, cfg.num_groups, cfg.attn_heads),
        ResBlock(c, c, cfg.num_groups),
    )


class Encoder(nn.Module):
    """x (B, 2, H, W) in [0,1] -> (mu, logvar), each (B, z_channels * (H/8)^2), flattened."""

    def __init__(self, cfg: NetworkConfig):
        super().__init__()
        self.cfg = cfg
        widths = [cfg.base_channels * m for m in cfg.channel_mult]
        n = len(widths)
        layers: list[nn.Module] = [nn.Conv2d(cfg.in_channels, cfg.base_channels, 3, padding=1)]
        c_in = cfg.base_channels
        for i, c_out in enumerate(widths):
            layers += _level(c_in, c_out, cfg, attention=(i == n - 1))
            if i < n - 1:
                layers.append(Downsample(c_out))
            c_in = c_out
        layers += [
            _middle(c_in, cfg),
            group_norm(c_in, cfg.num_groups),
            nn.SiLU(),
            nn.Conv2d(c_in, 2 * cfg.z_channels, 3, padding=1),
        ]
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        mu, logvar = self.net(x).chunk(2, dim=1)
        logvar = logvar.clamp(*self.cfg.logvar_clamp)
        return mu.flatten(1), logvar.flatten(1)


class Decoder(nn.Module):
    """z (B, latent_dim) -> logits (B, 2, H, W); ``torch.sigmoid(logits)`` is the Bernoulli mean.

    Split into ``trunk`` (everything up to the activation before the last conv) and ``head`` (that conv)
    so the adaptive adversarial weight can take gradients w.r.t. the head's weight at one call site.
    """

    def __init__(self, cfg: NetworkConfig):
        super().__init__()
        self.cfg = cfg
        # Mirror of the encoder: level i outputs the width the encoder's level n-1-i takes as input.
        enc_in = [cfg.base_channels] + [cfg.base_channels * m for m in cfg.channel_mult[:-1]]
        widths = list(reversed(enc_in))
        n = len(widths)
        c_in = cfg.base_channels * cfg.channel_mult[-1]
        layers: list[nn.Module] = [nn.Conv2d(cfg.z_channels, c_in, 3, padding=1), _middle(c_in, cfg)]
        for i, c_out in enumerate(widths):
            layers += _level(c_in, c_out, cfg, attention=(i == 0))
            if i < n - 1:
                layers.append(Upsample(c_out))
            c_in = c_out
        layers += [group_norm(c_in, cfg.num_groups), nn.SiLU()]
        self.trunk = nn.Sequential(*layers)
        self.head = nn.Conv2d(c_in, cfg.in_channels, 3, padding=1)

    def forward(self, z: Tensor, head_weight: Tensor | None = None) -> Tensor:
        s = self.cfg.latent_size
        h = self.trunk(z.reshape(-1, self.cfg.z_channels, s, s))
        w = self.head.weight if head_weight is None else head_weight
        return F.conv2d(h, w, self.head.bias, padding=1)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
