"""Typed configuration of the dHVAE: network, Hamiltonian flow, losses, training, sampling; and presets.

Every choice that the paper (Kebaili et al. 2024) and the authors' code leave open is a field here, with
the reason for its default. ``../shared/docs/method.md`` is the reference for every "method.md" below.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal


@dataclass(frozen=True)
class NetworkConfig:
    """The four-block residual/attention encoder-decoder with a spatial latent (method.md, "Network")."""

    in_channels: int = 2  # [image, mask]
    image_size: int = 128  # square slices, H = W
    base_channels: int = 128  # C; about 60 M parameters at 128 (the paper)
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)  # one entry per block; the first len-1 blocks downsample
    num_res_blocks: int = 2
    z_channels: int = 3  # latent 3 x 16 x 16 = 768 at 128 x 128
    num_groups: int = 32  # GroupNorm(32); clipped to the block width for narrow presets
    attn_heads: int = 1  # single-head spatial self-attention as in VQGAN's AttnBlock
    logvar_clamp: tuple[float, float] = (-30.0, 20.0)

    @property
    def latent_size(self) -> int:
        return self.image_size // 2 ** (len(self.channel_mult) - 1)

    @property
    def latent_dim(self) -> int:
        return self.z_channels * self.latent_size**2


@dataclass(frozen=True)
class FlowConfig:
    """The Hamiltonian flow of HVAE (Caterini et al. 2018) as used by the authors (method.md)."""

    n_leapfrog: int = 3  # K
    step_size: float = 1e-3  # eps
    beta0: float = 0.3
    # method.md: the paper writes rho0 = gamma / sqrt(beta0); the authors' code feeds 0.3 directly as
    # sqrt(beta0) (so beta0 = 0.09 in effect). "paper" takes sqrt(0.3); "code" takes 0.3 itself.
    beta0_convention: Literal["paper", "code"] = "paper"
    tempering: bool = True

    @property
    def sqrt_beta0(self) -> float:
        return self.beta0**0.5 if self.beta0_convention == "paper" else self.beta0


@dataclass(frozen=True)
class LossConfig:
    """The joint objective L = (1 - alpha) L_HVAE + alpha (L_rec + lambda g) (method.md)."""

    # method.md: alpha = 0.05 in the authors' code; the paper reports {0.1, 0.01, 0.001}, 0.01 best, and
    # the two scales may differ by a factor of 5. Default: the code's value, whose scale our losses share.
    alpha: float = 0.05
    discriminative: bool = True  # False gives the plain HVAE baseline (no L_rec, no discriminator)
    perceptual: Literal["vgg16", "none"] = "vgg16"
    perceptual_weight: float = 1.0
    # LPIPS expects inputs in [-1, 1]. The authors feed their [0, 1] slices to it unchanged ("signed":
    # taken as already signed, no mapping); "unit" maps 2x - 1 first, LPIPS's own convention.
    perceptual_input_range: Literal["unit", "signed"] = "signed"
    # Step at which the adversarial branch (lambda g and the discriminator's update) switches on.
    # Not fixed by method.md; taming's VQGAN uses tens of thousands of steps for ImageNet, while a user's
    # cohort of ~100 slices is fine-tuned for hundreds of steps, so each preset sets its own.
    disc_start: int = 2000
    disc_weight: float = 1.0
    adaptive_weight_max: float = 1e4
    # "full": both gradients w.r.t. the last decoder conv weight through the whole graph (the authors'
    # code; that weight sits in every leapfrog decode, so each costs nearly a full second-order backward).
    # "final_decode": the same norm ratio, with the weight's use in the final decode only (z_K held
    # fixed). A heuristic weight either way; tests/models/test_losses.py compares the two.
    adaptive_weight: Literal["full", "final_decode"] = "final_decode"


@dataclass(frozen=True)
class DiscriminatorConfig:
    """PatchGAN on the 2-channel pair (method.md): 14 x 14 logits at 128 x 128."""

    base_channels: int = 64
    n_layers: int = 3


@dataclass(frozen=True)
class MasksFirstConfig:
    """The masks-first generator ``spade`` (models/masks_first.py; our extension, issue 11 B.2). Unused by
    the paper's models. Widths come from ``network`` (base_channels x channel_mult), the critic from
    ``discriminator``, the adversarial start from ``loss.disc_start``."""

    z_dim: int = 32  # SPADE's style code (MONAI SPADENet, VAE mode)
    bank_size: int = 512  # training label maps kept (reservoir) to draw masks and brains from
    l1_weight: float = 1.0  # |image - rendered image|
    kl_weight: float = 0.05  # KL of the style code
    adv_weight: float = 0.1  # least-squares GAN on the [image, mask] pair (after loss.disc_start)
    # a drawn tumour's area: log-uniform from lo x the smallest to hi x the largest training tumour, so the
    # sizes that are rare in the cohort come as often as the common ones
    area_range: tuple[float, float] = (0.7, 1.4)
    elastic_px: float = 2.0  # amplitude of a drawn mask's smooth random displacement (px at 128 x 128)


@dataclass(frozen=True)
class TrainConfig:
    """AdamW for generator and discriminator, no scheduler (method.md, "Optimisation")."""

    batch_size: int = 16
    lr: float = 4.5e-5
    betas: tuple[float, float] = (0.5, 0.9)
    weight_decay: float = 0.01  # torch's AdamW default; method.md does not fix it
    # None: the generator's lr (method.md: "the discriminator likewise"), so a preset or an override
    # that raises ``lr`` raises both. Before 2026-12-01 the small and tiny presets raised lr alone
    # (discriminator 10-20x slower); set a number to get that back.
    disc_lr: float | None = None
    steps: int = 1000
    seed: int = 0
    checkpoint_every: int = 50  # steps; a killed run loses at most this many
    channels_last: bool = False  # faster convolutions on some CPUs/GPUs; numerically equivalent
    # "fp32": the paper's precision. "bf16": autocast to bfloat16 for the forward passes (GPUs, and
    # CPUs with AMX / AVX512-BF16, where it is ~1.6x faster; losses agree to ~1e-4 relative).
    # "auto": bf16 where the hardware runs it natively, else fp32.
    precision: Literal["fp32", "bf16", "auto"] = "fp32"

    @property
    def discriminator_lr(self) -> float:
        return self.lr if self.disc_lr is None else self.disc_lr


@dataclass(frozen=True)
class SamplingConfig:
    """Prior sampling with rejection of near-empty masks (method.md, "Sampling")."""

    batch_size: int = 32  # fixed: it is part of what makes a seed reproduce the same pairs
    mask_threshold: float = 0.5
    min_mask_area: int | None = None  # None: 200 px at 128 x 128, scaled with the slice area
    max_draws_factor: int = 50  # give up after max(1000, factor * n) draws
    min_draws: int = 1000
    channels_last: bool = True  # NHWC decoding: ~2x faster convolutions on CPU (oneDNN), same maths

    def area_floor(self, image_size: int) -> int:
        if self.min_mask_area is not None:
            return self.min_mask_area
        return round(200 * image_size**2 / 128**2)


@dataclass(frozen=True)
class DHVAEConfig:
    """Everything that defines a trained model; stored inside every checkpoint."""

    model: str = "dhvae"  # a trained generator of models/registry.py
    network: NetworkConfig = field(default_factory=NetworkConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    discriminator: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    masks_first: MasksFirstConfig = field(default_factory=MasksFirstConfig)
    preset: str = "custom"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DHVAEConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error (a checkpoint from elsewhere)."""
        return _from_dict(cls, data)

    def replace(self, **overrides: Any) -> DHVAEConfig:
        """Return a copy with dotted overrides applied, e.g. ``{"train.steps": 30, "loss.alpha": 0.01}``."""
        data = self.to_dict()
        for key, value in overrides.items():
            node = data
            *parents, leaf = key.split(".")
            for p in parents:
                if p not in node or not isinstance(node[p], dict):
                    raise KeyError(f"unknown config field {key!r}")
                node = node[p]
            if leaf not in node:
                raise KeyError(f"unknown config field {key!r}")
            node[leaf] = value
        return DHVAEConfig.from_dict(data)


