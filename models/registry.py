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

A donor insertion (:data:`DONOR_INSERTS`, our extension) is not a generator but a recipe on top of one:
it trains a generator (the dHVAE), samples ``donors`` of its pairs, and pastes their tumours into the
cohort's real slices (:func:`models.insert.iter_insert_pairs`), with the recipients of its real-donor
twin. ``insert_dhvae`` pastes into any brain slice (twin: ``insert``); ``insert_healthy_dhvae`` into
tumour-free slices only (twin: ``insert_healthy``). An augmentation can use every name of
:data:`AUGMENTATIONS`: the generators and the donor insertions.

A generator with a class is trained by :func:`models.train.fit` on a preset of ``models/config.py``
(``config.model`` is its name) and sampled by :func:`models.sampler.sample_pairs`; one without draws
its pairs from the real slices directly (``entry.draw(slices, n, seed)``, with ``slices`` an
:class:`imaging.preprocess.SliceSet`), by its ``drawer`` with its ``config`` (the recipe's settings, which
the export's manifest records). The order is the reports' order (baselines first).
To add a generator: a class with the interface of :class:`models.train.Trainable`, one entry here, and
its name in ``contract/schemas.py``'s ``Generator`` (the drift test says so if you forget).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import numpy as np
from torch import nn

from imaging.errors import DHVAEError

from .config import DHVAEConfig
from .dhvae import DHVAE
from .insert import (
    INSERT_VERSION,
    InsertConfig,
    draw_insert,
    iter_insert_pairs,
    recipient_slices,
)
from .lsgan import LSGAN
from .masks_first import MasksFirst
from .traditional import TraditionalAugConfig, draw_traditional

if TYPE_CHECKING:
    from .train import Trainable


@dataclass(frozen=True)
class GeneratorEntry:
    name: str
    description: str
    model_class: type[nn.Module] | None  # None: nothing to train (pairs come from the real slices)
    # (SliceSet, n, seed, config) -> the n pairs, (2, H, W) each, one at a time
    drawer: Callable[[Any, int, int, Any], Iterator[np.ndarray]] | None = None
    config: Any = None  # the drawer's settings (a dataclass), recorded in the export's manifest
    version: int = 1  # its drawing recipe's: a cache of pairs drawn by another version is stale

    @property
    def trained(self) -> bool:
        return self.model_class is not None

    def draw(self, slices: Any, n: int, seed: int) -> Iterator[np.ndarray]:
        """``n`` pairs ``(2, H, W)`` of a cohort's slices (a SliceSet), one at a time; a DHVAEError for a
        generator that is trained (it is sampled from its checkpoint instead)."""
        if self.drawer is None:
            raise DHVAEError(f"generator {self.name!r} is trained: use train() and generate()")
        return self.drawer(slices, n, seed, self.config)


REGISTRY: dict[str, GeneratorEntry] = {
    e.name: e
    for e in (
        GeneratorEntry(
            "traditional",
            "flips and rotations of the real slices",
            None,
            draw_traditional,
            TraditionalAugConfig(),
        ),
        GeneratorEntry(
            "insert",
            "real tumours pasted into other slices of the training patients (TumorCP / CarveMix-like)",
            None,
            draw_insert,
            InsertConfig(recipients="any"),
            INSERT_VERSION,
        ),
        GeneratorEntry(
            "insert_healthy",
            "real tumours pasted into tumour-free slices of the training patients only (our extension)",
            None,
            draw_insert,
            InsertConfig(recipients="tumour_free"),
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


@dataclass(frozen=True)
class DonorInsert:
    """A trained generator's tumours pasted into the cohort's real slices (see the module's docstring)."""

    name: str
    twin: str  # the registry's recipe that pastes real tumours into the same recipients
    donor: str = "dhvae"  # the generator trained for its tumours
    # generator pairs sampled for their tumours: at most this many, fewer when fewer pairs are asked
    # (the efficacy grid's N = 500: one donor per pair); so memory does not grow with the pairs asked
    donors: int = 500

    @property
    def config(self) -> InsertConfig:
        """The paste's settings: its twin's, so the two differ in their donors only."""
        return cast(InsertConfig, REGISTRY[self.twin].config)

    @property
    def version(self) -> int:
        """The paste's recipe version: its twin's (a cache of pairs pasted by another is stale)."""
        return REGISTRY[self.twin].version

    def donor_count(self, n_pairs: int) -> int:
        return min(n_pairs, self.donors)

    def pairs(self, donors: np.ndarray, cases: Any, n: int, *, seed: int) -> Iterator[np.ndarray]:
        """``n`` pairs ``(2, H, W)``, one at a time: the tumours of ``donors`` (the generator's pairs)
        pasted into the recipient slices of ``cases`` (ResampledCase-like)."""
        cfg = self.config
        return iter_insert_pairs(donors, recipient_slices(cases, cfg), n, seed=seed, cfg=cfg)


DONOR_INSERTS: dict[str, DonorInsert] = {
    d.name: d
    for d in (
        DonorInsert("insert_dhvae", twin="insert"),
        DonorInsert("insert_healthy_dhvae", twin="insert_healthy"),
    )
}
AUGMENTATIONS: tuple[str, ...] = (*GENERATORS, *DONOR_INSERTS)  # what an augmentation can use


def trained_generator(name: str) -> str | None:
    """The generator an augmentation by ``name`` (of :data:`AUGMENTATIONS`) trains, or None if it trains
    nothing; a DHVAEError naming the choices if ``name`` is neither a generator nor a donor insertion."""
    if name in DONOR_INSERTS:
        return DONOR_INSERTS[name].donor
    if name not in REGISTRY:
        raise DHVAEError(f"unknown method {name!r}; choose one of {', '.join(AUGMENTATIONS)}")
    return name if REGISTRY[name].trained else None


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
