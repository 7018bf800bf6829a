"""Every generator by name: the one list the CLI, the pipeline, the service's contract and the efficacy
grid select from (``contract.schemas.Generator`` / ``Baseline`` are checked against it by a test).

=============  ==============================================================  =========================
name           what it is                                                      class
=============  ==============================================================  =========================
traditional    flips and rotations of the real slices; nothing is trained      (``models.traditional``)
insert         real tumours pasted into other slices (our extension)           (``models.insert``)
insert_healthy ... into tumour-free slices only (our extension)                (``models.insert``)
vae            the paper's VAE baseline: no flow, analytic KL                  :class:`models.dhvae.DHVAE`
hvae           the paper's HVAE baseline: the flow, no discriminative term     :class:`models.dhvae.DHVAE`
lsgan          the paper's GAN baseline: decoder as generator, PatchGAN critic :class:`models.lsgan.LSGAN`
dhvae          the paper's method (the default)                                :class:`models.dhvae.DHVAE`
spade          masks first: a real mask moved and resized, an image rendered   :class:`models.masks_first.MasksFirst`
               for it by MONAI's SPADE network (our extension)
=============  ==============================================================  =========================

A generator with a class is trained by :func:`models.train.fit` on a preset of ``models/config.py``
(``config.model`` is its name) and sampled by :func:`models.sampler.sample_pairs`; one without draws
its pairs from the real slices directly (``draw(slices, n, seed)``, with ``slices`` an
:class:`imaging.preprocess.SliceSet`). The order is the reports' order (baselines first).
To add a generator: a class with the interface of :class:`models.train.Trainable`, one entry here, and
its name in ``contract/schemas.py``'s ``Generator`` (the drift test says so if you forget).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import numpy as np
from torch import nn

from imaging.errors import DHVAEError

from .config import DHVAEConfig
from .dhvae import DHVAE
from .insert import INSERT_VERSION, draw_insert, draw_insert_healthy
from .lsgan import LSGAN
from .masks_first import MasksFirst
from .traditional import draw_traditional

if TYPE_CHECKING:
    from .train import Trainable


@dataclass(frozen=True)
class GeneratorEntry:
    name: str
    description: str
    model_class: type[nn.Module] | None  # None: nothing to train (pairs come from the real slices)
    draw: Callable[[Any, int, int], np.ndarray] | None = None  # (SliceSet, n, seed) -> (n, 2, H, W) pairs
    version: int = 1  # its drawing recipe's: a cache of pairs drawn by another version is stale

    @property
    def trained(self) -> bool:
        return self.model_class is not None


REGISTRY: dict[str, GeneratorEntry] = {
    e.name: e
    for e in (
        GeneratorEntry("traditional", "flips and rotations of the real slices", None, draw_traditional),
        GeneratorEntry(
            "insert",
            "real tumours pasted into other slices of the training patients (TumorCP / CarveMix-like)",
            None,
            draw_insert,
            INSERT_VERSION,
        ),
        GeneratorEntry(
            "insert_healthy",
            "real tumours pasted into tumour-free slices of the training patients only (our extension)",
            None,
            draw_insert_healthy,
            INSERT_VERSION,
        ),
        GeneratorEntry("vae", "VAE baseline (no flow)", DHVAE),
        GeneratorEntry("hvae", "HVAE baseline (no discriminative regulariser)", DHVAE),
        GeneratorEntry("lsgan", "least-squares GAN baseline", LSGAN),
        GeneratorEntry("dhvae", "discriminative Hamiltonian VAE (the paper's method)", DHVAE),
        GeneratorEntry(
            "spade",
            "masks first: real masks moved and resized, images rendered by a SPADE network",
            MasksFirst,
        ),
    )
}
GENERATORS: tuple[str, ...] = tuple(REGISTRY)
TRAINED: tuple[str, ...] = tuple(name for name, e in REGISTRY.items() if e.trained)
DEFAULT = "dhvae"


def get_generator(name: str) -> GeneratorEntry:
    """The entry of ``name``; a DHVAEError naming the choices if there is none."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise DHVAEError(f"unknown generator {name!r}; choose one of {', '.join(GENERATORS)}") from None


def build_model(config: DHVAEConfig) -> Trainable:
    """The network a config describes (``config.model`` names a trained generator)."""
    entry = get_generator(config.model)
    if entry.model_class is None:
        raise DHVAEError(f"generator {config.model!r} has no network to build: nothing is trained")
    return cast("Trainable", entry.model_class(config))
