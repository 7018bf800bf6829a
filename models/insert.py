"""Tumour insertion: paste tumours, with their masks, into other slices of the training patients.

Our extension beyond the paper (issue 11, B.1), after TumorCP and CarveMix: the pairs carry real
(or generated) tumours in new places, on new backgrounds, tumour-free slices included, so a U-Net sees
more tumour/context combinations than the cohort holds. One insertion (:func:`insert_one`):

1. **cut**: a square patch of ``patch`` px centred on the donor's tumour (centre of mass), image and mask;
   the donor's other tissue in the patch is kept only where the blend below lets it through;
2. **deform**: one MONAI ``Rand2DElasticd`` draw on the patch, the same for its image and labels
   (rotation uniform in 360 deg, scale ``1 +- scale`` per axis, an elastic displacement), bilinear for
   the image, nearest for the mask;
3. **place**: a centre drawn among the recipient's brain pixels (the filled foreground, image > 0)
   such that at least ``inside`` of the new tumour lies in the brain and it overlaps the recipient's own
   tumour (if any) by at most ``max_overlap``; the mask is then cut to the brain;
4. **match**, ``match="ring"`` (default): the patch's intensities are scaled by the ratio of the
   recipient's to the donor's mean tissue intensity in a ring around the tumour, so that the tumour
   keeps its contrast to its new surroundings; ``match="none"``: the patch keeps its intensities (the
   preprocessing has normalised every volume already). On the shared cases the ring match dims pasted
   tumours and saturates them at 1: FLAIR's peritumoural tissue is bright, and a scale above 1 pushes a
   bright tumour past the image range (``bench/results/insert_diagnostics.md``);
5. **blend**, ``blend="feathered"`` (default): ``alpha`` is 1 on the tumour and falls off over
   ``feather`` px outside it (a Gaussian of the dilated mask), times the recipient's brain mask, so
   nothing lands on background: ``image = alpha * patch + (1 - alpha) * recipient``.
   ``blend="poisson"`` (Pérez et al. 2003, :func:`poisson_blend`): on the tumour dilated by 2 px (in
   the brain), the image whose Laplacian is the patch's and which equals the recipient on the region's
   border, so the tumour's texture is kept and its edge takes the recipient's level.
   The new mask is the recipient's mask OR the pasted one.

Two sources of tumours, one function: the training patients' real tumour slices (``insert``, the
copy-paste baseline) or a generator's pairs (the efficacy grid's ``insert_dhvae`` and
``insert_healthy_dhvae``: dHVAE tumours in real slices). Three kinds of recipient (``recipients``): every
brain slice (``insert``: two thirds of them carry a tumour already, so a pair's median tumour area is
1.9-2.0x a real slice's on the shared cases), or the tumour-free slices only (``insert_healthy``, after
Tumor Fabrication: one tumour per pair, as in the cohort, on a background no real pair shows), or the
slices that carry a tumour already (``"tumour"``, the efficacy grid's ``insert_online_tumour``: the
tumour-free slices stay the clean negatives the cohort has). Reproducible: pair ``i`` of
:func:`insert_pairs` depends on (seed, i) and the inputs only.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy import ndimage

# Bumped whenever the same inputs and seed give other pairs, so that results of an older insertion are
# not taken for this one's: 2 = one deformation draw for a tumour's image and mask (version 1 drew
# them apart: its pasted masks were rotated away from their tumours).
INSERT_VERSION = 2


Recipients = Literal["any", "tumour_free", "tumour"]


def receives(recipients: Recipients, has_tumour: bool) -> bool:
    """Whether a brain slice may receive a tumour: every one (``"any"``), only the tumour-free ones
    (``"tumour_free"``, Tumor Fabrication), or only those that carry a tumour already (``"tumour"``: the
    tumour-free slices stay clean negatives, as in the cohort)."""
    return recipients == "any" or (recipients == "tumour") == has_tumour


@dataclass(frozen=True)
class InsertConfig:
    """The insertion's parameters (chosen a priori, not on any test patient)."""

    patch: int = 96  # px side of the cut patch (tumours larger than the patch are cut at its border)
    scale: float = 0.25  # scale factors in [1 - scale, 1 + scale] per axis
    elastic_spacing: int = 12
    elastic_magnitude: float = 2.0
    inside: float = 0.95  # fraction of the pasted tumour that must fall in the brain
    max_overlap: float = 0.2  # of the pasted tumour with the recipient's own tumour
    blend: Literal["feathered", "poisson"] = "feathered"
    feather: float = 2.0  # px: the Gaussian sigma of the feathered blend's edge
    match: Literal["ring", "none"] = "ring"  # the intensity match (step 4)
    ring: int = 4  # px: width of the tissue ring the match compares
    min_area: int = 30  # px: a pasted tumour smaller than this is drawn again
    min_brain_fraction: float = 0.1  # a recipient slice holds at least this much brain
    tries: int = 20  # placements tried per (donor, recipient) before another pair is drawn
    recipients: Recipients = "any"  # which brain slices receive a tumour (:func:`receives`)


