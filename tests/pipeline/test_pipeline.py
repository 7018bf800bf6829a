"""ingest -> train -> generate -> export, through the functions the CLI and the worker call."""

import json
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from imaging.cohort import CohortSpec
from imaging.errors import Cancelled, LowAcceptance
from imaging.export import verify_dataset
from imaging.phantoms import make_phantom_cohort
from imaging.preprocess import PreprocessConfig
from models.registry import get_generator
from pipeline import pipeline
from pipeline.pipeline import SampleSpec, TrainSpec

REPO = Path(__file__).resolve().parents[2]
SHARED_TRAIN = REPO.parent / "shared/data/brats2015-deepmedic/train"
PREP = PreprocessConfig(shape=(64, 64, 32))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model trained for a few steps on a phantom cohort at 64 x 64."""
    root = tmp_path_factory.mktemp("pipe")
    cohort = make_phantom_cohort(root / "cohort", n_cases=3, shape=(80, 80, 40), seed=1)
    ing = pipeline.ingest(cohort, cache_dir=root / "cache", spec=CohortSpec(), prep=PREP)
    ckpt = pipeline.train(
        ing, TrainSpec(preset="tiny", steps=20, seed=3), model_dir=root / "model", device="cpu"
    )
    return root, cohort, ing, ckpt


def synthetic_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*Tr/synth_*.nii.gz"))}


def test_ingest_summary(trained):
    _, _, ing, _ = trained
    assert ing.summary["layout"] == "folders" and len(ing.summary["cases"]) == 3
    assert ing.summary["channel"] == "flair" and ing.summary["tumour_slices"] > 0
    assert ing.slices.slices.shape[1:] == (2, 64, 64)


def test_generate_exact_n_and_deterministic(trained, tmp_path):
    root, _, _, ckpt = trained
    a = pipeline.generate(
        ckpt, SampleSpec(5, seed=11, min_mask_area=20), out_dir=tmp_path / "a", device="cpu"
    )
    pipeline.generate(ckpt, SampleSpec(5, seed=11, min_mask_area=20), out_dir=tmp_path / "b", device="cpu")
    pipeline.generate(ckpt, SampleSpec(5, seed=12, min_mask_area=20), out_dir=tmp_path / "c", device="cpu")
    assert a.n_pairs == 5 and 0 < a.acceptance <= 1
    ba, bb, bc = (synthetic_bytes(tmp_path / d) for d in "abc")
    assert len(ba) == 10 and ba == bb and ba != bc
    manifest = verify_dataset(tmp_path / "a")
    assert manifest["generation"]["n_pairs"] == 5 and manifest["generation"]["seed"] == 11
    for name in ba:
        img = nib.load(tmp_path / "a" / ("imagesTr" if name.endswith("_0000.nii.gz") else "labelsTr") / name)
        data = np.asarray(img.dataobj)
        assert data.shape == (64, 64, 1)
        if "labelsTr" in str(img.get_filename()):
            assert data.dtype == np.uint8 and set(np.unique(data)) <= {0, 1} and data.sum() >= 20
        else:
            assert data.dtype == np.float32 and 0.0 <= data.min() and data.max() <= 1.0


def test_generate_resumes_byte_identical_after_interruption(trained, tmp_path):
    _, _, _, ckpt = trained
    spec = SampleSpec(n_pairs=6, seed=5, slices_per_volume=2, min_mask_area=20)
    kw = dict(device="cpu")
    pipeline.generate(ckpt, spec, out_dir=tmp_path / "straight", **kw)
    done = []
    with pytest.raises(Cancelled):
        pipeline.generate(
            ckpt,
            spec,
            out_dir=tmp_path / "cut",
            progress=lambda p: done.append(p.done),
            should_stop=lambda: len(done) > 3,
            **kw,
        )
    partial = synthetic_bytes(tmp_path / "cut")
    assert 0 < len(partial) < 12 and not list((tmp_path / "cut").rglob("*.partial"))
    r = pipeline.generate(ckpt, spec, out_dir=tmp_path / "cut", **kw)
    assert r.resumed_from == len(partial) // 2
    assert synthetic_bytes(tmp_path / "cut") == synthetic_bytes(tmp_path / "straight")
    straight = json.loads((tmp_path / "straight" / "manifest.json").read_text())
    resumed = json.loads((tmp_path / "cut" / "manifest.json").read_text())
    assert straight["files"] == resumed["files"]


def test_generate_refuses_other_settings_in_same_folder(trained, tmp_path):
    _, _, _, ckpt = trained
    pipeline.generate(ckpt, SampleSpec(2, seed=1, min_mask_area=20), out_dir=tmp_path, device="cpu")
    with pytest.raises(Exception, match="other settings"):
        pipeline.generate(ckpt, SampleSpec(2, seed=2, min_mask_area=20), out_dir=tmp_path, device="cpu")


def test_low_acceptance_is_a_clear_error(trained, tmp_path):
    _, _, _, ckpt = trained
    with pytest.raises(LowAcceptance, match="mask-area floor of 4096 px"):
        pipeline.generate(ckpt, SampleSpec(2, seed=1, min_mask_area=64 * 64), out_dir=tmp_path, device="cpu")


def test_an_unreachable_n_fails_early_and_its_progress_shows_the_draws(trained, tmp_path):
    """A floor nothing reaches: the generation stops once even an optimistic rate cannot give N within
    the cap (50 * N draws), long before the cap, and its progress reported the draws meanwhile."""
    from models.sampler import EARLY_STOP_DRAWS, max_draws

    _, _, _, ckpt = trained
    seen = []
    spec = SampleSpec(200, seed=1, min_mask_area=64 * 64)
    with pytest.raises(LowAcceptance, match="cannot be reached within the cap") as err:
        pipeline.generate(ckpt, spec, out_dir=tmp_path, device="cpu", progress=seen.append)
    draws = [p.metrics["draws"] for p in seen if "draws" in p.metrics]
    assert (
        draws
        and draws == sorted(draws)
        and all(p.metrics["acceptance"] == 0 for p in seen if "draws" in p.metrics)
    )
    cap = max_draws(200, load_sampling(ckpt))
    assert EARLY_STOP_DRAWS <= draws[-1] < cap / 4, (draws[-1], cap, str(err.value))


def load_sampling(ckpt):
    from models.checkpoint import load_checkpoint

    return load_checkpoint(ckpt)["config_obj"].sampling


def test_augment_writes_real_and_synthetic(trained, tmp_path):
    root, cohort, _, _ = trained
    r = pipeline.augment(
        pipeline.ingest(cohort, cache_dir=root / "cache", prep=PREP),
        TrainSpec(preset="tiny", steps=4, seed=0),
        SampleSpec(n_pairs=3, seed=0, min_mask_area=20),
        out_dir=tmp_path / "aug",
        device="cpu",
    )
    ds = json.loads((tmp_path / "aug" / "dataset.json").read_text())
    assert ds["numTraining"] == 6 and ds["real_cases"] == 3 and ds["synthetic_cases"] == 3
    assert r.checkpoint.exists()
    verify_dataset(tmp_path / "aug")
    # the real cases are on the same grid as the synthetic ones
    real = nib.load(next((tmp_path / "aug" / "imagesTr").glob("phantom_000_0000.nii.gz")))
    synth = nib.load(tmp_path / "aug" / "imagesTr" / "synth_00000_0000.nii.gz")
    np.testing.assert_allclose(real.header.get_zooms()[:2], synth.header.get_zooms()[:2])


def test_fine_tune_from_base_model(trained, tmp_path):
    _, _, ing, ckpt = trained
    ft = pipeline.train(
        ing, TrainSpec(preset="tiny", steps=2, base_checkpoint=ckpt), model_dir=tmp_path / "ft", device="cpu"
    )
    assert ft.exists()
    with pytest.raises(Exception, match="same preset"):
        pipeline.train(
            ing,
            TrainSpec(preset="small", steps=1, base_checkpoint=ckpt),
            model_dir=tmp_path / "ft2",
            device="cpu",
        )


@pytest.mark.slow
@pytest.mark.skipif(not SHARED_TRAIN.is_dir(), reason="../shared/data/brats2015-deepmedic not present")
def test_cli_augment_on_real_brats(tmp_path):
    """The issue's exact command, from the repository root (output redirected to tmp)."""
    out = tmp_path / "augmented"
    cmd = [
        str(REPO / ".venv/bin/dhvae"),
        "--no-progress",
        "augment",
        "--cohort",
        "../shared/data/brats2015-deepmedic/train",
        "--preset",
        "tiny",
        "--steps",
        "30",
        "--n-pairs",
        "12",
        "--seed",
        "7",
        "--out",
        str(out),
        "--cache-dir",
        str(tmp_path / "cache"),
    ]
    proc = subprocess.run(
        cmd, cwd=REPO, capture_output=True, text=True, timeout=1800
    )  # a bound, not a target: CI machines can be loaded
    assert proc.returncode == 0, proc.stderr
    images = sorted(p.name for p in (out / "imagesTr").iterdir())
    labels = sorted(p.name for p in (out / "labelsTr").iterdir())
    assert len([n for n in images if n.startswith("synth_")]) == 12
    assert len([n for n in labels if n.startswith("synth_")]) == 12
    assert {n for n in images if not n.startswith("synth_")} == {
        "brats_2013_pat0005_1_0000.nii.gz",
        "brats_2013_pat0006_1_0000.nii.gz",
    }
    manifest = verify_dataset(out)
    assert manifest["cohort"]["cases"] == ["brats_2013_pat0005_1", "brats_2013_pat0006_1"]
    for name in labels:
        mask = np.asarray(nib.load(out / "labelsTr" / name).dataobj)
        assert mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 1}
        if name.startswith("synth_"):
            assert mask.shape == (128, 128, 1) and mask.sum() >= 200


