"""Training: loss goes down, checkpoints round-trip, a killed run resumes exactly, seeds reproduce,
NaN stops the run and keeps the last good checkpoint, presets have the documented shapes."""

import os
import pickle
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from imaging.errors import Cancelled, CheckpointError, TrainingDiverged
from models.checkpoint import (
    load_checkpoint,
    model_from_checkpoint,
    save_checkpoint,
    validate_checkpoint,
)
from models.config import PRESETS, DHVAEConfig, get_preset
from models.network import count_parameters
from models.registry import build_model
from models.train import fit

REPO = Path(__file__).resolve().parents[2]


SIZE = 32  # tests train at 32 x 32 (latent 3 x 4 x 4): same code paths, 16x less work than 128


def toy_data(n: int = 8, seed: int = 0, size: int = SIZE) -> torch.Tensor:
    """Bright discs on a dark background with the disc as mask: (n, 2, size, size) in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(float(size)), torch.arange(float(size)), indexing="ij")
    out = torch.zeros(n, 2, size, size)
    for i in range(n):
        cy, cx, r = (
            torch.rand(3, generator=g) * torch.tensor([0.45, 0.45, 0.12]) + torch.tensor([0.27, 0.27, 0.1])
        ).tolist()
        cy, cx, r = cy * size, cx * size, r * size
        disc = ((yy - cy) ** 2 + (xx - cx) ** 2 < r * r).float()
        out[i, 0] = 0.2 + 0.6 * disc + 0.05 * torch.rand(size, size, generator=g)
        out[i, 1] = disc
    return out


def tiny(steps: int, **over) -> DHVAEConfig:
    return get_preset("tiny").replace(**{"train.steps": steps, "network.image_size": SIZE, **over})


def train_tiny(tmp: Path, steps: int, seed: int = 0, **over) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = tiny(steps, **{"train.seed": seed, **over})
    model = build_model(cfg)
    fit(model, toy_data(), cfg, checkpoint=tmp / "last.pt")
    return model


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(
        torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )


def test_presets_shapes_and_parameter_counts():
    paper = get_preset("paper")
    assert paper.network.base_channels == 128 and paper.network.latent_dim == 3 * 16 * 16
    assert paper.train.batch_size == 16 and paper.train.lr == 4.5e-5 and paper.train.betas == (0.5, 0.9)
    m = build_model(paper)
    enc, dec, disc = (count_parameters(x) for x in (m.encoder, m.decoder, m.discriminator))
    assert 55e6 < enc + dec < 70e6  # "about 60 M parameters" (method.md)
    assert disc == 2_764_609  # PatchGAN 64-128-256-512-1, 4x4 kernels, no bias before BatchNorm
    x = torch.rand(1, 2, 128, 128)
    mu, logvar = m.encoder(x)
    assert mu.shape == logvar.shape == (1, 768)
    assert m.decoder(mu).shape == (1, 2, 128, 128)
    assert m.discriminator(x).shape == (1, 1, 14, 14)
    for name in PRESETS:
        assert DHVAEConfig.from_dict(get_preset(name).to_dict()) == get_preset(name)


def test_discriminator_learning_rate_follows_the_generator_unless_set():
    """method.md: AdamW for the generator, "the discriminator likewise"."""
    from models.train import _optimizers

    for name in PRESETS:
        t = get_preset(name).train
        assert t.discriminator_lr == t.lr
    raised = get_preset("small").replace(**{"train.lr": 2e-4})
    assert raised.train.discriminator_lr == 2e-4
    own = get_preset("tiny").replace(**{"train.disc_lr": 3e-5})
    opts = _optimizers(build_model(own), own)
    assert opts["generator"].param_groups[0]["lr"] == 1e-3
    assert opts["discriminator"].param_groups[0]["lr"] == 3e-5


@pytest.mark.slow  # seconds of training or of a large volume: CI runs it (make test)
def test_loss_decreases_on_tiny_data(tmp_path):
    torch.manual_seed(0)
    cfg = tiny(40, **{"loss.disc_start": 1000})
    model = build_model(cfg)
    seen = []
    fit(
        model,
        toy_data(),
        cfg,
        checkpoint=tmp_path / "c.pt",
        progress=lambda p: seen.append(p.metrics["hvae"]),
    )
    assert len(seen) == 40
    assert sum(seen[-5:]) / 5 < 0.8 * sum(seen[:5]) / 5


@pytest.mark.slow  # a subprocess or seconds of training: CI runs it (make test)
def test_same_seed_same_weights(tmp_path):
    a = train_tiny(tmp_path / "a", 6)
    b = train_tiny(tmp_path / "b", 6)
    c = train_tiny(tmp_path / "c", 6, seed=1)
    assert same_weights(a, b)
    assert not same_weights(a, c)


def test_checkpoint_round_trip(tmp_path):
    model = train_tiny(tmp_path, 3)
    loaded, payload = model_from_checkpoint(tmp_path / "last.pt")
    assert payload["step"] == 3 and payload["config_obj"] == tiny(3)
    assert same_weights(model, loaded)
    info = validate_checkpoint(tmp_path / "last.pt")
    assert info["preset"] == "tiny" and info["step"] == 3


@pytest.mark.slow  # seconds of training or of a large volume: CI runs it (make test)
def test_kill_and_resume_matches_uninterrupted(tmp_path):
    """SIGKILL a training process after step 7 (checkpoint every 5), resume here, compare to a straight run."""
    script = textwrap.dedent(
        f"""
        import os, signal, sys, torch
        sys.path.insert(0, {str(REPO)!r}); sys.path.insert(0, {str(Path(__file__).parent)!r})
        from pathlib import Path
        from test_train import toy_data, tiny
        from models.registry import build_model
        from models.train import fit
        torch.manual_seed(0)
        cfg = tiny(10, **{{"train.checkpoint_every": 5}})
        def hook(p):
            if p.done == 7:
                os.kill(os.getpid(), signal.SIGKILL)
        fit(build_model(cfg), toy_data(), cfg, checkpoint=Path(sys.argv[1]), progress=hook)
        """
    )
    ck = tmp_path / "killed" / "last.pt"
    # same thread count as this process: float reductions, hence weights, depend on it
    proc = subprocess.run(
        [sys.executable, "-c", script, str(ck)],
        env={**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())},
    )
    assert proc.returncode == -signal.SIGKILL
    assert load_checkpoint(ck)["step"] == 5
    torch.manual_seed(123)  # the resumed run must not depend on fresh initialisation
    cfg = tiny(10, **{"train.checkpoint_every": 5})
    resumed = build_model(cfg)
    fit(resumed, toy_data(), cfg, checkpoint=ck)
    straight = train_tiny(tmp_path / "straight", 10, **{"train.checkpoint_every": 5})
    assert same_weights(resumed, straight)


def test_nan_stops_and_keeps_last_good_checkpoint(tmp_path):
    torch.manual_seed(0)
    cfg = tiny(6, **{"train.checkpoint_every": 2})
    model = build_model(cfg)
    calls = {"n": 0}
    original = model.training_losses

    def poisoned(x, step, rng):
        out = original(x, step, rng)
        if step == 4:
            out.loss = out.loss * float("nan")
        return out

    model.training_losses = poisoned
    with pytest.raises(TrainingDiverged, match="step 4"):
        fit(model, toy_data(), cfg, checkpoint=tmp_path / "c.pt")
    assert load_checkpoint(tmp_path / "c.pt")["step"] == 4
    del calls


def test_cancel_between_steps(tmp_path):
    cfg = tiny(50)
    seen = []
    with pytest.raises(Cancelled):
        fit(
            build_model(cfg),
            toy_data(),
            cfg,
            checkpoint=tmp_path / "c.pt",
            progress=lambda p: seen.append(p.done),
            should_stop=lambda: len(seen) >= 3,
        )
    assert seen == [1, 2, 3]


def test_fine_tune_from_base_weights(tmp_path):
    base = train_tiny(tmp_path / "base", 4)
    cfg = tiny(2)
    ft = build_model(cfg)
    ft.load_state_dict(base.state_dict())
    fit(ft, toy_data(seed=5), cfg, checkpoint=tmp_path / "ft" / "last.pt")
    assert not same_weights(ft, base)


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/dhvae_pwned",))


def test_checkpoint_with_code_is_refused(tmp_path):
    bad = tmp_path / "evil.pt"
    with bad.open("wb") as f:
        pickle.dump({"format": "dhvae-checkpoint/1", "x": _Evil()}, f)
    with pytest.raises(CheckpointError):
        load_checkpoint(bad)
    assert not Path("/tmp/dhvae_pwned").exists()


def test_checkpoint_with_wrong_shapes_is_refused(tmp_path):
    model = build_model(tiny(1))
    cfg_other = tiny(1, **{"network.base_channels": 16})
    assert cfg_other.network.image_size == SIZE
    save_checkpoint(tmp_path / "m.pt", model=model, config=cfg_other, step=1)
    with pytest.raises(CheckpointError, match="do not fit"):
        validate_checkpoint(tmp_path / "m.pt")
