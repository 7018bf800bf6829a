"""LPIPS perceptual distance on ImageNet VGG16, adapted to 2-channel [image, mask] slices.

LPIPS (Zhang et al. 2018) as used by taming-transformers' VQGAN loss and the dHVAE code
(Arksyd96/discriminative-hvae-for-accurate-tumor-segmentation, modules/lpips.py):

    d(x, y) = sum_l  mean_hw  sum_c  w_{l,c} * (f_l(x)_c / ||f_l(x)|| - f_l(y)_c / ||f_l(y)||)^2

with f_l the VGG16 activations relu1_2, relu2_2, relu3_3, relu4_3, relu5_3, ||.|| the L2 norm over channels
at each position and w_l the non-negative LPIPS linear heads (1x1 convs without bias).

2-channel adaptation (docs/method.md, "Discriminative regulariser"): conv1 keeps the first two of its three
RGB input channels, and the input scaling keeps the first two RGB shift/scale constants.

Weights come from ``scripts/fetch_vgg16.py`` (``make setup``): a flat tensor dict with torchvision-style
keys ``features.{idx}.weight|bias`` and ``lins.{k}.weight``; see that script for the provenance.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn

from imaging.errors import WeightsMissing

logger = logging.getLogger(__name__)

# torchvision vgg16().features: index of every conv, and the ReLUs whose outputs LPIPS compares.
VGG16_CONV_INDICES: tuple[int, ...] = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
VGG16_CONV_CHANNELS: tuple[int, ...] = (64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512)
VGG16_POOL_INDICES: tuple[int, ...] = (4, 9, 16, 23)
FEATURE_INDICES: tuple[int, ...] = (3, 8, 15, 22, 29)
FEATURE_CHANNELS: tuple[int, ...] = (64, 128, 256, 512, 512)

# LPIPS ScalingLayer constants (RGB), applied to inputs in [-1, 1].
LPIPS_SHIFT: tuple[float, float, float] = (-0.030, -0.088, -0.188)
LPIPS_SCALE: tuple[float, float, float] = (0.458, 0.448, 0.450)

DEFAULT_WEIGHTS = Path(__file__).resolve().parent.parent / "weights" / "vgg16_lpips.pt"

_MIN_SIZE = 16  # four 2x2 max-pools before relu5_3

InputRange = Literal["unit", "signed"]


def default_weights_path() -> Path:
    """``<repo>/weights/vgg16_lpips.pt``, where ``make setup`` writes the converted weights."""
    return DEFAULT_WEIGHTS


def build_vgg16_trunk(in_channels: int = 3) -> nn.Sequential:
    """VGG16 ``features[0:30]`` (up to relu5_3, last max-pool dropped) with torchvision's module indices."""
    layers: list[nn.Module] = []
    cin = in_channels
    convs = iter(VGG16_CONV_CHANNELS)
    for idx in range(FEATURE_INDICES[-1] + 1):
        if idx in VGG16_POOL_INDICES:
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        elif idx in VGG16_CONV_INDICES:
            cout = next(convs)
            layers.append(nn.Conv2d(cin, cout, kernel_size=3, padding=1))
            cin = cout
        else:
            # In-place is safe: a conv's backward needs its input, not its output.
            layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


def _normalize_channels(f: Tensor, eps: float = 1e-10) -> Tensor:
    """Unit L2 norm over channels at each position, in float32 (LPIPS ``normalize_tensor``).

    ``vector_norm``'s backward is 0 where the norm is 0, unlike ``sqrt(sum(f**2))`` which gives NaN.
    """
    f = f.float()
    return f / (torch.linalg.vector_norm(f, dim=1, keepdim=True) + eps)


def load_lpips_state(path: Path) -> dict[str, Tensor]:
    """Read the converted weights (tensors only, ``weights_only=True``); raise WeightsMissing if unusable."""
    if not path.is_file():
        raise WeightsMissing(
            f"VGG16/LPIPS weights not found at {path}: run `make setup` (or `.venv/bin/python "
            'scripts/fetch_vgg16.py`) to download and convert them, or set perceptual to "none" to train '
            "without the LPIPS term"
        )
    hint = 'rebuild it with `.venv/bin/python scripts/fetch_vgg16.py --force`, or set perceptual to "none"'
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt / truncated / not a tensor dict
        raise WeightsMissing(f"VGG16/LPIPS weights at {path} cannot be read ({e}): {hint}") from e
    expected: dict[str, tuple[int, ...]] = {}
    cin = 3
    for idx, cout in zip(VGG16_CONV_INDICES, VGG16_CONV_CHANNELS, strict=True):
        expected[f"features.{idx}.weight"] = (cout, cin, 3, 3)
        expected[f"features.{idx}.bias"] = (cout,)
        cin = cout
    for k, c in enumerate(FEATURE_CHANNELS):
        expected[f"lins.{k}.weight"] = (1, c, 1, 1)
    if not isinstance(state, dict):
        raise WeightsMissing(f"{path} is not a tensor dict: {hint}")
    for key, shape in expected.items():
        t = state.get(key)
        if not isinstance(t, Tensor) or tuple(t.shape) != shape:
            got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise WeightsMissing(f"{path}: {key} is {got}, expected {shape}: {hint}")
    return state