def brain_mask(image: np.ndarray) -> np.ndarray:
    """The brain of a skull-stripped slice: its non-zero foreground with the holes filled."""
    return ndimage.binary_fill_holes(np.asarray(image) > 1e-3)


def recipient_slices(cases, cfg: InsertConfig | None = None) -> np.ndarray:
    """Every axial slice of ``cases`` (ResampledCase-like: ``image``/``mask`` ``(H, W, D)``) with at least
    ``cfg.min_brain_fraction`` brain that may receive a tumour (:func:`receives`), as ``(N, 2, H, W)``
    float32."""
    cfg = cfg or InsertConfig()
    out = []
    for c in cases:
        for k in range(c.image.shape[-1]):
            img = c.image[:, :, k]
            if not receives(cfg.recipients, bool(c.mask[:, :, k].any())):
                continue
            if brain_mask(img).mean() >= cfg.min_brain_fraction:
                out.append(np.stack([img, c.mask[:, :, k].astype(np.float32)]))
    if not out:
        which = {"any": "slice", "tumour_free": "tumour-free slice", "tumour": "tumour slice"}[cfg.recipients]
        raise ValueError(f"no {which} of the cases holds enough brain to receive a tumour")
    return np.stack(out).astype(np.float32)


def _cut(pair: np.ndarray, centre: tuple[int, int], size: int) -> np.ndarray:
    """The ``(2, size, size)`` patch of ``pair`` centred on ``centre``, zero outside the slice."""
    half = size // 2
    padded = np.pad(pair, ((0, 0), (half, half), (half, half)))
    r, c = centre
    return padded[:, r : r + size, c : c + size].copy()


def _place(patch: np.ndarray, centre: tuple[int, int], shape: tuple[int, int]) -> np.ndarray:
    """``patch`` ``(C, P, P)`` put on a zero ``(C, *shape)`` canvas centred on ``centre`` (cut at the edges)."""
    size = patch.shape[-1]
    half = size // 2
    canvas = np.zeros((patch.shape[0], shape[0] + 2 * half, shape[1] + 2 * half), patch.dtype)
    r, c = centre
    canvas[:, r : r + size, c : c + size] = patch
    return canvas[:, half : half + shape[0], half : half + shape[1]]


