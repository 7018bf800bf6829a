"""Tumour insertion (models/insert.py): shapes, binary masks inside the brain, determinism, errors."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from scipy import ndimage

from models.insert import InsertConfig, OnlineInsert, brain_mask, insert_pairs, recipient_slices
from models.registry import get_generator


def _slices(n: int, size: int = 48, seed: int = 0, tumour: bool = True) -> np.ndarray:
    """Disc-shaped 'brains' (intensity 0.4-0.6) with a bright round tumour, background 0."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    out = np.zeros((n, 2, size, size), np.float32)
    for i in range(n):
        brain = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size * 0.42) ** 2
        out[i, 0] = brain * rng.uniform(0.4, 0.6)
        if tumour:
            cy, cx, r = rng.integers(18, 30), rng.integers(18, 30), rng.integers(4, 7)
            t = ((yy - cy) ** 2 + (xx - cx) ** 2 < r**2) & brain
            out[i, 0][t] = 0.9
            out[i, 1] = t
    return out


def _volume(slices: np.ndarray) -> SimpleNamespace:
    """A case (ResampledCase-like: ``image``/``mask`` ``(H, W, D)``) whose axial slices are ``slices``."""
    return SimpleNamespace(
        image=np.moveaxis(slices[:, 0], 0, -1), mask=np.moveaxis(slices[:, 1], 0, -1) > 0.5
    )


CFG = InsertConfig(patch=32, min_area=10)


def test_pairs_are_binary_inside_the_brain_and_deterministic():
    donors, recipients = _slices(6), _slices(5, seed=1, tumour=False)
    pairs = insert_pairs(donors, recipients, 12, seed=3, cfg=CFG)
    assert pairs.shape == (12, 2, 48, 48) and pairs.dtype == np.float32
    assert set(np.unique(pairs[:, 1])) == {0.0, 1.0}
    for p in pairs:
        brain = brain_mask(p[0])
        assert p[1].sum() >= CFG.min_area  # every pair has a pasted tumour
        assert not (p[1].astype(bool) & ~brain).any()  # the tumour lies in the brain
        assert (p[0][~brain_mask(recipients[0, 0])] == 0).all()  # the background stays zero
        assert 0.0 <= p[0].min() and p[0].max() <= 1.0
    np.testing.assert_array_equal(pairs, insert_pairs(donors, recipients, 12, seed=3, cfg=CFG))
    assert not np.array_equal(pairs, insert_pairs(donors, recipients, 12, seed=4, cfg=CFG))
    # a prefix of a longer draw is the shorter draw
    np.testing.assert_array_equal(pairs[:5], insert_pairs(donors, recipients, 5, seed=3, cfg=CFG))


def test_recipient_keeps_its_own_tumour():
    donors, recipients = _slices(4), _slices(3, seed=5)
    pairs = insert_pairs(donors, recipients, 6, seed=0, cfg=CFG)
    for p in pairs:
        own = [r for r in recipients if np.array_equal(r[0] > 0, p[0] > 0)]
        assert any((p[1] >= r[1]).all() for r in own)  # the recipient's mask is kept, the paste added


def test_recipients_include_tumour_free_brain_slices_only_with_brain():
    class Case:
        image = np.zeros((48, 48, 4), np.float32)
        mask = np.zeros((48, 48, 4), np.uint8)

    c = Case()
    c.image[..., 1:3] = np.moveaxis(_slices(2, tumour=False)[:, 0], 0, -1)
    rec = recipient_slices([c])
    assert rec.shape == (2, 2, 48, 48) and rec[:, 1].sum() == 0


def test_each_kind_of_recipient_takes_its_slices_only():
    case = _volume(np.concatenate([_slices(2, seed=1), _slices(3, seed=2, tumour=False)]))
    areas = {
        kind: recipient_slices([case], InsertConfig(recipients=kind))[:, 1].sum((1, 2))
        for kind in ("any", "tumour_free", "tumour")
    }
    assert len(areas["any"]) == 5
    assert len(areas["tumour_free"]) == 3 and (areas["tumour_free"] == 0).all()
    assert len(areas["tumour"]) == 2 and (areas["tumour"] > 0).all()
    with pytest.raises(ValueError, match="no tumour slice"):
        recipient_slices([_volume(_slices(3, tumour=False))], InsertConfig(recipients="tumour"))


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="no donor"):
        insert_pairs(_slices(2, tumour=False), _slices(2, tumour=False), 1, seed=0, cfg=CFG)
    with pytest.raises(ValueError, match="recipients must be"):
        insert_pairs(_slices(2), np.zeros((0, 2, 48, 48)), 1, seed=0, cfg=CFG)


