"""The masks-first generator ``spade`` (models/masks_first.py): label maps partition a slice, training
fills the bank and moves the renderer, drawn masks are binary, inside the brain, sized over the cohort's
range and reproducible from z, and the generator trains, checkpoints and exports like every other."""

from pathlib import Path

import numpy as np
import pytest
import torch

from imaging.errors import DHVAEError
from imaging.export import verify_dataset
from models.checkpoint import model_from_checkpoint
from models.masks_first import MasksFirst, label_map
from models.registry import build_model
from models.train import fit
from pipeline.pipeline import SampleSpec, generate
from tests.models.test_baselines import SIZE, tiny, toy_pairs


def spade(steps: int = 3, **extra):
    return tiny("spade", steps).replace(**{"masks_first.z_dim": 8, **extra})  # 8 + 32 + 8 = 48 = latent


def test_label_map_partitions_each_slice_into_background_brain_and_tumour():
    x = toy_pairs(3)
    labels = label_map(x)
    assert labels.shape == (3, 3, SIZE, SIZE) and torch.equal(labels.sum(1), torch.ones(3, SIZE, SIZE))
    assert torch.equal(labels[:, 2], x[:, 1])  # the tumour channel is the mask


def test_training_fills_the_bank_and_moves_the_renderer(tmp_path: Path):
    torch.manual_seed(0)
    cfg = spade(steps=4, **{"masks_first.bank_size": 5})
    net = build_model(cfg)
    assert isinstance(net, MasksFirst)
    with pytest.raises(DHVAEError, match="train it first"):
        net.decode(torch.zeros(2, cfg.network.latent_dim))
    before = [p.detach().clone() for p in net.generator_parameters()]
    seen: list[dict[str, float]] = []
    fit(net, toy_pairs(8), cfg, checkpoint=tmp_path / "last.pt", progress=lambda p: seen.append(p.metrics))
    assert len(seen) == 4 and all(np.isfinite(m["loss"]) and "l1" in m and "kl" in m for m in seen)
    assert any(not torch.equal(a, b) for a, b in zip(before, net.generator_parameters(), strict=True))
    assert int(net.bank_seen) == 4 * cfg.train.batch_size and net.bank.shape[0] == 5  # a reservoir
    loaded, _ = model_from_checkpoint(tmp_path / "last.pt")  # weights_only: the bank rides as a buffer
    z = torch.randn(6, cfg.network.latent_dim, generator=torch.Generator().manual_seed(3))
    assert torch.equal(loaded.bank, net.bank) and torch.allclose(loaded.decode(z), net.decode(z))


def test_drawn_masks_are_binary_inside_the_brain_sized_over_the_range_and_reproducible():
    cfg = spade()
    net = MasksFirst(cfg)
    real = toy_pairs(6)
    net.remember(label_map(real), None)
    z = torch.randn(64, cfg.network.latent_dim, generator=torch.Generator().manual_seed(0))
    pairs = net.decode(z)
    masks = pairs[:, 1]
    assert pairs.shape == (64, 2, SIZE, SIZE) and set(masks.unique().tolist()) <= {0.0, 1.0}
    assert 0.0 <= float(pairs[:, 0].min()) and float(pairs[:, 0].max()) <= 1.0
    brains, tumour = net.draw_masks(z)
    assert torch.equal(tumour.float(), masks) and not (tumour & ~brains).any()  # cut to the brain
    areas = masks.flatten(1).sum(1)
    real_areas = real[:, 1].flatten(1).sum(1)
    hi = cfg.masks_first.area_range[1]
    inside = areas[areas > 0]
    assert float(inside.max()) <= hi * float(real_areas.max()) * 1.2  # interpolation and the elastic term
    assert float(areas.min()) < float(real_areas.min()) and float(areas.max()) > float(real_areas.max())
    assert torch.equal(net.decode(z), pairs)  # the same z, the same pairs
    assert not torch.equal(net.decode(z.flip(0)), pairs)


def test_masks_first_exports_an_nnunet_dataset(tmp_path: Path):
    cfg = spade(steps=2)
    net = build_model(cfg)
    fit(net, toy_pairs(8), cfg, checkpoint=tmp_path / "last.pt")
    result = generate(tmp_path / "last.pt", SampleSpec(3, seed=0, min_mask_area=0), out_dir=tmp_path / "out")
    assert result.n_pairs == 3 and verify_dataset(tmp_path / "out")["generator"]["model"] == "spade"


def test_masks_first_refuses_other_models_and_a_latent_too_small():
    with pytest.raises(ValueError, match="cannot build"):
        MasksFirst(tiny("lsgan"))
    with pytest.raises(DHVAEError, match="latent of at least"):
        MasksFirst(tiny("spade"))  # z_dim 32 needs 72 coordinates; the 32 px tiny latent has 48