class Inserter:
    """Pastes a donor's tumour into a recipient slice (:func:`insert_one` with a reusable transform)."""

    def __init__(self, cfg: InsertConfig | None = None) -> None:
        from monai.transforms import Rand2DElasticd

        self.cfg = cfg = cfg or InsertConfig()
        # the dictionary transform: one draw deforms the image and its labels alike (the array
        # transform draws its rotation and displacement again at every call, randomize=False or not)
        self.deform = Rand2DElasticd(
            keys=("image", "labels"),
            mode=("bilinear", "nearest"),
            spacing=(cfg.elastic_spacing, cfg.elastic_spacing),
            magnitude_range=(0.0, cfg.elastic_magnitude),
            prob=1.0,
            rotate_range=math.pi,
            scale_range=(cfg.scale, cfg.scale),
            padding_mode="zeros",
        )

    def __call__(
        self, donor: np.ndarray, recipient: np.ndarray, rng: np.random.Generator
    ) -> np.ndarray | None:
        """The recipient ``(2, H, W)`` with the donor's tumour pasted in, or None when no placement fits."""
        cfg = self.cfg
        dmask = donor[1] > 0.5
        if dmask.sum() < cfg.min_area:
            return None
        centre = tuple(int(round(x)) for x in ndimage.center_of_mass(dmask))
        patch = _cut(donor, centre, cfg.patch)  # type: ignore[arg-type]
        dbrain_patch = _cut(brain_mask(donor[0])[None].astype(np.float32), centre, cfg.patch)[0] > 0.5  # type: ignore[arg-type]

        self.deform.set_random_state(state=np.random.RandomState(rng.integers(2**31)))
        moved = self.deform(
            {"image": patch[0:1], "labels": np.stack([patch[1], dbrain_patch.astype(np.float32)])}
        )
        image = np.asarray(moved["image"])[0]
        tumour, tissue = np.asarray(moved["labels"]) > 0.5
        tumour &= tissue & (image > 1e-3)  # the tumour carries the donor's tissue, not its background
        if tumour.sum() < cfg.min_area:
            return None

        rbrain = brain_mask(recipient[0])
        rmask = recipient[1] > 0.5
        candidates = np.argwhere(rbrain)
        if not len(candidates):
            return None
        ring = ndimage.binary_dilation(tumour, iterations=cfg.ring) & ~tumour & tissue
        donor_tissue = float(image[ring].mean()) if ring.any() else float("nan")
        shape = recipient.shape[1:]
        for _ in range(cfg.tries):
            at = tuple(int(x) for x in candidates[rng.integers(len(candidates))])
            placed = _place(np.stack([image, tumour.astype(np.float32), ring.astype(np.float32)]), at, shape)  # type: ignore[arg-type]
            new = placed[1] > 0.5
            area = new.sum()
            if area < cfg.min_area or (new & rbrain).sum() < cfg.inside * area:
                continue
            if (new & rmask).sum() > cfg.max_overlap * area:
                continue
            new &= rbrain
            around = (placed[2] > 0.5) & rbrain & ~rmask
            if cfg.match == "ring" and around.any() and np.isfinite(donor_tissue) and donor_tissue > 1e-3:
                gain = float(np.clip(recipient[0][around].mean() / donor_tissue, 0.5, 2.0))
            else:
                gain = 1.0
            out = np.empty_like(recipient, dtype=np.float32)
            if cfg.blend == "poisson":
                region = ndimage.binary_dilation(new, iterations=2) & rbrain
                out[0] = np.clip(poisson_blend(placed[0] * gain, recipient[0], region), 0.0, 1.0)
            else:
                soft = ndimage.gaussian_filter(
                    ndimage.binary_dilation(new, iterations=2).astype(np.float32), cfg.feather
                )
                alpha = np.maximum(new.astype(np.float32), np.clip(soft, 0.0, 1.0)) * rbrain
                out[0] = np.clip(alpha * placed[0] * gain + (1.0 - alpha) * recipient[0], 0.0, 1.0)
            out[1] = (rmask | (new & (out[0] > 1e-3))).astype(np.float32)
            return out
        return None


