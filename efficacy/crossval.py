"""Does a recipe beat real data with online augmentation? Patient-level cross-validation (issue 11, A).

The protocol, for a cohort of P patients and ``folds`` folds (the shared BraTS cases: 6 patients, 3 folds
of 4 training and 2 test patients, so that every patient is tested once):

1. **folds** (:func:`make_folds`): the patients, shuffled by ``fold_seed``, cut into ``folds`` test
   groups; each fold trains on the others. Every generator is fitted per fold, on that fold's training
   patients only, and nothing of a test patient reaches it.
2. **the U-Net's data**: every tumour slice of the training patients plus tumour-free brain slices of
   the same patients (``tumour_free_ratio`` of them per tumour slice, seeded), so that the U-Net learns
   to say "no tumour" and its 3D Dice, HD95 and false-positive volume mean something.
3. **the step budget without the test patients** (:func:`choose_budget`): ``inner_patients``
   training patients of the fold are held out in turn (inner validation); each time the strong baseline
   trains on the other training patients up to ``max_steps``, its slice Dice on the held-out patient
   measured every ``eval_every`` steps. The curves are averaged, smoothed over 3 points (at the ends,
   over the 2 that exist: the first point is not counted twice), and the budget is the first step
   count within ``plateau_tol`` of the smoothed curve's best.
   Every arm of the fold then trains that many steps (arms marked ``fixed_epochs``: the paper's 40
   epochs, a comparison row).
4. **arms** (:data:`ARMS`): what a U-Net trains on and how. ``real_aug``, real slices with the online
   augmentation of :mod:`efficacy.online` at every step, is the strong baseline every other arm is
   compared with; every arm but the plain ``real`` rows gets the same online augmentation on top of
   its pairs. Offline pairs are mixed at a fixed real fraction per batch
   (:class:`efficacy.segmenter.LoaderRecipe`).
5. **statistics** (:func:`summarise`): ``seeds`` U-Net seeds per (fold, arm). Paired differences
   against the strong baseline per (fold, seed), and a 95 % interval of the mean gain from a
   patient-level bootstrap (patients resampled with replacement; each patient's gain is the mean over
   seeds of its paired per-patient differences). An arm "helps" when that interval lies above 0.

Every finished run is appended to ``work_dir/rows.jsonl`` (with its settings), pairs and budgets are
cached per fold, so a killed run started again continues where it stopped.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from imaging.cohort import fold_training_patients
from imaging.errors import DHVAEError
from imaging.files import atomic_file, write_json_atomic, write_npy_atomic
from imaging.ingest import IngestResult
from imaging.preprocess import ResampledCase
from imaging.progress import ProgressFn, Reporter, StopFn
from models.insert import INSERT_VERSION, InsertConfig, OnlineInsert, recipient_slices
from models.registry import AUGMENTATIONS, DONOR_INSERTS

from .grid import (
    EfficacyConfig,
    EfficacyData,
    claim_work_dir,
    pairs_path,
    read_rows,
    split_cohort,
    synthetic_pairs,
)
from .online import OnlineAugment
from .report import json_safe, summarize
from .segmenter import (
    LCC_METRICS,
    VOLUME_METRICS,
    LoaderRecipe,
    OnlineTransform,
    PatientSplit,
    SegmenterConfig,
    TrainingProtocol,
    evaluate_segmenter,
    largest_component,
    train_segmenter,
    training_steps,
)

log = logging.getLogger(__name__)

CV_METRICS = ("dice_slice", "dice_3d", "hd95", "fp_volume")
# LCC_METRICS (segmenter): the 3D ones after nnU-Net's post-processing, in the rows since 2026-12-04
# the 3D Dice after the post-processing each fold chose on its inner split (:func:`choose_postprocessing`)
POST_METRIC = "dice_3d_post"
HIGHER_IS_BETTER = ("dice_slice", "dice_3d", "dice_3d_lcc", POST_METRIC)


@dataclass(frozen=True)
class Arm:
    """One arm of the comparison: the offline pairs a U-Net gets, and how its loader draws them.

    ``method``: where the offline pairs come from: "none", a generator of :mod:`models.registry`
    ("insert" included), "insert_dhvae" (dHVAE tumours pasted into real slices) or "insert_healthy_dhvae"
    (the same, into tumour-free slices only: ``insert_healthy`` with generated tumours). ``online_insert``:
    the probability that a slice of a batch receives a real tumour of the training patients in the
    loader (TumorCP's online copy-paste); ``insert_match``: its intensity match (``InsertConfig.match``);
    ``online_recipients``: which batch slices may receive one (``InsertConfig.recipients``: "tumour"
    leaves the tumour-free slices clean negatives); ``online_donors``: where the pasted tumours come from,
    the training patients' real tumour slices or pairs of the dHVAE fitted on those patients
    (:func:`online_donors`: the dHVAE's new shapes and textures against real copy-paste);
    ``donor_largest_component``: each donor's mask cut to its largest connected component first (the
    `small` dHVAE's masks carry specks around the tumour).
    ``pretrain_fraction``: the share of the budget spent on
    synthetic pairs alone before the mixed batches (synthetic pretraining, then real fine-tuning).
    """

    name: str
    method: str = "none"
    n: int = 0
    online_aug: bool = True
    online_insert: float = 0.0
    insert_match: Literal["ring", "none"] = "ring"
    online_recipients: Literal["any", "tumour"] = "any"
    online_donors: Literal["real", "dhvae"] = "real"
    donor_largest_component: bool = False
    real_fraction: float | None = 0.75
    synthetic_weight: float = 1.0
    pretrain_fraction: float = 0.0
    budget: Literal["inner", "fixed_epochs"] = "inner"
    filter_dice: float = 0.0  # agreement filter: keep pairs a real-only U-Net segments at >= this soft Dice
    oversample_hard: bool = False  # ... and draw the kept ones with weight 1 - Dice (hard masks more often)

    def __post_init__(self) -> None:
        if self.method not in PAIR_SOURCES:
            raise DHVAEError(f"arm {self.name}: unknown pair source {self.method!r}")
        if (self.method == "none") != (self.n == 0):
            raise DHVAEError(f"arm {self.name}: offline pairs need a method and N > 0 together")
        if (self.online_donors != "real" or self.donor_largest_component) and not self.online_insert:
            raise DHVAEError(f"arm {self.name}: donors of an online insertion need online_insert > 0")

    @property
    def inserts(self) -> bool:
        """Whether its pairs or its loader paste tumours (:mod:`models.insert`)."""
        return self.method.startswith("insert") or self.online_insert > 0

    def recipe(self) -> str:
        """The recipe in words, for a recommendation: its pairs and what its loader pastes."""
        parts = [f"{self.n} {self.method} pairs"] if self.n else []
        if self.online_insert:
            where = "the slices that carry a tumour" if self.online_recipients == "tumour" else "any slice"
            kept = " (each mask's largest component)" if self.donor_largest_component else ""
            parts.append(
                f"{'dHVAE-generated' if self.online_donors == 'dhvae' else 'real'} tumours{kept} pasted into "
                f"{where} of each batch with probability {self.online_insert:g} while the U-Net trains"
            )
        return ", ".join(parts) or "the real slices only"

    def real_donor_twin(self) -> str | None:
        """The arm that pastes real tumours where this one pastes dHVAE-generated ones, all else equal (the
        largest-component cut aside, which only the generated masks need), or None. The pair answers the
        issue's question: does the generator add anything over real copy-paste?"""
        if self.online_donors == "dhvae":
            twin = replace(self, online_donors="real", donor_largest_component=False)
        elif self.method in DONOR_INSERTS:
            twin = replace(self, method=DONOR_INSERTS[self.method].twin)
        else:
            return None
        return next((a.name for a in ARMS.values() if a.settings() == twin.settings()), None)

    def settings(self) -> dict[str, Any]:
        """What a row records of its recipe (with the insertion's version, for the arms that insert)."""
        out = {k: v for k, v in asdict(self).items() if k != "name"}
        return {**out, "insert_version": INSERT_VERSION} if self.inserts else out

    def matches(self, recorded: dict[str, Any]) -> bool:
        """Whether ``recorded`` (a row, or a report's settings of this arm) ran this recipe: a setting added
        since must be at its default, and an insertion must be of this version (none recorded: version 1).
        N is not compared: a run's N is its config's (``CVConfig.n_synthetic``, claimed by the work folder)."""
        before = {**Arm(self.name).settings(), "insert_version": 1}  # what a record without the key ran
        return all(recorded.get(k, before[k]) == v for k, v in self.settings().items() if k != "n")


# every offline pair source: none, a generator, or a donor insertion (a dHVAE's tumours pasted offline,
# each with the real-tumour generator it mirrors: its twin in the generator's question)
PAIR_SOURCES = ("none", *AUGMENTATIONS)
DHVAE_DONORS = 500  # dHVAE pairs an online insertion draws its tumours from (the dhvae arm's N: one draw)

REFERENCE = "real_aug"  # the strong baseline
ARMS: dict[str, Arm] = {
    a.name: a
    for a in (
        Arm("real", online_aug=False),  # plain real-only, the issue-4 reference
        Arm(REFERENCE),
        Arm("real_fixed_epochs", online_aug=False, budget="fixed_epochs"),  # the paper's protocol
        Arm("traditional", method="traditional", n=500),
        Arm("insert", method="insert", n=500),  # real tumours pasted offline (CarveMix / TumorCP-like)
        Arm("insert_online", online_insert=0.5),  # ... and in the loader (TumorCP)
        # ... with the tumour's own intensities (the ring match dims and saturates pasted tumours)
        Arm("insert_online_unscaled", online_insert=0.5, insert_match="none"),
        # ... into the slices that carry a tumour already: the tumour-free ones stay clean negatives
        Arm("insert_online_tumour", online_insert=0.5, online_recipients="tumour"),
        # ... with dHVAE-generated tumours instead of real ones: does the generator add to copy-paste?
        Arm(
            "insert_online_tumour_dhvae", online_insert=0.5, online_recipients="tumour", online_donors="dhvae"
        ),
        # ... each generated mask cut to its largest component (the dHVAE's masks carry specks)
        Arm(
            "insert_online_tumour_dhvae_lcc",
            online_insert=0.5,
            online_recipients="tumour",
            online_donors="dhvae",
            donor_largest_component=True,
        ),
        # ... with half TumorCP's paste probability: fewer pasted tumours for the U-Net to over-learn
        Arm("insert_online_p25", online_insert=0.25),
        Arm("insert_healthy", method="insert_healthy", n=500),  # ... into tumour-free slices only
        Arm("dhvae", method="dhvae", n=500),
        Arm("dhvae_pretrain", method="dhvae", n=500, pretrain_fraction=0.3),
        Arm("insert_dhvae", method="insert_dhvae", n=500),  # dHVAE tumours pasted into real slices
        Arm("insert_healthy_dhvae", method="insert_healthy_dhvae", n=500),  # ... into tumour-free ones only
        Arm("vae", method="vae", n=500),
        Arm(
            "masks_first", method="spade", n=500
        ),  # a real mask moved and resized, its image rendered by SPADE
        # FreeMask's recipe on any generator: drop the pairs a real-only U-Net disagrees with, resample hard ones
        Arm("insert_filtered", method="insert", n=500, filter_dice=0.5, oversample_hard=True),
        Arm("dhvae_filtered", method="dhvae", n=500, filter_dice=0.5, oversample_hard=True),
    )
}


@dataclass(frozen=True)
class CVConfig:
    """The cross-validated grid: which arms, folds and seeds, and the settings every arm shares."""

    arms: tuple[str, ...] = ("real", REFERENCE, "insert", "insert_online")
    folds: int = 3
    fold_seed: int = 0
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    tumour_free_ratio: float = 0.25
    max_steps: int = 1200
    eval_every: int = 100
    plateau_tol: float = 0.005
    inner_patients: int = 2  # training patients held out in turn to choose the budget (their curves averaged)
    preset: str = "small"  # the learned generators (dhvae, vae, the DONOR_INSERTS' donors)
    generator_steps: int = 2000
    generator_seed: int = 0
    sample_seed: int = 1
    bootstrap: int = 2000
    segmenter: SegmenterConfig = field(default_factory=SegmenterConfig)
    n_synthetic: int | None = None  # N of every arm with offline pairs (None: each arm's own, 500)

    def __post_init__(self) -> None:
        unknown = [a for a in self.arms if a not in ARMS]
        if unknown:
            raise DHVAEError(f"unknown arm(s) {unknown}; choose from {', '.join(ARMS)}")
        if REFERENCE not in self.arms:
            object.__setattr__(self, "arms", (REFERENCE, *self.arms))
        if self.folds < 2 or not self.seeds:
            raise DHVAEError("a cross-validation needs at least 2 folds and one seed")
        if self.inner_patients < 1:
            raise DHVAEError("the inner validation needs at least one held-out training patient")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def arm(self, name: str) -> Arm:
        """The arm ``name`` with this run's N."""
        arm = ARMS[name]
        return replace(arm, n=self.n_synthetic) if arm.n and self.n_synthetic else arm


def work_settings(config: dict[str, Any]) -> dict[str, Any]:
    """The settings a work folder is claimed with: a config (``CVConfig.to_dict()`` or a report's
    ``config``) as JSON has it, less the arms and seeds (those may grow in a resumed folder)."""
    return json.loads(json.dumps({k: v for k, v in config.items() if k not in ("arms", "seeds")}))


def make_folds(case_ids: Sequence[str], folds: int, *, seed: int) -> list[PatientSplit]:
    """``folds`` patient-level splits whose test groups partition the patients (sizes differ by <= 1)."""
    patients = sorted(set(case_ids))
    if fold_training_patients(len(patients), folds) < 2:
        raise DHVAEError(
            f"{len(patients)} patient(s) cannot make {folds} folds with at least 2 training patients each"
        )
    order = [patients[i] for i in np.random.default_rng(seed).permutation(len(patients))]
    groups = [sorted(order[i::folds]) for i in range(folds)]
    return [PatientSplit(tuple(sorted(p for p in patients if p not in g)), tuple(g)) for g in groups]


def cohort_splits(ing: IngestResult, cfg: CVConfig) -> list[PatientSplit]:
    """The grid's patient splits of an ingested cohort: :func:`make_folds` over its patients, by
    ``cfg``'s fold count and seed (every script that revisits a fold takes it from here)."""
    return make_folds([c.case_id for c in ing.slices.cases], cfg.folds, seed=cfg.fold_seed)


@dataclass
class FoldData:
    """One fold: the efficacy split plus the U-Net's real pool and the training patients' volumes."""

    index: int
    data: EfficacyData
    train_cases: list[ResampledCase]
    real_pool: np.ndarray  # (N, 2, H, W): tumour slices + sampled tumour-free brain slices


def tumour_free_slices(cases: Sequence[ResampledCase], k: int, *, seed: int) -> np.ndarray:
    """``k`` tumour-free axial slices with enough brain to receive a tumour (:func:`recipient_slices`:
    at least 10 %), drawn without replacement (seeded)."""
    try:
        pool = list(recipient_slices(cases, InsertConfig(recipients="tumour_free")))
    except ValueError:  # no tumour-free slice with enough brain at all
        pool = []
    if not pool or k <= 0:
        return np.zeros((0, 2, *cases[0].image.shape[:2]), np.float32)
    idx = np.random.default_rng(seed).choice(len(pool), size=min(k, len(pool)), replace=False)
    return np.stack([pool[i] for i in sorted(idx)]).astype(np.float32)


def fold_data(ing: IngestResult, split: PatientSplit, index: int, cfg: CVConfig) -> FoldData:
    data = split_cohort(ing, train_ids=split.train, test_ids=split.test)
    train_cases = [c for c in ing.slices.cases if c.case_id in split.train]
    free = tumour_free_slices(
        train_cases, round(cfg.tumour_free_ratio * len(data.real_train)), seed=cfg.fold_seed + index
    )
    return FoldData(index, data, train_cases, np.concatenate([data.real_train, free]))


def smooth3(values: Sequence[float]) -> np.ndarray:
    """3-point moving average; at each end, the mean of the 2 points that exist (no padding, so an
    end point is not counted twice)."""
    v = np.asarray(values, dtype=np.float64)
    return np.array([v[max(0, i - 1) : i + 2].mean() for i in range(len(v))])


def inner_validation_patients(fold: FoldData, cfg: CVConfig) -> list[str]:
    """The training patients of ``fold`` held out in turn to choose its budget (seeded; at most all but
    one, so that every inner run has a patient to train on)."""
    train = list(fold.data.split.train)
    k = min(cfg.inner_patients, len(train) - 1)
    order = np.random.default_rng([cfg.fold_seed, fold.index]).permutation(len(train))
    return sorted(train[i] for i in order[:k])


def inner_fold(ing: IngestResult, fold: FoldData, val_id: str, cfg: CVConfig) -> FoldData:
    """The inner split of ``fold`` that holds out its training patient ``val_id``: a fold of its own whose
    "test" patient is ``val_id`` and whose training patients are the fold's others."""
    train = tuple(p for p in fold.data.split.train if p != val_id)
    return fold_data(ing, PatientSplit(train, (val_id,)), fold.index, cfg)


def inner_curve(
    ing: IngestResult,
    fold: FoldData,
    val_id: str,
    cfg: CVConfig,
    device: torch.device | str = "cpu",
    *,
    arm: Arm | None = None,
    pairs_dir: Path | None = None,
    budget: int | None = None,
) -> list[tuple[int, float]]:
    """``arm`` (default: the strong baseline) trained on ``fold``'s training patients but ``val_id``, and
    its slice Dice on ``val_id`` every ``cfg.eval_every`` steps up to ``cfg.max_steps``: [(step, dice), ...].

    An arm with offline pairs (or generated donors) draws them from those inner training patients only
    (cached under ``pairs_dir``), so a recipe's settings can be chosen without a test patient (the arm probe of
    ``bench/efficacy/inner_probe.py``). An agreement filter's scorer is trained on those patients too, for
    ``budget`` steps (the fold's budget, as on the test folds).
    """
    arm = arm or ARMS[REFERENCE]
    inner = inner_fold(ing, fold, val_id, cfg)
    pairs = None
    if arm.n:
        if pairs_dir is None:
            raise DHVAEError(f"arm {arm.name}: an inner curve's pairs need a folder")
        pairs, _ = arm_pairs(arm, inner, cfg, pairs_dir, budget=budget, device=device)
    donors = online_donors(arm, inner, cfg, pairs_dir, device=device)
    curve: list[tuple[int, float]] = []

    def validate(step: int, model: torch.nn.Module) -> None:
        if step % cfg.eval_every == 0:
            dice = evaluate_segmenter(model, inner.data.test_cases, volumes=False)["dice_slice"]
            curve.append((step, dice))
            model.train()
            log.info("budget fold %d (%s held out): step %d val dice %.3f", fold.index, val_id, step, dice)

    kw, _ = arm_training(arm, inner, pairs, budget=cfg.max_steps, cfg=cfg, donors=donors)
    train_segmenter(inner.real_pool, seed=0, **kw, on_step=validate, device=device)
    return curve


def inner_curve_path(work_dir: Path, val_id: str, arm: str = REFERENCE) -> Path:
    """Where a fold's inner validation caches ``arm``'s curve on held-out patient ``val_id``."""
    return work_dir / (f"inner_{val_id}.json" if arm == REFERENCE else f"inner_{arm}_{val_id}.json")


def cached_inner_curve(
    ing: IngestResult,
    fold: FoldData,
    arm: Arm,
    val_id: str,
    cfg: CVConfig,
    work_dir: Path,
    device: torch.device | str = "cpu",
    *,
    budget: int | None = None,
) -> list[tuple[int, float]]:
    """:func:`inner_curve`, cached in the fold's folder ``work_dir`` (the reference's curves are the
    budget's; another arm's pairs are drawn into ``work_dir/inner_pairs_<val_id>``; ``budget``: the
    fold's, for an agreement filter's scorer)."""
    path = inner_curve_path(work_dir, val_id, arm.name)
    if path.is_file():
        return [tuple(p) for p in json.loads(path.read_text())]
    pairs_dir = work_dir / f"inner_pairs_{val_id}"
    curve = inner_curve(ing, fold, val_id, cfg, device, arm=arm, pairs_dir=pairs_dir, budget=budget)
    write_json_atomic(path, curve)
    return curve


def choose_budget(
    ing: IngestResult,
    fold: FoldData,
    cfg: CVConfig,
    work_dir: Path,
    device: torch.device | str = "cpu",
    *,
    on_inner_run: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """The fold's step budget from an inner validation of the strong baseline (cached as budget.json;
    each held-out patient's curve as ``inner_<patient>.json``, so a stopped choice resumes)."""
    path = work_dir / "budget.json"
    work_dir.mkdir(parents=True, exist_ok=True)
    if path.is_file():
        return json.loads(path.read_text())
    curves: dict[str, list[tuple[int, float]]] = {}
    for val_id in inner_validation_patients(fold, cfg):
        cached = inner_curve_path(work_dir, val_id).is_file()
        curves[val_id] = cached_inner_curve(ing, fold, ARMS[REFERENCE], val_id, cfg, work_dir, device)
        if on_inner_run and not cached:
            on_inner_run()
    steps = [s for s, _ in next(iter(curves.values()))]
    mean = np.mean([[d for _, d in c] for c in curves.values()], axis=0)
    smooth = smooth3(mean)
    first = int(np.flatnonzero(smooth >= smooth.max() - cfg.plateau_tol)[0])
    out = {
        "fold": fold.index,
        "validation_patients": list(curves),
        "curve": [
            {
                "step": s,
                "dice_slice": float(d),
                "smoothed": float(m),
                **{p: c[i][1] for p, c in curves.items()},
            }
            for i, (s, d, m) in enumerate(zip(steps, mean, smooth, strict=True))
        ],
        "steps": steps[first],
    }
    write_json_atomic(path, out)
    return out


def postprocess_path(work_dir: Path, val_id: str) -> Path:
    """Where a fold's post-processing choice caches its held-out patient ``val_id``'s measurement."""
    return work_dir / f"postprocess_{val_id}.json"


def choose_postprocessing(
    ing: IngestResult,
    fold: FoldData,
    cfg: CVConfig,
    work_dir: Path,
    budget: dict[str, Any],
    device: torch.device | str = "cpu",
    *,
    on_inner_run: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Whether ``fold`` keeps only the largest 3D connected component of a prediction (nnU-Net's
    post-processing), chosen on the inner validation split as the budget is, never on a test patient.

    For each held-out training patient of the budget (``budget["validation_patients"]``), the strong
    baseline trains on the fold's other training patients for the budget's steps (seed 0: the model its
    inner curve had at that step) and segments the held-out volume; the fold keeps the largest component
    when that raises the held-out patients' mean 3D Dice, as nnU-Net keeps a post-processing that
    improves its cross-validation Dice. Cached as ``postprocess.json`` (each held-out patient's
    measurement as ``postprocess_<patient>.json``, so a stopped choice resumes). Each measurement also
    records the slice Dice the budget's curve had at that step (``curve_dice_slice``): on the CPU kind the
    curve ran on, the two are equal.
    """
    path = work_dir / "postprocess.json"
    if path.is_file():
        return json.loads(path.read_text())
    held_out: dict[str, dict[str, Any]] = {}
    at_budget = next(c for c in budget["curve"] if c["step"] == budget["steps"])
    for val_id in budget["validation_patients"]:
        cached = postprocess_path(work_dir, val_id)
        if cached.is_file():
            held_out[val_id] = json.loads(cached.read_text())
            continue
        inner = inner_fold(ing, fold, val_id, cfg)
        kw, _ = arm_training(ARMS[REFERENCE], inner, None, budget=budget["steps"], cfg=cfg)
        model = train_segmenter(inner.real_pool, seed=0, **kw, device=device)
        result = evaluate_segmenter(model, inner.data.test_cases, threshold=cfg.segmenter.threshold)
        held_out[val_id] = {
            **{m: result[m] for m in ("dice_slice", *VOLUME_METRICS)},
            "curve_dice_slice": at_budget[val_id],
        }
        write_json_atomic(cached, held_out[val_id])
        log.info(
            "post-processing fold %d (%s held out): dice_3d %.3f, largest component %.3f",
            fold.index,
            val_id,
            result["dice_3d"],
            result["dice_3d_lcc"],
        )
        if on_inner_run:
            on_inner_run()
    out = {
        "fold": fold.index,
        "steps": budget["steps"],
        **postprocess_choice(held_out.values()),
        "held_out": held_out,
    }
    write_json_atomic(path, out)
    return out


def postprocess_choice(measured: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """nnU-Net's rule on held-out measurements (each with ``dice_3d`` and ``dice_3d_lcc``): keep the
    largest component when it raises their mean 3D Dice. Returns the two means and the choice."""
    raw, kept = np.mean([[m["dice_3d"], m["dice_3d_lcc"]] for m in measured], axis=0)
    return {"dice_3d": float(raw), "dice_3d_lcc": float(kept), "largest_component": bool(kept > raw)}


def fold_pairs(
    method: str,
    n: int,
    fold: FoldData,
    cfg: CVConfig,
    work_dir: Path,
    *,
    progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
    device: torch.device | str = "cpu",
) -> np.ndarray:
    """``n`` offline pairs of ``method`` fitted on the fold's training patients only.

    Cached in :func:`~efficacy.grid.pairs_path` (the insertion's version in the name): a draw's first
    ``n`` pairs do not depend on how many were drawn, so a longer cached draw serves a shorter one.
    """
    out = pairs_path(work_dir, method)
    if out.is_file() and len(cached := np.load(out, allow_pickle=False)) >= n:
        return cached[:n]
    if method in DONOR_INSERTS:  # the dHVAE's tumours in the training patients' real slices
        recipe = DONOR_INSERTS[method]
        donors = fold_pairs(
            recipe.donor,
            recipe.donor_count(n),
            fold,
            cfg,
            work_dir,
            progress=progress,
            should_stop=should_stop,
            device=device,
        )
        pairs = np.stack(list(recipe.pairs(donors, fold.train_cases, n, seed=cfg.sample_seed)))
        out.parent.mkdir(parents=True, exist_ok=True)
        write_npy_atomic(out, pairs)
        return pairs
    ecfg = EfficacyConfig(
        methods=(method,),
        n_synthetic=(n,),
        seeds=(0,),
        preset=cfg.preset,
        generator_steps=cfg.generator_steps,
        generator_seed=cfg.generator_seed,
        sample_seed=cfg.sample_seed,
        quality=False,
    )
    return synthetic_pairs(
        method, fold.data, ecfg, work_dir, progress=progress, should_stop=should_stop, device=device
    )


def arm_pairs(
    arm: Arm,
    fold: FoldData,
    cfg: CVConfig,
    work_dir: Path,
    *,
    budget: int | None,
    progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
    device: torch.device | str = "cpu",
) -> tuple[np.ndarray, dict[str, Any] | None]:
    """``arm``'s offline pairs on ``fold`` (:func:`fold_pairs`), and the agreement filter's summary or
    None. The filter chooses ``arm.n`` of twice as many candidates, with a scorer trained for ``budget``
    steps (:func:`agreement_filter`)."""
    want = 2 * arm.n if arm.filter_dice else arm.n
    pairs = fold_pairs(
        arm.method, want, fold, cfg, work_dir, progress=progress, should_stop=should_stop, device=device
    )
    if not arm.filter_dice:
        return pairs, None
    if budget is None:
        raise DHVAEError(f"arm {arm.name}: the agreement filter's scorer needs the fold's step budget")
    return agreement_filter(pairs, arm.n, fold, arm, cfg, work_dir, budget=budget, device=device)


def online_donors(
    arm: Arm,
    fold: FoldData,
    cfg: CVConfig,
    work_dir: Path | None,
    *,
    progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
    device: torch.device | str = "cpu",
) -> np.ndarray | None:
    """The pairs ``arm``'s loader cuts its pasted tumours from: the fold's real tumour slices, or
    ``DHVAE_DONORS`` pairs of the dHVAE fitted on the fold's training patients only (``arm.online_donors``;
    :func:`fold_pairs` caches them, the ``dhvae`` arm's draw), each mask cut to its largest connected
    component where ``arm.donor_largest_component``. None for an arm that pastes nothing."""
    if not arm.online_insert:
        return None
    if arm.online_donors == "real":
        donors = fold.data.real_train
    else:
        if work_dir is None:
            raise DHVAEError(f"arm {arm.name}: its generated donors need a folder to be cached in")
        donors = fold_pairs(
            arm.online_donors,
            DHVAE_DONORS,
            fold,
            cfg,
            work_dir,
            progress=progress,
            should_stop=should_stop,
            device=device,
        )
    if arm.donor_largest_component:
        donors = np.stack([donors[:, 0], [largest_component(m > 0.5) for m in donors[:, 1]]], axis=1)
    return donors.astype(np.float32, copy=False)


def agreement_filter(
    pairs: np.ndarray,
    n: int,
    fold: FoldData,
    arm: Arm,
    cfg: CVConfig,
    work_dir: Path,
    *,
    budget: int,
    device: torch.device | str = "cpu",
) -> tuple[np.ndarray, dict[str, Any]]:
    """``n`` of ``pairs`` chosen by agreement (issue 11, B.3; after FreeMask).

    A U-Net trained on the fold's real slices only (the strong baseline's recipe, seed 0, the fold's
    budget) segments every candidate pair; a pair whose soft Dice is below ``arm.filter_dice`` is
    dropped (its mask disagrees with its image). With ``arm.oversample_hard``, ``n`` pairs are then
    drawn from the kept ones with probability proportional to ``1 - Dice + 0.05``, so the masks the
    U-Net finds hard come more often; otherwise the first ``n`` kept ones are used. The scores are
    cached per pair source (``work_dir/<method>/agreement.npy``). A scorer that agrees with no pair
    (a U-Net of a few steps) keeps the best-scoring tenth instead, flagged in the summary. Returns the
    pairs and a summary.
    """
    from .segmenter import predict_slices, soft_dice

    path = work_dir / arm.method / "agreement.npy"
    if path.is_file() and len(scores := np.load(path, allow_pickle=False)) == len(pairs):
        dice = scores
    else:
        scorer = train_segmenter(
            fold.real_pool,
            seed=0,
            cfg=cfg.segmenter,
            protocol="step_matched",
            steps=budget,
            online=[OnlineAugment()],
            device=device,
        )
        dice = soft_dice(predict_slices(scorer, pairs[:, 0]), pairs[:, 1] > 0.5)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_npy_atomic(path, dice)
    kept = np.flatnonzero(dice >= arm.filter_dice)
    fallback = not len(kept)
    if fallback:  # a scorer that agrees with nothing: keep its best tenth, and say so in the row
        log.warning("no %s pair reaches Dice %.2f: keeping the best tenth", arm.method, arm.filter_dice)
        kept = np.argsort(-dice)[: max(1, len(dice) // 10)]
    if arm.oversample_hard:
        w = 1.0 - dice[kept] + 0.05
        chosen = np.random.default_rng([cfg.sample_seed, 7]).choice(kept, size=n, replace=True, p=w / w.sum())
    else:
        chosen = kept[:n]
    summary = {
        "candidates": len(pairs),
        "kept": int(len(kept)),
        "median_dice": float(np.median(dice)),
        "fallback_best_tenth": fallback,
    }
    return pairs[chosen], summary


def arm_training(
    arm: Arm,
    fold: FoldData,
    pairs: np.ndarray | None,
    *,
    budget: int,
    cfg: CVConfig,
    donors: np.ndarray | None = None,
) -> tuple[dict[str, Any], int]:
    """How a U-Net of ``arm`` trains on ``fold``: :func:`train_segmenter`'s keyword arguments (the
    online transforms, the loader recipe, the protocol and the budget), and the run's step count.
    ``donors``: the pairs an arm with an online insertion pastes tumours from (:func:`online_donors`)."""
    online: list[OnlineTransform] = []
    if arm.online_insert > 0:
        if donors is None:
            raise DHVAEError(f"arm {arm.name}: its online insertion needs donors (online_donors)")
        paste = InsertConfig(match=arm.insert_match, recipients=arm.online_recipients)
        online.append(OnlineInsert(donors, p=arm.online_insert, cfg=paste))
    if arm.online_aug:
        online.append(OnlineAugment())
    n_all = len(fold.real_pool) + (0 if pairs is None else len(pairs))
    protocol: TrainingProtocol = "fixed_epochs" if arm.budget == "fixed_epochs" else "step_matched"
    steps = training_steps(n_all, cfg.segmenter, protocol, budget)
    recipe = LoaderRecipe(
        real_fraction=arm.real_fraction,
        synthetic_weight=arm.synthetic_weight,
        pretrain_steps=round(arm.pretrain_fraction * steps),
    )
    kw = {
        "cfg": cfg.segmenter,
        "protocol": protocol,
        "steps": budget,
        "synthetic": pairs,
        "recipe": recipe if arm.budget == "inner" else None,
        "online": online,
    }
    return kw, steps


def run_arm(
    arm: Arm,
    fold: FoldData,
    pairs: np.ndarray | None,
    *,
    seed: int,
    budget: int,
    cfg: CVConfig,
    device: torch.device | str = "cpu",
    donors: np.ndarray | None = None,
) -> dict[str, Any]:
    """Train one U-Net of ``arm`` on the fold and test it on the fold's test patients."""
    kw, steps = arm_training(arm, fold, pairs, budget=budget, cfg=cfg, donors=donors)
    model = train_segmenter(fold.real_pool, seed=seed, **kw, device=device)
    result = evaluate_segmenter(model, fold.data.test_cases, threshold=cfg.segmenter.threshold)
    return {
        "fold": fold.index,
        "arm": arm.name,
        "seed": seed,
        **arm.settings(),
        "steps": steps,
        "n_real": len(fold.real_pool),
        **{k: result[k] for k in (*CV_METRICS, *LCC_METRICS, "hd95_unit")},
        "per_case": result["per_case"],
    }


def restore_work_dir(
    report: dict[str, Any], work_dir: Path, *, fallback_tags: dict[str, Any] | None = None
) -> int:
    """Seed ``work_dir`` from a committed report (``bench/results/efficacy_cv.json``), so that a new
    machine resumes the grid instead of training its finished runs and budgets again.

    The report's settings become the folder's (:func:`run_crossval` then refuses a config that differs);
    each fold's budget and held-out curves (those done so far, where its budget was not chosen yet) are
    written where :func:`choose_budget` caches them, and the report's rows are appended to
    ``rows.jsonl`` unless the folder holds them already or their arm's recipe changed since
    (:meth:`Arm.matches`: an older insertion, say). A row without a key of ``fallback_tags`` gets it
    (rows that predate the machine tag). Returns the number of rows added.
    """
    work_dir = Path(work_dir)
    claim_work_dir(work_dir, work_settings(report["config"]), "a cross-validation")
    for f in report["folds"]:
        fdir = work_dir / f"fold{f['fold']}"
        for p, curve in f.get("inner_curves", {}).items():  # a fold whose budget was not chosen yet
            _write_if_absent(inner_curve_path(fdir, p), curve)
        if budget := f.get("budget"):
            for p in budget["validation_patients"]:
                _write_if_absent(inner_curve_path(fdir, p), [[c["step"], c[p]] for c in budget["curve"]])
            _write_if_absent(fdir / "budget.json", budget)
        if chosen := f.get("postprocess"):
            _write_if_absent(fdir / "postprocess.json", chosen)
    rows_path = work_dir / "rows.jsonl"
    done = {(r["fold"], r["arm"], r["seed"]) for r in read_rows(rows_path)}
    current: list[dict[str, Any]] = []
    stale: list[dict[str, Any]] = []
    for r in report["rows"]:
        (current if of_current_recipe(r) else stale).append(r)
    if stale:
        arms = ", ".join(sorted({r["arm"] for r in stale}))
        log.warning("%d rows not restored, their recipe changed since the report: %s", len(stale), arms)
    new = [{**(fallback_tags or {}), **r} for r in current if (r["fold"], r["arm"], r["seed"]) not in done]
    with open(rows_path, "a") as sink:
        sink.writelines(json.dumps(r) + "\n" for r in new)
    return len(new)


def restore_arm_curves(probe: dict[str, Any], work_dir: Path) -> list[str]:
    """Seed a cross-validation folder with the arms' inner curves of a committed probe report
    (``bench/results/inner_probe_arms.json``), so that a new machine probes only the arms it adds.

    A curve is restored only where its arm's recipe is still the report's (:meth:`Arm.matches`) and the
    folder has none. Returns the ``arm@patient`` curves restored.
    """
    restored = []
    for r in probe["rows"]:
        if r["arm"] == REFERENCE or r["arm"] not in ARMS:
            continue
        if not ARMS[r["arm"]].matches(probe["arms"][r["arm"]]):
            log.warning("%s: its recipe changed since the probe report; not restored", r["arm"])
            continue
        if _write_if_absent(
            inner_curve_path(Path(work_dir) / f"fold{r['fold']}", r["held_out"], r["arm"]), r["curve"]
        ):
            restored.append(f"{r['arm']}@{r['held_out']}")
    return restored


def remeasure(work_dir: Path, arms: Sequence[str], seeds: Sequence[int]) -> int:
    """Take the finished runs of ``arms`` at ``seeds`` that predate the post-processed metrics
    (``LCC_METRICS``) out of ``work_dir``, so that :func:`run_crossval` trains and measures them again.

    Each is kept in ``superseded.jsonl``; its retrained row records the old metrics as ``before``: on the
    CPU kind it ran on, a rerun reproduces them (the check that a run is deterministic). Returns how many.
    """
    rows_path, old_path = Path(work_dir) / "rows.jsonl", Path(work_dir) / "superseded.jsonl"
    out: list[dict[str, Any]] = []
    kept: list[dict[str, Any]] = []
    for r in read_rows(rows_path):
        (out if r["arm"] in arms and r["seed"] in seeds and LCC_METRICS[0] not in r else kept).append(r)
    if out:
        with open(old_path, "a") as sink:
            sink.writelines(json.dumps(r) + "\n" for r in out)
        with atomic_file(rows_path, "w") as sink:
            sink.writelines(json.dumps(r) + "\n" for r in kept)
    return len(out)


def of_current_recipe(row: dict[str, Any]) -> bool:
    """Whether a row (or a record of an arm's run) ran its arm's recipe as it is now (:meth:`Arm.matches`;
    an arm this code no longer has keeps its rows)."""
    return row["arm"] not in ARMS or ARMS[row["arm"]].matches(row)


def foreign_seeds(work_dir: Path, seeds: Iterable[int], cpu_flags: Sequence[str]) -> dict[int, list[str]]:
    """Per seed of ``seeds``, the other CPU kinds its finished runs in ``work_dir`` ran on.

    A paired gain pairs only runs of one CPU kind (:func:`paired_gain`), and the grid keys a run by
    (fold, arm, seed): a run trained here at a seed another kind began pairs with nothing, and it stops
    that kind from training the run. A session trains only the seeds of its own kind."""
    wanted, mine = set(seeds), list(cpu_flags)
    out: dict[int, set[str]] = {}
    for r in read_rows(Path(work_dir) / "rows.jsonl"):
        if r["seed"] in wanted and (flags := r.get("cpu_flags")) is not None and list(flags) != mine:
            out.setdefault(r["seed"], set()).add(", ".join(flags))
    return {seed: sorted(kinds) for seed, kinds in sorted(out.items())}


def _write_if_absent(path: Path, data: Any) -> bool:
    """Write ``data`` as JSON at ``path`` unless a file is there; whether it wrote."""
    if path.is_file():
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, data)
    return True


def run_crossval(
    ing: IngestResult,
    cfg: CVConfig,
    work_dir: Path,
    *,
    progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
    device: torch.device | str = "cpu",
    report_only: bool = False,
    row_tags: dict[str, Any] | None = None,
    train_seeds: Sequence[int] | None = None,
    train_folds: Sequence[int] | None = None,
) -> dict[str, Any]:
    """Run (or finish) every (seed, fold, arm) and return :func:`summarise`'s report.

    Seed-major order: a run stopped part-way holds whole comparisons (every fold and arm) for the seeds
    it finished. The work folder's settings must match (arms may be added). ``row_tags`` are recorded
    in every row this call trains (the machine it ran on: a grid resumed across sessions mixes CPUs).
    ``train_seeds`` limits the runs this call trains to those seeds (a session on the CPU kind of one
    seed's rows fills that seed only); the report still covers every seed of ``cfg``. ``train_folds``
    likewise limits them to those folds: a session that has time for one fold's generator fit (a fit
    lives in the work folder only) trains that fold's runs of every seed, instead of one seed's runs
    that need every fold's fit.
    """
    work_dir = Path(work_dir)
    claim_work_dir(work_dir, work_settings(cfg.to_dict()), "a cross-validation")

    splits = cohort_splits(ing, cfg)
    folds = [fold_data(ing, s, i, cfg) for i, s in enumerate(splits)]
    rows_path = work_dir / "rows.jsonl"
    # a row of an older recipe (an insertion since mended, say) is neither reported nor counted as done
    rows = [r for r in read_rows(rows_path) if of_current_recipe(r)]
    done = {(r["fold"], r["arm"], r["seed"]) for r in rows}
    before = {(r["fold"], r["arm"], r["seed"]): r for r in read_rows(work_dir / "superseded.jsonl")}
    grid = [(seed, f.index, a) for seed in cfg.seeds for f in folds for a in cfg.arms]
    todo = [] if report_only else [g for g in grid if (g[1], g[2], g[0]) not in done]
    if train_seeds is not None:
        todo = [g for g in todo if g[0] in train_seeds]
    if train_folds is not None:
        todo = [g for g in todo if g[1] in train_folds]
    # the total counts each fold's inner-validation runs too, twice (the budget's curves, then the
    # post-processing's runs at the budget): what the service announces
    inner = {f.index: inner_validation_patients(f, cfg) for f in folds}
    total = len(grid) + 2 * sum(map(len, inner.values()))
    have = {f.index for f in folds if (work_dir / f"fold{f.index}" / "budget.json").is_file()}
    chosen = {f.index for f in folds if (work_dir / f"fold{f.index}" / "postprocess.json").is_file()}
    inner_done = sum(
        (len(p) if i in have else sum(inner_curve_path(work_dir / f"fold{i}", v).is_file() for v in p))
        + (len(p) if i in chosen else sum(postprocess_path(work_dir / f"fold{i}", v).is_file() for v in p))
        for i, p in inner.items()
    )
    settled = len(grid) - len(todo) + inner_done
    reporter = Reporter("evaluate", total, "runs", progress, should_stop, start=settled)
    reporter.report(settled)
    budgets: dict[int, dict[str, Any]] = {}
    postprocess: dict[int, dict[str, Any]] = {}  # per fold: keep the largest 3D component? (inner split)

    def inner_run_done() -> None:
        nonlocal settled
        settled += 1
        reporter.report(settled)

    for f in folds:
        if report_only and f.index not in have:
            continue
        reporter.check_cancelled()
        fdir = work_dir / f"fold{f.index}"
        budgets[f.index] = choose_budget(ing, f, cfg, fdir, device, on_inner_run=inner_run_done)
        if report_only and f.index not in chosen:
            continue
        postprocess[f.index] = choose_postprocessing(
            ing, f, cfg, fdir, budgets[f.index], device, on_inner_run=inner_run_done
        )
    with open(rows_path, "a") as sink:
        for seed, i, name in todo:
            reporter.check_cancelled()
            arm, fold = cfg.arm(name), folds[i]
            fdir = work_dir / f"fold{i}"
            pairs, agreement = None, None
            if arm.n:
                pairs, agreement = arm_pairs(
                    arm,
                    fold,
                    cfg,
                    fdir,
                    budget=budgets[i]["steps"],
                    progress=progress,
                    should_stop=should_stop,
                    device=device,
                )
            donors = online_donors(
                arm, fold, cfg, fdir, progress=progress, should_stop=should_stop, device=device
            )
            row = run_arm(
                arm, fold, pairs, seed=seed, budget=budgets[i]["steps"], cfg=cfg, device=device, donors=donors
            )
            if agreement:
                row["agreement"] = agreement
            if old := before.get((i, name, seed)):  # a rerun (remeasure): what the first run measured
                row["before"] = {k: old.get(k) for k in (*CV_METRICS, "cpu_flags")}
            row.update(row_tags or {})
            rows.append(row)
            sink.write(json.dumps(row) + "\n")
            sink.flush()
            settled += 1
            reporter.report(settled, dice_slice=row["dice_slice"])
            log.info(
                "crossval: fold %d %s seed %d: dice_slice %.3f dice_3d %.3f",
                i,
                name,
                seed,
                row["dice_slice"],
                row["dice_3d"],
            )
    report = summarise(rows, cfg, postprocess)
    report["folds"] = [
        {
            "fold": f.index,
            "train": list(f.data.split.train),
            "test": list(f.data.split.test),
            "real_pool": len(f.real_pool),
            "tumour_slices": len(f.data.real_train),
            "budget": budgets.get(f.index),
            "postprocess": postprocess.get(f.index),
            # a fold still choosing its budget: the held-out curves done so far (a new machine resumes them)
            "inner_curves": {
                v: json.loads(path.read_text())
                for v in inner[f.index]
                if f.index not in budgets
                and (path := inner_curve_path(work_dir / f"fold{f.index}", v)).is_file()
            },
        }
        for f in folds
    ]
    return report


# --- statistics -----------------------------------------------------------------------------------


def paired_gain(
    rows: Sequence[dict[str, Any]],
    arm: str,
    metric: str,
    *,
    folds: int,
    reference: str = REFERENCE,
    bootstrap: int = 2000,
    seed: int = 0,
) -> dict[str, Any] | None:
    """Gain of ``arm`` over ``reference`` in ``metric``: the mean paired difference per (fold, seed),
    and a 95 % patient-level bootstrap interval of the mean per-patient gain.

    Per patient, the gain is the mean over seeds of (arm - reference) on that patient's own score
    (``per_case``; kept as ``per_patient``, since with few patients one of them can carry the mean); the
    bootstrap resamples patients with replacement. Only pairs whose two rows both
    measured ``metric`` count (older rows lack the post-processed ones), and ran on the same kind of CPU
    (``cpu_flags``): a seed is a pair's shared randomness only there, since a run drifts across CPU kinds
    as much as across seeds (``cross_cpu_pairs`` counts the pairs left out). The arm "helps" only when
    its pairs cover every patient the reference was tested on (``untested_patients`` lists the others)
    and every one of the grid's ``folds`` folds (``untested_folds``: a grid run on one fold so far tests
    its reference on that fold's patients only), and the interval lies above 0. None when no pair exists.
    """
    by = {(r["fold"], r["seed"], r["arm"]): r for r in rows if metric in r}
    both = [(k[0], k[1]) for k in by if k[2] == arm and (k[0], k[1], reference) in by]
    pairs = [
        (f, s) for f, s in both if by[(f, s, arm)].get("cpu_flags") == by[(f, s, reference)].get("cpu_flags")
    ]
    if not pairs:
        return None
    run_diffs = [by[(f, s, arm)][metric] - by[(f, s, reference)][metric] for f, s in pairs]
    per_patient: dict[str, list[float]] = {}
    for f, s in pairs:
        ref = {c["case_id"]: c for c in by[(f, s, reference)]["per_case"]}
        for c in by[(f, s, arm)]["per_case"]:
            if (
                metric in c
                and c["case_id"] in ref
                and np.isfinite(c[metric])
                and np.isfinite(ref[c["case_id"]][metric])
            ):
                per_patient.setdefault(c["case_id"], []).append(c[metric] - ref[c["case_id"]][metric])
    means = {c: float(np.mean(v)) for c, v in per_patient.items()}  # insertion order: the bootstrap's
    # the patients the reference was tested on: an arm helps only where its pairs cover all of them (one
    # fold's two patients make a bootstrap interval, but not a verdict on the cohort)
    tested = {
        c["case_id"]
        for (_, _, a), r in by.items()
        if a == reference
        for c in r["per_case"]
        if metric in c and np.isfinite(c[metric])
    }
    untested = sorted(tested - set(means))
    untested_folds = sorted(set(range(folds)) - {f for f, _ in pairs})
    gains = np.array(list(means.values()))
    rng = np.random.default_rng(seed)
    boots = (
        gains[rng.integers(len(gains), size=(bootstrap, len(gains)))].mean(1) if len(gains) else np.zeros(1)
    )
    lo, hi = (float(x) for x in np.percentile(boots, [2.5, 97.5]))
    return {
        "mean_run_gain": float(np.mean(run_diffs)),
        "runs": len(run_diffs),
        "cross_cpu_pairs": len(both) - len(pairs),
        "mean_patient_gain": float(gains.mean()) if len(gains) else float("nan"),
        "patients": len(gains),
        "per_patient": {c: {"gain": means[c], "runs": len(per_patient[c])} for c in sorted(means)},
        "ci95": [lo, hi],
        "untested_patients": untested,
        "untested_folds": untested_folds,
        "helps": not untested
        and not untested_folds
        and (bool(lo > 0) if metric in HIGHER_IS_BETTER else bool(hi < 0)),
    }


def with_postprocessing(row: dict[str, Any], keep: bool) -> dict[str, Any]:
    """``row`` with :data:`POST_METRIC`: its 3D Dice after the post-processing its fold chose on the
    inner split (``keep``: the largest component's, else the raw one), per patient too. A row measured
    before the post-processed metrics existed gets none when its fold keeps the largest component."""
    pick = "dice_3d_lcc" if keep else "dice_3d"
    if pick not in row:
        return row
    cases = [{**c, POST_METRIC: c[pick]} for c in row["per_case"]]
    return {**row, POST_METRIC: row[pick], "per_case": cases}


def postprocessed(
    rows: Iterable[dict[str, Any]], postprocess: dict[int, dict[str, Any]]
) -> list[dict[str, Any]]:
    """``rows``, each with :data:`POST_METRIC` where its fold chose (``postprocess``: fold ->
    :func:`choose_postprocessing`); a row of a fold without a choice as it is."""
    return [
        with_postprocessing(r, postprocess[r["fold"]]["largest_component"]) if r["fold"] in postprocess else r
        for r in rows
    ]


def summarise(
    rows: Sequence[dict[str, Any]], cfg: CVConfig, postprocess: dict[int, dict[str, Any]] | None = None
) -> dict[str, Any]:
    """Per fold and pooled means per arm, the paired gains against the strong baseline, and the verdict.

    ``postprocess``: each fold's :func:`choose_postprocessing`; its rows then also get
    :data:`POST_METRIC`, and the recommendation says whether to post-process (the choice of all the
    folds' held-out patients together)."""
    postprocess = postprocess or {}
    rows = [r for r in rows if r["arm"] in cfg.arms and r["seed"] in cfg.seeds]
    measured = postprocessed(rows, postprocess)
    table = []
    for name in cfg.arms:
        mine = [r for r in measured if r["arm"] == name]
        if not mine:
            continue
        for fold in sorted({r["fold"] for r in mine}) + ["pooled"]:
            sel = mine if fold == "pooled" else [r for r in mine if r["fold"] == fold]
            entry = {"arm": name, "fold": fold, **{m: summarize([r[m] for r in sel]) for m in CV_METRICS}}
            entry |= {
                m: summarize(v) for m in (*LCC_METRICS, POST_METRIC) if (v := [r[m] for r in sel if m in r])
            }
            table.append(entry)
    gains = {
        name: {
            m: g
            for m in (*CV_METRICS, *LCC_METRICS, POST_METRIC)
            if (g := paired_gain(measured, name, m, bootstrap=cfg.bootstrap, folds=cfg.folds)) is not None
        }
        for name in cfg.arms
        if name != REFERENCE
    }
    # the generator against real copy-paste: each dHVAE-donor arm paired with its real-donor twin
    donor_gains = {
        name: {"against": twin}
        | {
            m: g
            for m in (*CV_METRICS, POST_METRIC)
            if (g := paired_gain(measured, name, m, reference=twin, bootstrap=cfg.bootstrap, folds=cfg.folds))
            is not None
        }
        for name in cfg.arms
        if (twin := ARMS[name].real_donor_twin()) in cfg.arms
    }
    # a recipe to recommend adds pairs or pasted tumours; the plain real-only rows are comparisons
    helping = [
        (n, g["dice_slice"])
        for n, g in gains.items()
        if g.get("dice_slice", {}).get("helps") and (ARMS[n].n or ARMS[n].online_insert)
    ]
    if helping:
        best, g = max(helping, key=lambda x: x[1]["mean_patient_gain"])
        arm = cfg.arm(best)
        # with a handful of patients one of them can carry the mean: say how many gain, and the median
        per_patient = [p["gain"] for p in g["per_patient"].values()]
        gaining, median = sum(x > 0 for x in per_patient), 100 * float(np.median(per_patient))
        recommendation = {
            "arm": best,
            "method": arm.method,
            "n": arm.n,
            "gain_points": 100 * g["mean_patient_gain"],
            "ci95_points": [100 * x for x in g["ci95"]],
            "online_insert": arm.online_insert,
            "online_donors": arm.online_donors if arm.online_insert else None,
            "patients_gaining": [gaining, len(per_patient)],
            "median_patient_gain_points": median,
            "words": f"{best} ({arm.recipe()}) beats your real data with online augmentation by "
            f"{100 * g['mean_patient_gain']:+.1f} slice-Dice points (95 % CI {100 * g['ci95'][0]:+.1f} to "
            f"{100 * g['ci95'][1]:+.1f}). It gains on {gaining} of {len(per_patient)} test patients, "
            f"{median:+.1f} points on the median one.",
        }
    else:
        recommendation = {
            "arm": REFERENCE,
            "method": "none",
            "n": 0,
            "words": "Nothing beats your real data with online augmentation: train on the real cases with "
            "the online augmentation (flips, affine, elastic, contrast, noise) at every step.",
        }
    if len(postprocess) == cfg.folds:  # every fold chose: one choice over all their held-out patients
        pooled = postprocess_choice(m for p in postprocess.values() for m in p["held_out"].values())
        recommendation["postprocess"] = "largest_component" if pooled["largest_component"] else "none"
        recommendation["words"] += (
            " Post-process its predictions: keep the largest 3D connected component"
            if pooled["largest_component"]
            else " Do not keep only the largest 3D connected component of its predictions: it does not help"
        ) + (
            f" (held-out training patients' 3D Dice {100 * pooled['dice_3d']:.1f} % without, "
            f"{100 * pooled['dice_3d_lcc']:.1f} % with)."
        )
    # a seed is done when every fold and arm of it ran; one begun has some of its rows
    per_seed = Counter(r["seed"] for r in rows)
    seeds_done = sorted(s for s, k in per_seed.items() if k >= len(cfg.arms) * cfg.folds)
    expected = len(cfg.arms) * cfg.folds * len(cfg.seeds)
    return {
        "config": cfg.to_dict(),
        "arms": {n: cfg.arm(n).settings() for n in cfg.arms},
        "reference": REFERENCE,
        "rows": [{k: v for k, v in r.items()} for r in rows],
        "table": table,
        "gains": gains,
        "donor_gains": donor_gains,
        "recommendation": recommendation,
        "complete": len(rows) >= expected,
        "runs_done": len(rows),
        "runs_expected": expected,
        "seeds_done": seeds_done,
        "seeds_begun": sorted(set(per_seed) - set(seeds_done)),
    }


def crossval_markdown(report: dict[str, Any], title: str = "Cross-validated efficacy") -> str:
    """The report's tables (per fold and pooled; paired gains) and its recommendation, in Markdown."""
    pct = lambda d: f"{100 * d['mean']:.1f} +- {100 * d['std']:.1f}"  # noqa: E731
    lines = [f"# {title}", ""]
    for f in report.get("folds", []):
        b = f.get("budget") or {}
        lines.append(
            f"- fold {f['fold']}: train {', '.join(f['train'])}; test {', '.join(f['test'])}; "
            f"{f['tumour_slices']} tumour + {f['real_pool'] - f['tumour_slices']} tumour-free slices; "
            f"budget {b.get('steps', '?')} steps (inner validation on "
            f"{', '.join(b.get('validation_patients', [])) or '?'})"
        )
    curves = [(f["fold"], f["budget"]["curve"]) for f in report.get("folds", []) if f.get("budget")]
    if curves:
        lines += [
            "",
            "Inner validation (strong baseline, slice Dice on the held-out training patients, mean of "
            "their curves, 3-point smoothed), in %:",
            "",
            "| step | " + " | ".join(f"fold {i}" for i, _ in curves) + " |",
            "|---|" + "---|" * len(curves),
        ]
        for j, point in enumerate(curves[0][1]):
            cells = [f"{100 * c[j]['smoothed']:.1f}" if j < len(c) else "" for _, c in curves]
            lines.append(f"| {point['step']} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Runs: {report['runs_done']} of {report['runs_expected']} (seeds done: {report['seeds_done']}"
        + (f"; begun: {report['seeds_begun']}" if report.get("seeds_begun") else "")
        + ").",
        "",
        "| arm | fold | runs | dice_slice (%) | dice_3d (%) | hd95 (mm) | fp_volume (ml) |",
        "|---|---|---|---|---|---|---|",
    ]
    for t in report["table"]:
        lines.append(
            f"| {t['arm']} | {t['fold']} | {t['dice_slice']['n']} | {pct(t['dice_slice'])} | {pct(t['dice_3d'])} "
            f"| {t['hd95']['mean']:.1f} +- {t['hd95']['std']:.1f} | {t['fp_volume']['mean']:.2f} +- {t['fp_volume']['std']:.2f} |"
        )
    lines += [
        "",
        f"Paired gain over `{report['reference']}` (the strong baseline), in points; 95 % CI from a patient bootstrap:",
        "",
        "| arm | runs | patients | dice_slice gain | CI | helps | dice_3d gain | CI | helps |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, g in report["gains"].items():
        if "dice_slice" not in g:
            continue
        s, d = g["dice_slice"], g["dice_3d"]
        lines.append(
            f"| {name} | {s['runs']} | {s['patients']} | {_gain_cells(s)} | {verdict(s)} "
            f"| {_gain_cells(d)} | {verdict(d)} |"
        )
    apart = {
        n: g["dice_slice"].get("cross_cpu_pairs", 0) for n, g in report["gains"].items() if "dice_slice" in g
    }
    if any(apart.values()):
        lines += [
            "",
            "Pairs left out because their two runs ran on different kinds of CPU: "
            + ", ".join(f"{n} {k}" for n, k in apart.items() if k)
            + ".",
        ]
    lcc = [t for t in report["table"] if "dice_3d_lcc" in t]
    if lcc:
        lines += [
            "",
            "The same runs' 3D metrics after keeping the largest 3D connected component (nnU-Net's "
            "post-processing), where the run measured them:",
            "",
            "| arm | fold | runs | dice_3d (%) | hd95 (mm) | fp_volume (ml) |",
            "|---|---|---|---|---|---|",
        ]
        for t in lcc:
            d, h, v = t["dice_3d_lcc"], t["hd95_lcc"], t["fp_volume_lcc"]
            lines.append(
                f"| {t['arm']} | {t['fold']} | {d['n']} | {pct(d)} | {h['mean']:.1f} +- {h['std']:.1f} "
                f"| {v['mean']:.2f} +- {v['std']:.2f} |"
            )
        lines += _gain_table(report, "dice_3d_lcc", "dice_3d gain, post-processed")
    chosen = [f["postprocess"] for f in report.get("folds", []) if f.get("postprocess")]
    if chosen:
        lines += [
            "",
            "Post-processing chosen on the inner split (the strong baseline at the budget, on the held-out "
            "training patients; nnU-Net's rule: keep the largest 3D component when it raises their mean "
            "3D Dice):",
            "",
            "| fold | held out | 3D Dice (%) | largest component (%) | kept | slice Dice (%), this run / "
            "the budget's curve |",
            "|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {c['fold']} | {', '.join(c['held_out'])} | {100 * c['dice_3d']:.1f} | "
            f"{100 * c['dice_3d_lcc']:.1f} | {'yes' if c['largest_component'] else 'no'} | "
            + ", ".join(
                f"{100 * m['dice_slice']:.2f} / {100 * m['curve_dice_slice']:.2f}"
                for m in c["held_out"].values()
            )
            + " |"
            for c in chosen
        ]
        lines += _gain_table(report, POST_METRIC, "dice_3d gain, post-processed as chosen")
    lines += _patient_table(report)
    lines += _donor_table(report)
    lines += ["", f"**Recommendation**: {report['recommendation']['words']}", ""]
    return "\n".join(lines)


def _patient_table(report: dict[str, Any]) -> list[str]:
    """Markdown lines: each arm's paired gain per test patient (mean over its seeds), slice Dice and the
    post-processed 3D Dice, so that a mean carried by one patient shows as such."""
    paired = [(n, g) for n, g in report["gains"].items() if "dice_slice" in g]
    patients = sorted({c for _, g in paired for c in g["dice_slice"].get("per_patient", {})})
    if not patients:
        return []

    def cell(g: dict[str, Any], metric: str, case: str) -> str:
        p = g.get(metric, {}).get("per_patient", {}).get(case)
        return f"{100 * p['gain']:+.1f}" if p else "n/a"

    return [
        "",
        f"Paired gain over `{report['reference']}` per test patient (mean over the seeds run, in points; "
        "slice Dice / post-processed 3D Dice):",
        "",
        "| arm | " + " | ".join(patients) + " |",
        "|---|" + "---|" * len(patients),
        *(
            f"| {n} | "
            + " | ".join(f"{cell(g, 'dice_slice', c)} / {cell(g, POST_METRIC, c)}" for c in patients)
            + " |"
            for n, g in paired
        ),
    ]


def _donor_table(report: dict[str, Any]) -> list[str]:
    """Markdown lines: each dHVAE-donor arm's paired gain over its real-donor twin in every metric the
    pair has (none if no pair ran): slice Dice, raw and post-processed 3D Dice, HD95, the false-positive
    volume."""
    paired = [(n, g) for n, g in report.get("donor_gains", {}).items() if "dice_slice" in g]
    if not paired:
        return []
    return [
        "",
        "Paired gain of dHVAE-generated tumours over real ones (each arm against its twin that pastes real "
        "tumours, all else equal), Dice in points, HD95 in mm and false-positive volume in ml (below 0: "
        "shorter, fewer); 95 % CI from a patient bootstrap:",
        "",
        "| arm | against | runs | patients | dice_slice gain | CI | dice_3d gain | CI "
        "| dice_3d gain, post-processed | CI | hd95 change (mm) | CI | fp_volume change (ml) | CI |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        *(
            f"| {n} | {g['against']} | {g['dice_slice']['runs']} | {g['dice_slice']['patients']} "
            f"| {_gain_cells(g['dice_slice'])} | {_gain_cells(g.get('dice_3d'))} "
            f"| {_gain_cells(g.get(POST_METRIC))} | {_gain_cells(g.get('hd95'), scale=1)} "
            f"| {_gain_cells(g.get('fp_volume'), scale=1)} |"
            for n, g in paired
        ),
    ]


def _gain_table(report: dict[str, Any], metric: str, label: str) -> list[str]:
    """Markdown lines: each arm's paired gain in ``metric`` with its interval (none if no arm has it)."""
    paired = [(n, g[metric]) for n, g in report["gains"].items() if metric in g]
    if not paired:
        return []
    return [
        "",
        f"| arm | runs | patients | {label} | CI | helps |",
        "|---|---|---|---|---|---|",
        *(f"| {n} | {g['runs']} | {g['patients']} | {_gain_cells(g)} | {verdict(g)} |" for n, g in paired),
    ]


def verdict(g: dict[str, Any]) -> str:
    """A gain's "helps" cell: yes, no, or not yet while some tested patients or folds have no pair."""
    if missing := g.get("untested_patients"):
        return f"not yet ({len(missing)} patients unpaired)"
    if folds := g.get("untested_folds"):
        return f"not yet (fold{'s' * (len(folds) > 1)} {', '.join(map(str, folds))} unpaired)"
    return "yes" if g["helps"] else "no"


def _gain_cells(g: dict[str, Any] | None, scale: float = 100) -> str:
    """Two Markdown cells: a paired gain (a Dice fraction times 100 is points; ``scale=1`` keeps the
    metric's own unit, ml or mm) and its 95 % interval (n/a when no pair ran)."""
    if not g:
        return "n/a | n/a"
    lo, hi = (scale * x for x in g["ci95"])
    return f"{scale * g['mean_patient_gain']:+.1f} | [{lo:+.1f}, {hi:+.1f}]"


def plot_crossval(report: dict[str, Any], path: Path) -> None:
    """Paired gains (points) with their bootstrap intervals, slice and 3D Dice, one bar per arm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n, g in report["gains"].items() if "dice_slice" in g]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=False)
    for ax, metric in zip(axes, ("dice_slice", "dice_3d"), strict=True):
        means = [100 * report["gains"][n][metric]["mean_patient_gain"] for n in names]
        lo = [m - 100 * report["gains"][n][metric]["ci95"][0] for m, n in zip(means, names, strict=True)]
        hi = [100 * report["gains"][n][metric]["ci95"][1] - m for m, n in zip(means, names, strict=True)]
        ax.bar(names, means, yerr=[lo, hi], capsize=4, color="tab:blue")
        ax.axhline(0, color="k", lw=0.8)
        ax.set_title(f"{metric} gain over {report['reference']} (points, 95 % CI)")
        ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_crossval(
    report: dict[str, Any], out_dir: Path, stem: str = "efficacy_cv", extra_md: str = ""
) -> None:
    """``out_dir/<stem>.{json,md,png}``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if any("dice_slice" in g for g in report["gains"].values()):
        plot_crossval(report, out_dir / f"{stem}.png")
    with atomic_file(out_dir / f"{stem}.md", "w") as f:
        f.write(crossval_markdown(report) + extra_md)
    write_json_atomic(out_dir / f"{stem}.json", json_safe(report))