def test_online_insert_pastes_with_probability_p_deterministically():
    donors = _slices(4)
    batch = torch.from_numpy(_slices(8, seed=9, tumour=False))
    always = OnlineInsert(donors, p=1.0, cfg=CFG)
    out = always(batch, 0, 0)
    assert out.shape == batch.shape and (out[:, 1].sum((1, 2)) > 0).all()
    torch.testing.assert_close(out, always(batch, 0, 0))
    torch.testing.assert_close(OnlineInsert(donors, p=0.0, cfg=CFG)(batch, 0, 0), batch)


def test_online_insert_into_tumour_slices_leaves_the_tumour_free_ones_clean():
    lesional = torch.from_numpy(_slices(4, seed=9))
    clean = torch.from_numpy(_slices(4, seed=11, tumour=False))
    batch = torch.cat([lesional, clean])
    out = OnlineInsert(_slices(4), p=1.0, cfg=InsertConfig(patch=32, min_area=10, recipients="tumour"))(
        batch, 0, 0
    )
    torch.testing.assert_close(out[4:], clean)  # the negatives are untouched
    assert (out[:4, 1].sum((1, 2)) > lesional[:, 1].sum((1, 2))).all()  # every tumour slice took a paste


def test_registry_draws_insert_from_a_slice_set():
    class SliceSet:
        slices = _slices(4)

        class _C:
            image = np.moveaxis(_slices(3, tumour=False)[:, 0], 0, -1)
            mask = np.zeros((48, 48, 3), np.uint8)

        cases = [_C()]

    entry = get_generator("insert")
    assert not entry.trained
    pairs = np.stack(list(entry.draw(SliceSet(), 3, 0)))
    assert pairs.shape == (3, 2, 48, 48)


def test_poisson_blend_keeps_the_source_texture_and_the_target_border():
    from models.insert import poisson_blend

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:24, :24]
    region = (yy - 12) ** 2 + (xx - 12) ** 2 < 36
    target = np.full((24, 24), 0.3, np.float32)
    texture = 0.05 * rng.standard_normal((24, 24)).astype(np.float32)
    source = 0.8 + texture  # a bright tumour with texture, on another level
    out = poisson_blend(source, target, region)
    np.testing.assert_array_equal(out[~region], target[~region])  # nothing moves outside the region
    # inside: the source up to a smooth offset, so its texture (a Laplacian) is kept exactly
    lap = lambda a: 4 * a[1:-1, 1:-1] - a[:-2, 1:-1] - a[2:, 1:-1] - a[1:-1, :-2] - a[1:-1, 2:]  # noqa: E731
    inner = ndimage.binary_erosion(region)[1:-1, 1:-1]
    np.testing.assert_allclose(lap(out)[inner], lap(source)[inner], atol=1e-4)
    assert abs(float(out[region].mean()) - 0.3) < 0.1  # the level comes from the target's border
    # the same (source = target): identity
    np.testing.assert_allclose(poisson_blend(target, target, region), target, atol=1e-6)


def test_poisson_insertion_is_binary_inside_the_brain_and_deterministic():
    cfg = InsertConfig(patch=32, min_area=10, blend="poisson")
    donors, recipients = _slices(4), _slices(3, seed=1, tumour=False)
    pairs = insert_pairs(donors, recipients, 6, seed=3, cfg=cfg)
    assert set(np.unique(pairs[:, 1])) == {0.0, 1.0} and 0.0 <= pairs[:, 0].min() <= pairs[:, 0].max() <= 1.0
    for p in pairs:
        assert not (p[1].astype(bool) & ~brain_mask(p[0])).any()
    np.testing.assert_array_equal(pairs, insert_pairs(donors, recipients, 6, seed=3, cfg=cfg))
    assert not np.array_equal(pairs[:, 0], insert_pairs(donors, recipients, 6, seed=3, cfg=CFG)[:, 0])


