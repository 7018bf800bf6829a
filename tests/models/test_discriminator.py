"""PatchGAN discriminator: shapes, parameter count, init statistics."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from models.discriminator import PatchDiscriminator


def hand_param_count(c_in: int, w: int, n_layers: int) -> int:
    """Parameters of the pix2pix PatchGAN, counted by hand from its layer list."""
    total = c_in * w * 16 + w  # conv 4x4 with bias
    prev = w
    for n in range(1, n_layers + 1):
        width = w * min(2**n, 8)
        total += prev * width * 16 + 2 * width  # conv 4x4 without bias + BatchNorm affine
        prev = width
    return total + prev * 1 * 16 + 1  # final conv 4x4 -> 1 with bias


def test_paper_configuration_param_count() -> None:
    d = PatchDiscriminator()
    n = sum(p.numel() for p in d.parameters())
    # 2*64*16+64  +  64*128*16+256  +  128*256*16+512  +  256*512*16+1024  +  512*16+1
    expected = 2112 + 131_328 + 524_800 + 2_098_176 + 8193
    print(f"PatchDiscriminator(2, 64, 3): {n} parameters")
    assert expected == 2_764_609
    assert n == expected == hand_param_count(2, 64, 3)


@pytest.mark.parametrize(
    "size, base_width, n_layers, out",
    [
        (128, 64, 3, 14),  # the paper's configuration
        (128, 16, 3, 14),
        (128, 16, 2, 30),  # 64 -> 32 -> 31 -> 30
        (64, 16, 3, 6),  # 32 -> 16 -> 8 -> 7 -> 6
        (128, 8, 5, 2),  # five stride-2 convs: 64 32 16 8 4, then 3, 2
    ],
)
def test_logit_shape_and_param_count(size: int, base_width: int, n_layers: int, out: int) -> None:
    torch.manual_seed(0)
    d = PatchDiscriminator(in_channels=2, base_width=base_width, n_layers=n_layers)
    y = d(torch.rand(3, 2, size, size))
    assert y.shape == (3, 1, out, out)
    assert sum(p.numel() for p in d.parameters()) == hand_param_count(2, base_width, n_layers)


def test_layer_layout_matches_method() -> None:
    d = PatchDiscriminator()
    convs = [m for m in d.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [
        (2, 64),
        (64, 128),
        (128, 256),
        (256, 512),
        (512, 1),
    ]
    assert [c.stride[0] for c in convs] == [2, 2, 2, 1, 1]
    assert all(c.kernel_size == (4, 4) and c.padding == (1, 1) for c in convs)
    assert [c.bias is not None for c in convs] == [True, False, False, False, True]
    assert [m.num_features for m in d.modules() if isinstance(m, nn.BatchNorm2d)] == [128, 256, 512]
    assert all(m.negative_slope == 0.2 for m in d.modules() if isinstance(m, nn.LeakyReLU))


def test_init_statistics() -> None:
    torch.manual_seed(0)
    d = PatchDiscriminator()
    convs = [m for m in d.modules() if isinstance(m, nn.Conv2d)]
    big = torch.cat([c.weight.flatten() for c in convs[1:4]])  # 2.75M samples
    assert abs(big.mean().item()) < 1e-3
    assert big.std().item() == pytest.approx(0.02, rel=0.01)
    for c in convs:
        assert c.weight.std().item() == pytest.approx(0.02, rel=0.1)
        if c.bias is not None:
            assert torch.all(c.bias == 0)
    bn_w = torch.cat([m.weight for m in d.modules() if isinstance(m, nn.BatchNorm2d)])
    assert bn_w.mean().item() == pytest.approx(1.0, abs=0.005)
    assert bn_w.std().item() == pytest.approx(0.02, rel=0.15)
    assert all(torch.all(m.bias == 0) for m in d.modules() if isinstance(m, nn.BatchNorm2d))


def test_gradients_reach_input_and_every_parameter() -> None:
    torch.manual_seed(0)
    d = PatchDiscriminator(base_width=8)
    x = torch.rand(2, 2, 64, 64, requires_grad=True)
    d(x).mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in d.parameters())


@pytest.mark.parametrize(
    "kwargs, shape",
    [({}, (2, 3, 128, 128)), ({}, (2, 128, 128)), ({"in_channels": 1}, (2, 2, 64, 64))],
)
def test_rejects_wrong_input(kwargs: dict, shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="expected"):
        PatchDiscriminator(base_width=4, **kwargs)(torch.zeros(shape))


@pytest.mark.parametrize("kwargs", [{"n_layers": 0}, {"base_width": 0}])
def test_rejects_bad_config(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        PatchDiscriminator(**kwargs)
