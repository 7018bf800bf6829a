"""The wire format's names (contract/schemas.py imports nothing of ours) against the engine's
declarations of the same names: a generator, preset, protocol or U-Net width added on one side only
fails here, as a stale openapi/openapi.json fails tests/service/test_openapi.py."""

from __future__ import annotations

from typing import get_args, get_type_hints

from contract import schemas
from efficacy.segmenter import OPTIMIZER_LR, PROTOCOLS, UNET_WIDTHS, SegmenterConfig
from models.config import PRESETS
from models.registry import AUGMENTATIONS, DEFAULT, DONOR_INSERTS, GENERATORS, REGISTRY, TRAINED


def test_generator_names_are_the_registry_s():
    assert set(get_args(schemas.Generator)) == set(TRAINED)  # what a training can fit
    assert set(get_args(schemas.Baseline)) == set(GENERATORS) - {DEFAULT}  # what an evaluation compares
    assert schemas.TrainingRequest.model_fields["model"].default == DEFAULT
    assert set(get_args(schemas.Method)) == set(AUGMENTATIONS)  # what an augmentation can use
    assert schemas.DONOR_OF == {name: d.donor for name, d in DONOR_INSERTS.items()}
    assert set(schemas.UNTRAINED) == set(get_args(schemas.Untrained)) == set(GENERATORS) - set(TRAINED)


def test_registry_entries_build_what_they_name():
    for name in TRAINED:
        cfg = PRESETS["tiny"].replace(model=name)
        assert isinstance(REGISTRY[name].model_class(cfg), REGISTRY[name].model_class)


def test_crossval_arms_are_efficacy_s():
    from efficacy.crossval import ARMS, REFERENCE, CVConfig

    assert set(get_args(schemas.Arm)) == set(ARMS) and REFERENCE in get_args(schemas.Arm)
    assert schemas.EvaluationRequest.model_fields["arms"].default == list(CVConfig().arms)
    # a recommendation's method (its arm's offline pairs) is one POST /v1/augmentations accepts
    assert {a.method for a in ARMS.values()} - {"none"} <= set(get_args(schemas.Method))


def test_presets_protocols_and_unet_widths():
    assert set(get_args(schemas.Preset)) == set(PRESETS)
    assert set(get_args(schemas.Protocol)) == set(PROTOCOLS)
    assert set(get_args(schemas.UnetWidths)) == set(UNET_WIDTHS)


def test_unet_optimizers_are_the_segmenter_s():
    wire = schemas.EvaluationRequest.model_fields["unet_optimizer"]
    engine = get_type_hints(SegmenterConfig)["optimizer"]
    assert set(get_args(wire.annotation)) == set(OPTIMIZER_LR) == set(get_args(engine))
    assert wire.default == SegmenterConfig().optimizer