def poisson_blend(source: np.ndarray, target: np.ndarray, region: np.ndarray) -> np.ndarray:
    """Poisson image editing (Pérez, Gangnet and Blake 2003): ``target`` with ``region`` replaced by the
    f that solves  laplacian(f) = laplacian(source)  in the region, f = target on its border.

    One sparse linear system over the region's pixels (4-neighbour Laplacian; the image's outermost
    pixels are never unknowns). ``source``, ``target``: (H, W) float; ``region``: (H, W) bool.
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.linalg import spsolve

    region = np.asarray(region, bool).copy()
    region[[0, -1], :] = False
    region[:, [0, -1]] = False
    out = np.asarray(target, np.float64).copy()
    ys, xs = np.nonzero(region)
    if not len(ys):
        return out.astype(np.float32)
    index = -np.ones(region.shape, np.int64)
    index[ys, xs] = np.arange(len(ys))
    src = np.asarray(source, np.float64)
    rows, cols, vals = [np.arange(len(ys))], [np.arange(len(ys))], [np.full(len(ys), 4.0)]
    rhs = np.zeros(len(ys))
    for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1)):
        ny, nx = ys + dy, xs + dx
        rhs += src[ys, xs] - src[ny, nx]  # the source's gradient towards each neighbour
        inside = index[ny, nx] >= 0
        rows.append(np.flatnonzero(inside))
        cols.append(index[ny, nx][inside])
        vals.append(-np.ones(int(inside.sum())))
        rhs[~inside] += out[ny[~inside], nx[~inside]]  # the border: the target's own values
    a = coo_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(len(ys),) * 2)
    out[ys, xs] = spsolve(a.tocsr(), rhs)
    return out.astype(np.float32)


def iter_insert_pairs(
    donors: np.ndarray,
    recipients: np.ndarray,
    n: int,
    *,
    seed: int,
    cfg: InsertConfig | None = None,
) -> Iterator[np.ndarray]:
    """Yield ``n`` pairs ``(2, H, W)`` one at a time: each a recipient slice with one donor tumour pasted
    in (what :func:`insert_pairs` stacks; an export streams them, so memory does not grow with ``n``).

    Args:
        donors: ``(Nd, 2, H, W)`` [image, mask] slices whose tumours are pasted (real or generated).
        recipients: ``(Nr, 2, H, W)`` slices that receive them (:func:`recipient_slices`).
        n: pairs to make. seed: pair ``i`` draws from ``numpy.random.default_rng([seed, i])``.

    Yields float32 pairs: image in [0, 1] and zero outside the recipient's brain, mask exactly {0, 1}.
    The inputs are checked before the first pair.
    """
    donors, recipients = np.asarray(donors, np.float32), np.asarray(recipients, np.float32)
    for name, a in (("donors", donors), ("recipients", recipients)):
        if a.ndim != 4 or a.shape[1] != 2 or not len(a):
            raise ValueError(f"{name} must be a non-empty (N, 2, H, W) [image, mask] array, got {a.shape}")
    if donors.shape[2:] != recipients.shape[2:]:
        raise ValueError(
            f"donor slices {donors.shape[2:]} and recipient slices {recipients.shape[2:]} differ"
        )
    usable = np.flatnonzero((donors[:, 1] > 0.5).sum((1, 2)) >= (cfg or InsertConfig()).min_area)
    if not len(usable):
        raise ValueError("no donor has a tumour large enough to paste")
    inserter = Inserter(cfg)
    return _pasted(inserter, donors[usable], recipients, n, seed)


def _pasted(
    inserter: Inserter, donors: np.ndarray, recipients: np.ndarray, n: int, seed: int
) -> Iterator[np.ndarray]:
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        for _ in range(100):
            pair = inserter(donors[rng.integers(len(donors))], recipients[rng.integers(len(recipients))], rng)
            if pair is not None:
                yield pair.astype(np.float32, copy=False)
                break
        else:
            raise ValueError(f"pair {i}: no donor tumour fitted into a recipient brain in 100 draws")


def insert_pairs(
    donors: np.ndarray,
    recipients: np.ndarray,
    n: int,
    *,
    seed: int,
    cfg: InsertConfig | None = None,
) -> np.ndarray:
    """The ``n`` pairs of :func:`iter_insert_pairs` as one ``(n, 2, H, W)`` float32 array."""
    out = np.empty((n, 2, *np.shape(recipients)[2:]), np.float32)
    for i, pair in enumerate(iter_insert_pairs(donors, recipients, n, seed=seed, cfg=cfg)):
        out[i] = pair
    return out


class OnlineInsert:
    """The online variant for the U-Net's loader: each slice of a batch that may receive a tumour
    (``cfg.recipients``, :func:`receives`) receives a donor tumour with probability ``p`` (the slice
    itself is the recipient; a slice with no room is left as it is)."""

    def __init__(self, donors: np.ndarray, p: float = 0.5, cfg: InsertConfig | None = None) -> None:
        self.inserter = Inserter(cfg)
        areas = (np.asarray(donors)[:, 1] > 0.5).sum((1, 2))
        self.donors = np.asarray(donors, np.float32)[areas >= self.inserter.cfg.min_area]
        if not len(self.donors):
            raise ValueError("no donor has a tumour large enough to paste")
        self.p = p

    def __call__(self, batch, seed: int, step: int):
        import torch

        rng = np.random.default_rng([seed, step, 13])
        out = batch.clone()
        recipients = self.inserter.cfg.recipients
        for i in range(len(batch)):
            if rng.random() < self.p and receives(recipients, bool((batch[i, 1] > 0.5).any())):
                pair = self.inserter(self.donors[rng.integers(len(self.donors))], batch[i].numpy(), rng)
                if pair is not None:
                    out[i] = torch.from_numpy(pair)
        return out


def draw_insert(slices, n: int, seed: int, cfg: InsertConfig | None = None) -> Iterator[np.ndarray]:
    """The registry's ``insert`` and ``insert_healthy`` (each with its ``cfg``): ``n`` pairs, one at a
    time, with the balanced tumour slices of a cohort (a SliceSet) as donors and the brain slices of its
    cases that ``cfg.recipients`` names as recipients."""
    return iter_insert_pairs(slices.slices, recipient_slices(slices.cases, cfg), n, seed=seed, cfg=cfg)