def test_insert_healthy_pastes_one_tumour_into_tumour_free_slices_only():
    """``insert_healthy`` (recipients = "tumour_free"): a recipient never carries a tumour of its own,
    so every pair holds exactly the pasted one (one component, its area near the donor's); ``insert``
    (any recipient) may add a second tumour to a tumour slice."""
    tumour_slices = _slices(3, seed=5)
    free = _slices(3, seed=6, tumour=False)

    interleaved = np.stack([tumour_slices, free], 1).reshape(6, 2, 48, 48)
    case = _volume(interleaved)  # 3 tumour slices and 3 tumour-free ones, interleaved

    healthy = recipient_slices([case], InsertConfig(recipients="tumour_free"))
    assert len(healthy) == 3 and not healthy[:, 1].any()
    assert len(recipient_slices([case])) == 6

    class SliceSet:
        slices = _slices(4)
        cases = [case]

    def draw(name: str) -> np.ndarray:
        return np.stack(list(get_generator(name).draw(SliceSet(), 8, 0)))

    pairs = draw("insert_healthy")
    assert pairs.shape == (8, 2, 48, 48) and set(np.unique(pairs[:, 1])) == {0.0, 1.0}
    for p in pairs:
        assert ndimage.label(p[1] > 0.5)[1] == 1  # the pasted tumour, and nothing of the recipient's
        assert (p[1] > 0.5)[~brain_mask(p[0])].sum() == 0
        # the recipient is one of the tumour-free slices (outside the pasted tumour's feathered edge)
        away = ~ndimage.binary_dilation(p[1] > 0.5, iterations=10)
        assert min(np.abs(p[0] - h[0])[away].max() for h in healthy) < 1e-3
    np.testing.assert_array_equal(pairs, draw("insert_healthy"))
    anywhere = draw("insert")
    assert max(ndimage.label(p[1] > 0.5)[1] for p in anywhere) == 2  # a tumour slice got a second one
    with pytest.raises(ValueError, match="no tumour-free slice"):
        recipient_slices([_volume(interleaved[::2])], InsertConfig(recipients="tumour_free"))  # tumours only


def test_the_ring_match_dims_a_haloed_tumour_and_match_none_keeps_its_intensities():
    """A donor tumour inside a bright halo (FLAIR's peritumoural tissue), pasted into a uniform brain:
    the ring match scales it by the halo (0.3 / 0.6), ``match="none"`` keeps the donor's values."""
    size, yy, xx = 48, *np.mgrid[:48, :48]
    brain = (yy - 24) ** 2 + (xx - 24) ** 2 < 20**2
    r2 = (yy - 24) ** 2 + (xx - 24) ** 2
    donor = np.zeros((1, 2, size, size), np.float32)
    donor[0, 0] = brain * 0.3
    donor[0, 0][r2 < 10**2] = 0.6  # the halo
    donor[0, 0][r2 < 5**2] = 0.9
    donor[0, 1] = r2 < 5**2
    recipient = np.zeros((1, 2, size, size), np.float32)
    recipient[0, 0] = brain * 0.3

    def core_intensity(match: str) -> float:
        cfg = InsertConfig(patch=32, min_area=10, scale=0.0, elastic_magnitude=0.0, match=match)  # type: ignore[arg-type]
        pairs = insert_pairs(donor, recipient, 6, seed=0, cfg=cfg)
        return float(np.mean([p[0][ndimage.binary_erosion(p[1] > 0.5, iterations=1)].mean() for p in pairs]))

    assert abs(core_intensity("ring") - 0.45) < 0.05  # 0.9 scaled by the halo: 0.5
    assert abs(core_intensity("none") - 0.9) < 0.03
    assert InsertConfig().match == "ring"  # the committed runs' recipe stays the default


def test_the_pasted_mask_covers_the_pasted_tumour_under_rotation():
    """An elongated tumour, rotated and deformed: its mask must move with its image (one draw for both;
    MONAI's array Rand2DElastic draws again at every call, which once rotated them apart)."""
    size, yy, xx = 64, *np.mgrid[:64, :64]
    brain = (yy - 32) ** 2 + (xx - 32) ** 2 < 28**2
    donor = np.zeros((1, 2, size, size), np.float32)
    donor[0, 0] = brain * 0.3
    bar = (abs(yy - 32) < 3) & (abs(xx - 32) < 14)
    donor[0, 0][bar], donor[0, 1] = 0.9, bar
    recipient = np.zeros((1, 2, size, size), np.float32)
    recipient[0, 0] = brain * 0.3
    cfg = InsertConfig(patch=48, min_area=10)
    for p in insert_pairs(donor, recipient, 12, seed=0, cfg=cfg):
        mask, bright = p[1] > 0.5, p[0] > 0.6
        assert (mask & bright).sum() >= 0.85 * mask.sum()  # the mask is on the tumour ...
        assert (
            bright & ~ndimage.binary_dilation(mask, iterations=2)
        ).sum() <= 0.05 * bright.sum()  # ... all of it
