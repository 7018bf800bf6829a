"""PatchGAN discriminator on the 2-channel [image, mask] pair (pix2pix ``NLayerDiscriminator``).

docs/method.md, "Discriminative regulariser"; same layout as taming-transformers' discriminator used by the
dHVAE code (modules/discriminator.py): conv4x4 s2 (2 -> 64) + LeakyReLU 0.2, then (n_layers - 1) blocks
conv4x4 s2 + BatchNorm + LeakyReLU doubling the width (capped at 8x), one conv4x4 s1 block, and a conv4x4
s1 to one logit per patch. Padding 1 everywhere. Convs followed by BatchNorm have no bias.

At 128x128 with n_layers=3: 64 -> 32 -> 16 -> 15 -> 14, i.e. ``(B, 1, 14, 14)`` logits, each seeing a
70x70 receptive field. (The dHVAE code averages these to one logit per image; we return the map and leave
the reduction to the loss, which takes means anyway.)
"""

from __future__ import annotations

from torch import Tensor, nn


def init_weights(module: nn.Module, std: float = 0.02) -> None:
    """pix2pix init: conv weights N(0, std) and biases 0; BatchNorm weight N(1, std) and bias 0.

    (taming's ``weights_init``, used by the dHVAE code, leaves conv biases at PyTorch's default instead;
    only the first and last convs have one.)
    """
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, std)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, std)
        nn.init.zeros_(module.bias)


class PatchDiscriminator(nn.Module):
    """PatchGAN: ``(B, in_channels, H, W)`` -> patch logits ``(B, 1, H', W')`` (14x14 at 128x128).

    Args:
        in_channels: input channels (2 for [image, mask]).
        base_width: channels of the first conv (64 in the paper).
        n_layers: number of stride-2 convs (3 in the paper); the width doubles per layer, capped at 8x.
    """

    def __init__(self, in_channels: int = 2, base_width: int = 64, n_layers: int = 3) -> None:
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"n_layers must be >= 1, got {n_layers}")
        if base_width < 1 or in_channels < 1:
            raise ValueError(f"in_channels and base_width must be >= 1, got {in_channels}, {base_width}")
        self.in_channels = in_channels
        self.base_width = base_width
        self.n_layers = n_layers

        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, base_width, kernel_size=4, stride=2, padding=1),
            nn.LeakyReLU(0.2, inplace=True),
        ]
        width = base_width
        for n in range(1, n_layers + 1):
            prev, width = width, base_width * min(2**n, 8)
            stride = 2 if n < n_layers else 1  # the last widening conv keeps the resolution
            layers += [
                nn.Conv2d(prev, width, kernel_size=4, stride=stride, padding=1, bias=False),
                nn.BatchNorm2d(width),
                nn.LeakyReLU(0.2, inplace=True),
            ]
        layers.append(nn.Conv2d(width, 1, kernel_size=4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        self.apply(init_weights)

    def forward(self, x: Tensor) -> Tensor:
        """Patch logits (real > fake) ``(B, 1, H', W')`` for ``x`` ``(B, in_channels, H, W)``."""
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected (B, {self.in_channels}, H, W), got {tuple(x.shape)}")
        return self.main(x)