class LPIPS(nn.Module):
    """Frozen LPIPS-VGG16 distance between two batches, per image.

    Args:
        weights: converted weights file; default ``<repo>/weights/vgg16_lpips.pt``.
        in_channels: 2 (``[image, mask]``, conv1 and scaling constants cut to the first two RGB channels)
            or 3 (the standard RGB LPIPS-VGG).
        input_range: ``"unit"``: inputs in [0, 1], mapped to [-1, 1] as LPIPS expects (``2x - 1``);
            ``"signed"``: inputs already in [-1, 1]. (The dHVAE code feeds its [0, 1] slices straight to
            the scaling layer, i.e. ``"signed"`` on [0, 1] data; we follow LPIPS' convention by default.)
        channels_last: run the trunk in channels_last memory format (faster convs on GPU with AMP).

    Shapes: inputs ``(B, in_channels, H, W)`` with H, W >= 16; output ``(B, 1, 1, 1)``.
    Parameters are frozen and the module stays in eval mode.
    """

    mult: Tensor  # buffers, registered in __init__
    offset: Tensor

    def __init__(
        self,
        weights: str | Path | None = None,
        *,
        in_channels: int = 2,
        input_range: InputRange = "unit",
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        if in_channels not in (2, 3):
            raise ValueError(f"in_channels must be 2 or 3, got {in_channels}")
        if input_range not in ("unit", "signed"):
            raise ValueError(f"input_range must be 'unit' or 'signed', got {input_range!r}")
        self.in_channels = in_channels
        self.input_range = input_range
        self.channels_last = channels_last
        self.weights_path = Path(weights) if weights is not None else default_weights_path()

        state = load_lpips_state(self.weights_path)
        self.net = build_vgg16_trunk(in_channels)
        net_state = {k.removeprefix("features."): v for k, v in state.items() if k.startswith("features.")}
        net_state["0.weight"] = net_state["0.weight"][:, :in_channels].contiguous()
        self.net.load_state_dict(net_state, strict=True)
        # Heads as (L, C) rows: mean_hw and the 1x1 conv commute, so the head is a dot product on the
        # spatially averaged squared differences (no full-resolution 1x1 conv).
        self.lins = nn.ParameterList(
            nn.Parameter(state[f"lins.{k}.weight"].reshape(-1).clone()) for k in range(len(FEATURE_CHANNELS))
        )

        # Fold the [0,1] -> [-1,1] map and the ScalingLayer into one affine: x * mult + offset.
        shift = torch.tensor(LPIPS_SHIFT[:in_channels]).view(1, -1, 1, 1)
        scale = torch.tensor(LPIPS_SCALE[:in_channels]).view(1, -1, 1, 1)
        if input_range == "unit":  # ((2x - 1) - shift) / scale
            mult, offset = 2.0 / scale, (-1.0 - shift) / scale
        else:  # (x - shift) / scale
            mult, offset = 1.0 / scale, -shift / scale
        self.register_buffer("mult", mult, persistent=False)
        self.register_buffer("offset", offset, persistent=False)

        self.requires_grad_(False)
        if channels_last:
            self.net.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # torch's stub lacks it
        super().train(False)
        logger.debug("LPIPS-VGG16 (%d input channels) loaded from %s", in_channels, self.weights_path)

    def train(self, mode: bool = True) -> LPIPS:
        """Always eval: a parent's ``.train()`` must not change this frozen metric."""
        return super().train(False)

    def _check(self, x: Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"LPIPS expects (B, {self.in_channels}, H, W), got {tuple(x.shape)}")
        if x.shape[-1] < _MIN_SIZE or x.shape[-2] < _MIN_SIZE:
            raise ValueError(f"LPIPS needs H, W >= {_MIN_SIZE}, got {tuple(x.shape[-2:])}")

    def features(self, x: Tensor) -> list[Tensor]:
        """Channel-normalised VGG activations relu1_2 ... relu5_3 of ``x`` (B, C_in, H, W).

        Returns 5 float32 tensors ``(B, C_l, H / 2^l, W / 2^l)``, C_l = 64, 128, 256, 512, 512. Compute the
        target's once under ``torch.no_grad()`` and pass them to :meth:`distance_from_features`.
        """
        self._check(x)
        h = torch.addcmul(self.offset.to(x.dtype), x, self.mult.to(x.dtype))
        if self.channels_last:
            h = h.contiguous(memory_format=torch.channels_last)
        feats: list[Tensor] = []
        taps = iter(FEATURE_INDICES)
        tap = next(taps)
        for idx, layer in enumerate(self.net):
            h = layer(h)
            if idx == tap:
                feats.append(_normalize_channels(h))
                tap = next(taps, -1)
        return feats

    def distance_from_features(self, feats_target: list[Tensor], x_hat: Tensor) -> Tensor:
        """LPIPS between the images behind ``feats_target`` (from :meth:`features`) and ``x_hat``.

        ``x_hat`` (B, C_in, H, W) with the target's shape; returns ``(B, 1, 1, 1)`` float32, differentiable
        in ``x_hat``.
        """
        feats_hat = self.features(x_hat)
        if len(feats_target) != len(feats_hat):
            raise ValueError(f"expected {len(feats_hat)} feature maps, got {len(feats_target)}")
        total = x_hat.new_zeros(x_hat.shape[0], dtype=torch.float32)
        for f_t, f_h, w in zip(feats_target, feats_hat, self.lins, strict=True):
            if f_t.shape != f_h.shape:
                raise ValueError(f"target features {tuple(f_t.shape)} != x_hat's {tuple(f_h.shape)}")
            # sum_c w_c * mean_hw (diff_c^2)   ==   mean_hw(conv1x1_w(diff^2))
            total = total + (f_t - f_h).square().mean(dim=(2, 3)) @ w
        return total.view(-1, 1, 1, 1)

    def forward(self, x: Tensor, x_hat: Tensor) -> Tensor:
        """LPIPS(x, x_hat) per image, ``(B, 1, 1, 1)``. No graph is built for a target without grad."""
        if x.shape != x_hat.shape:
            raise ValueError(f"shapes differ: {tuple(x.shape)} vs {tuple(x_hat.shape)}")
        return self.distance_from_features(self.features(x), x_hat)