def _from_dict(cls: type, data: dict[str, Any]) -> Any:
    if not isinstance(data, dict):
        raise TypeError(f"{cls.__name__}: expected a mapping, got {type(data).__name__}")
    known = {f.name: f for f in fields(cls)}
    unknown = set(data) - set(known)
    if unknown:
        raise KeyError(f"{cls.__name__}: unknown field(s) {sorted(unknown)}")
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        factory = known[name].default_factory
        sub = type(factory()) if callable(factory) else None
        if sub is not None and dataclasses.is_dataclass(sub):
            kwargs[name] = _from_dict(sub, value)
        elif isinstance(value, list):
            kwargs[name] = tuple(value)
        else:
            kwargs[name] = value
    return cls(**kwargs)


# --- presets --------------------------------------------------------------------------------------


def _preset(name: str, **sections: Any) -> DHVAEConfig:
    base = DHVAEConfig()
    return dataclasses.replace(
        base,
        preset=name,
        **{k: dataclasses.replace(getattr(base, k), **v) for k, v in sections.items()},
    )


PRESETS: dict[str, DHVAEConfig] = {
    # The paper's configuration: C = 128, batch 16, ~60 M parameters. GPU territory.
    "paper": _preset("paper"),
    # Trainable on ~100 real slices in 30 minutes on 2 CPU cores, with every loss term of the paper
    # (LPIPS-VGG16 included): C = 16 and one residual block per level (the paper's topology otherwise),
    # batch 4: 0.81 s per step under bf16 on a 2-core AVX512-BF16 CPU, ~2200 steps in 30 minutes
    # (bench/results/small_quality.md). The former small (C = 32, batch 8) took 23 s per step in fp32 on
    # a 2-core AVX2 CPU: 71 steps in 19 minutes, blobs.
    "small": _preset(
        "small",
        network={"base_channels": 16, "num_res_blocks": 1},
        loss={"disc_start": 500},
        train={"batch_size": 4, "lr": 5e-4, "checkpoint_every": 100, "precision": "auto"},
    ),
    # For tests and smoke runs: a few steps in seconds. Same topology, tiny widths, no perceptual net.
    "tiny": _preset(
        "tiny",
        network={"base_channels": 8, "channel_mult": (1, 2, 2, 2), "num_res_blocks": 1, "num_groups": 4},
        loss={"disc_start": 5, "perceptual": "none"},
        discriminator={"base_channels": 8},
        train={"batch_size": 4, "lr": 1e-3, "checkpoint_every": 10},
    ),
}


def get_preset(name: str) -> DHVAEConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise KeyError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None
