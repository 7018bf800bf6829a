"""Baselines of the paper in the dHVAE's own pipeline: VAE, HVAE, LSGAN train a few steps with
models/train.fit and export valid pairs through pipeline/pipeline.generate; traditional augmentation
is seeded and keeps masks binary."""

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from imaging.export import image_path, label_path, synthetic_case_id, verify_dataset
from imaging.phantoms import make_phantom_cohort
from imaging.preprocess import PreprocessConfig
from models.checkpoint import model_from_checkpoint, validate_checkpoint
from models.config import DHVAEConfig, get_preset
from models.dhvae import DHVAE
from models.lsgan import LSGAN
from models.registry import build_model
from models.traditional import TraditionalAugConfig, augment_pairs, source_indices
from models.train import fit
from pipeline.pipeline import SampleSpec, TrainSpec, generate, ingest, train

SIZE = 32  # latent 3 x 4 x 4 with the tiny preset: same code paths as 128, a fraction of the work


def toy_pairs(n: int = 6, size: int = SIZE, seed: int = 0) -> torch.Tensor:
    """Bright discs on a dark background with the disc as mask: (n, 2, size, size) in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(float(size)), torch.arange(float(size)), indexing="ij")
    out = torch.zeros(n, 2, size, size)
    for i in range(n):
        cy, cx, r = (
            torch.rand(3, generator=g) * torch.tensor([0.4, 0.4, 0.1]) + torch.tensor([0.3, 0.3, 0.12])
        ).tolist()
        disc = ((yy - cy * size) ** 2 + (xx - cx * size) ** 2 < (r * size) ** 2).float()
        out[i, 0] = 0.2 + 0.6 * disc + 0.05 * torch.rand(size, size, generator=g)
        out[i, 1] = disc
    return out


def tiny(model: str, steps: int = 3) -> DHVAEConfig:
    return get_preset("tiny").replace(
        **{"model": model, "train.steps": steps, "network.image_size": SIZE, "train.checkpoint_every": steps}
    )


@pytest.mark.parametrize(("model", "cls"), [("vae", DHVAE), ("hvae", DHVAE), ("lsgan", LSGAN)])
def test_baseline_trains_and_exports_valid_pairs(tmp_path: Path, model: str, cls: type):
    torch.manual_seed(0)
    cfg = tiny(model)
    net = build_model(cfg)
    assert isinstance(net, cls)
    before = [p.detach().clone() for p in net.generator_parameters()]
    seen: list[dict[str, float]] = []
    fit(net, toy_pairs(), cfg, checkpoint=tmp_path / "last.pt", progress=lambda p: seen.append(p.metrics))
    assert len(seen) == 3 and all(np.isfinite(m["loss"]) for m in seen)
    assert any(not torch.equal(a, b) for a, b in zip(before, net.generator_parameters(), strict=True))
    if model == "lsgan":
        assert "disc" in seen[-1]  # the least-squares discriminator stepped too

    loaded, payload = model_from_checkpoint(tmp_path / "last.pt")
    assert type(loaded) is cls and payload["config_obj"].model == model

    out = tmp_path / "export"
    result = generate(tmp_path / "last.pt", SampleSpec(2, seed=0, min_mask_area=0), out_dir=out, device="cpu")
    assert result.n_pairs == 2
    manifest = verify_dataset(out)
    assert manifest["generator"]["model"] == model
    for i in range(2):
        case = synthetic_case_id(i)
        image = np.asarray(nib.load(image_path(out, case)).dataobj)
        mask = np.asarray(nib.load(label_path(out, case)).dataobj)
        assert image.shape[:2] == mask.shape[:2] == (SIZE, SIZE)
        assert np.isfinite(image).all() and image.min() >= 0.0 and image.max() <= 1.0
        assert set(np.unique(mask)) <= {0, 1}


def test_lsgan_through_pipeline_train_and_generate(tmp_path: Path):
    """The user's path: a cohort folder, the generator chosen by name, an nnU-Net export."""
    cohort = make_phantom_cohort(tmp_path / "cohort", n_cases=2, shape=(48, 48, 24))
    ing = ingest(cohort, prep=PreprocessConfig(shape=(SIZE, SIZE, 16)))
    ckpt = train(
        ing, TrainSpec(model="lsgan", preset="tiny", steps=2), model_dir=tmp_path / "m", device="cpu"
    )
    assert validate_checkpoint(ckpt)["model"] == "lsgan"
    generate(
        ckpt,
        SampleSpec(2, min_mask_area=0),
        out_dir=tmp_path / "out",
        real_cases=ing.slices.cases,
        device="cpu",
    )
    manifest = verify_dataset(tmp_path / "out")
    assert manifest["generator"]["model"] == "lsgan" and manifest["generation"]["n_pairs"] == 2


def test_lsgan_rejects_other_configs_and_has_no_encoder():
    with pytest.raises(ValueError, match="LSGAN cannot build"):
        LSGAN(tiny("dhvae"))
    net = build_model(tiny("lsgan"))
    assert not hasattr(net, "encoder")
    z = torch.randn(3, net.cfg.network.latent_dim)
    x = net.decode(z)
    assert x.shape == (3, 2, SIZE, SIZE) and 0.0 <= x.min() and x.max() <= 1.0


# --- traditional augmentation ---------------------------------------------------------------------


def test_traditional_augmentation_is_seeded_and_keeps_masks_binary():
    real = toy_pairs(4).numpy()
    a = augment_pairs(real, 9, seed=3)
    b = augment_pairs(real, 9, seed=3)
    c = augment_pairs(real, 9, seed=4)
    assert a.shape == (9, 2, SIZE, SIZE) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert set(np.unique(a[:, 1])) <= {0.0, 1.0}
    assert a[:, 0].min() >= 0.0 and a[:, 0].max() <= 1.0
    # every real slice is used as a source before any is used twice
    src = source_indices(4, 9, seed=3)
    assert sorted(src[:4].tolist()) == [0, 1, 2, 3]
    # a rotation keeps the tumour roughly where the image's bright disc is: the mask follows the image
    for pair in a:
        inside = pair[0][pair[1] > 0.5]
        if inside.size:
            assert inside.mean() > 0.5


def test_traditional_augmentation_transforms_pair_consistently():
    """Flips only (no rotation): each output is an exact flip of its source, the same for both channels."""
    real = toy_pairs(3).numpy()
    cfg = TraditionalAugConfig(max_rotation_deg=0.0, rotate_prob=0.0)
    out = augment_pairs(real, 6, seed=0, cfg=cfg)
    src = source_indices(3, 6, seed=0)
    for pair, s in zip(out, src, strict=True):
        candidates = [real[s], real[s][:, ::-1], real[s][:, :, ::-1], real[s][:, ::-1, ::-1]]
        assert any(np.array_equal(pair, c) for c in candidates)


def test_traditional_augmentation_input_errors():
    with pytest.raises(ValueError, match=r"\(N, 2, H, W\)"):
        augment_pairs(np.zeros((3, 32, 32), np.float32), 2, seed=0)
    with pytest.raises(ValueError, match="no real"):
        augment_pairs(np.zeros((0, 2, 32, 32), np.float32), 2, seed=0)