@pytest.mark.slow  # a subprocess or seconds of training: CI runs it (make test)
def test_cli_reports_bad_cohort_cleanly(tmp_path):
    (tmp_path / "case1").mkdir()
    (tmp_path / "case1" / "flair.nii.gz").write_bytes(b"not a nifti")
    (tmp_path / "case1" / "seg.nii.gz").write_bytes(b"not a nifti")
    proc = subprocess.run(
        [str(REPO / ".venv/bin/dhvae"), "ingest", "--cohort", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "case1/flair.nii.gz" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow  # a subprocess or seconds of training: CI runs it (make test)
def test_presets_json():
    proc = subprocess.run(
        [str(REPO / ".venv/bin/dhvae"), "presets", "--json"], capture_output=True, text=True, timeout=120
    )
    rows = json.loads(proc.stdout)
    assert set(rows) >= {"paper", "small", "tiny"}
    p = rows["paper"]["parameters"]
    assert p["total"] == p["encoder"] + p["decoder"] + p["discriminator"]
    assert 55e6 < p["encoder"] + p["decoder"] < 70e6


@pytest.mark.parametrize("model", ["hvae", "traditional", "insert", "insert_healthy"])
def test_augment_with_a_baseline_gives_the_same_export(trained, tmp_path, model):
    root, cohort, _, _ = trained
    r = pipeline.augment(
        pipeline.ingest(cohort, cache_dir=root / "cache", prep=PREP),
        TrainSpec(model=model, preset="tiny", steps=2, seed=0),
        SampleSpec(n_pairs=2, seed=0, min_mask_area=0),
        out_dir=tmp_path / model,
        device="cpu",
    )
    manifest = verify_dataset(tmp_path / model)
    assert manifest["generator"]["model"] == model
    assert json.loads((tmp_path / model / "dataset.json").read_text())["synthetic_cases"] == 2
    assert (r.checkpoint is None) == (model in ("traditional", "insert", "insert_healthy"))
    if r.checkpoint is None:  # the manifest records the drawing recipe's own settings and version
        entry = get_generator(model)
        assert manifest["generator"]["config"] == {**vars(entry.config), "version": entry.version}
    if model == "insert_healthy":  # (the manifest said "any" before the registry carried the config)
        assert manifest["generator"]["config"]["recipients"] == "tumour_free"
    dataset = json.loads((tmp_path / model / "dataset.json").read_text())
    assert dataset["real_cases_geometry"].startswith("resampled") and "label_mapping" in dataset
    if model == "hvae":  # a generated image is 0 outside its brain (zero_background, the default)
        img = np.asarray(nib.load(tmp_path / model / "imagesTr" / "synth_00000_0000.nii.gz").dataobj)
        assert (img == 0).any()


def test_a_donor_insertion_pastes_its_dhvae_s_tumours_into_tumour_free_slices(trained, tmp_path):
    """``insert_healthy_dhvae``: the job trains a dHVAE (its model), samples donors from it and pastes
    their tumours into the cohort's tumour-free slices, exactly the recipe the efficacy grid measured
    (``DonorInsert.pairs`` over ``sample_array``); binary masks inside the brain, deterministic per seed."""
    from models.checkpoint import load_checkpoint, model_from_checkpoint
    from models.insert import brain_mask
    from models.registry import DONOR_INSERTS
    from models.sampler import sample_array

    root, cohort, ing, ckpt = trained
    spec = SampleSpec(n_pairs=3, slices_per_volume=2, seed=5, min_mask_area=40)
    runs = [
        pipeline.augment(
            ing,
            TrainSpec(model="insert_healthy_dhvae", preset="tiny", steps=22, seed=3, base_checkpoint=ckpt),
            spec,
            out_dir=tmp_path / name,
            model_dir=tmp_path / f"{name}.model",
            device="cpu",
        )
        for name in ("a", "b")
    ]
    manifest = verify_dataset(tmp_path / "a")
    generator = manifest["generator"]
    assert generator["model"] == "insert_healthy_dhvae" and generator["config"]["recipients"] == "tumour_free"
    twin = get_generator("insert_healthy")  # its paste is its twin's: the same settings and version
    assert generator["config"] == {**vars(twin.config), "version": twin.version}
    assert generator["donor"]["model"] == "dhvae" and generator["donor"]["pairs"] == 6  # min(3 x 2, 500)
    assert load_checkpoint(runs[0].checkpoint)["config_obj"].model == "dhvae"  # the job's model
    assert synthetic_bytes(tmp_path / "a") == synthetic_bytes(tmp_path / "b")

    model, payload = model_from_checkpoint(runs[0].checkpoint)
    sampling = payload["config_obj"].replace(**{"sampling.min_mask_area": 40}).sampling
    donors = sample_array(model, 6, seed=5, cfg=sampling, image_size=64)
    want = list(DONOR_INSERTS["insert_healthy_dhvae"].pairs(donors, ing.slices.cases, 6, seed=5))
    healthy = [
        c.image[:, :, k]
        for c in ing.slices.cases
        for k in range(c.image.shape[-1])
        if not c.mask[:, :, k].any()
    ]
    for v in range(3):
        image = np.asarray(nib.load(tmp_path / "a" / "imagesTr" / f"synth_{v:05d}_0000.nii.gz").dataobj)
        mask = np.asarray(nib.load(tmp_path / "a" / "labelsTr" / f"synth_{v:05d}.nii.gz").dataobj)
        assert image.shape == mask.shape == (64, 64, 2) and set(np.unique(mask)) == {0, 1}
        for k in range(2):
            np.testing.assert_allclose(image[:, :, k], want[2 * v + k][0], atol=1e-6)
            np.testing.assert_array_equal(mask[:, :, k], want[2 * v + k][1])
            assert mask[:, :, k].sum() >= 30 and not (mask[:, :, k] & ~brain_mask(image[:, :, k])).any()
            away = ~ndimage.binary_dilation(mask[:, :, k] > 0, iterations=12)  # the recipient, off the tumour
            assert min(np.abs(image[:, :, k] - h)[away].max() for h in healthy) < 1e-3


def test_the_drawn_augmentations_stream_their_pairs(trained):
    """A generator that trains nothing yields its pairs one at a time, so an export of N pairs holds one
    in memory, not N: a billion pairs are asked for and the first comes at once."""
    _, _, ing, _ = trained
    for name in ("traditional", "insert", "insert_healthy"):
        pairs = get_generator(name).draw(ing.slices, 10**9, 0)
        assert not isinstance(pairs, np.ndarray)
        first = next(iter(pairs))
        assert first.shape == (2, 64, 64) and first.dtype == np.float32


def test_augment_can_export_the_cases_as_uploaded(trained, tmp_path):
    root, cohort, _, _ = trained
    pipeline.augment(
        cohort,
        TrainSpec(model="traditional", preset="tiny", steps=1, seed=0),
        SampleSpec(n_pairs=2, seed=0, real_cases="uploaded"),
        out_dir=tmp_path / "out",
        cache_dir=root / "cache-uploaded",
        device="cpu",
    )
    verify_dataset(tmp_path / "out")
    dataset = json.loads((tmp_path / "out" / "dataset.json").read_text())
    assert dataset["real_cases_geometry"].startswith("as uploaded") and dataset["real_cases"] == 3
    real = sorted((tmp_path / "out" / "labelsTr").glob("phantom_*"))
    original = nib.load(sorted(cohort.rglob("*.nii.gz"))[0])
    assert nib.load(real[0]).shape == original.shape[:3] == (80, 80, 40)  # the upload's own grid
    assert set(np.unique(np.asarray(nib.load(real[0]).dataobj))) <= {0, 1}
    with pytest.raises(Exception, match="real_cases"):
        SampleSpec(n_pairs=1, real_cases="original")


def test_cli_nits(tmp_path, capsys):
    """--version, argparse's own error for an unknown preset, the empty folder named, help on every flag."""
    from pipeline import cli

    with pytest.raises(SystemExit) as out:
        cli.main(["--version"])
    assert out.value.code == 0 and capsys.readouterr().out.startswith("dhvae ")
    with pytest.raises(SystemExit) as out:
        cli.main(["train", "--cohort", str(tmp_path), "--model-dir", str(tmp_path / "m"), "--preset", "huge"])
    assert out.value.code == 2 and "invalid choice: 'huge'" in capsys.readouterr().err
    empty = tmp_path / "empty_cohort"
    empty.mkdir()
    assert cli.main(["--no-progress", "ingest", "--cohort", str(empty)]) == 2
    assert f"  - {empty}: no cases found" in capsys.readouterr().err
    text = cli.build_parser().format_help()
    assert "log what the engine does" in text and "no progress bars" in text
