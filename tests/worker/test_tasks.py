"""Each Celery task run in this process with a fake job store (no Redis, no Celery worker): the body
runs through ``run_job``, the job ends in the right state, model records follow, and a job that fails
or is cancelled leaves nothing half-written."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest

from contract.records import CohortRecord, ModelRecord
from contract.schemas import JobKind, JobState, ModelStatus
from imaging.export import verify_dataset
from imaging.phantoms import make_phantom_cohort
from runtime.jobs import JobStore, now_iso
from runtime.storage import LocalStorage, new_id
from tests.worker.fakes import FakeJobStore

TENANT = "tenant-a"


@pytest.fixture
def env(tmp_path, monkeypatch):
    """Worker settings on a temporary data dir, and the fake store in place of Redis."""
    monkeypatch.setenv("DHVAE_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("DHVAE_REDIS_URL", "redis://127.0.0.1:1/0")  # never reached: the store is fake
    monkeypatch.setenv("DHVAE_PROGRESS_INTERVAL_S", "0")
    from worker import jobrun, settings

    settings.get_settings.cache_clear()
    jobs = FakeJobStore()
    monkeypatch.setattr(jobrun, "job_store", lambda: jobs)
    from worker import tasks

    yield tasks, jobs, LocalStorage(tmp_path / "data")
    settings.get_settings.cache_clear()


@pytest.fixture(scope="module")
def cohort_files(tmp_path_factory) -> Path:
    return make_phantom_cohort(tmp_path_factory.mktemp("cohort") / "files", n_cases=3, shape=(48, 48, 16))


def store_cohort(storage: LocalStorage, files: Path) -> str:
    """A cohort as the API leaves one: its files under the cohort folder and its record."""
    import shutil

    cohort_id = new_id("coh")
    shutil.copytree(files, storage.path(TENANT, "cohorts", cohort_id) / "files")
    record = CohortRecord(
        id=cohort_id, cases=[], channels=[], tumour_slices=0, warnings=[], created_at=now_iso()
    )
    storage.write(TENANT, record)
    return cohort_id


def reserve_model(storage: LocalStorage, job_id: str, **fields) -> str:
    model_id = new_id("mdl")
    storage.write(
        TENANT,
        ModelRecord(
            id=model_id,
            status=ModelStatus.training,
            source="training",
            job_id=job_id,
            created_at=now_iso(),
            **fields,
        ),
    )
    return model_id


def train_payload(job_id: str, cohort_id: str, model_id: str, steps: int = 3) -> dict:
    return {
        "job_id": job_id,
        "tenant": TENANT,
        "cohort_id": cohort_id,
        "model_id": model_id,
        "preset": "tiny",
        "steps": steps,
    }


def new_job(jobs: FakeJobStore, kind: JobKind) -> str:
    job_id = new_id("job")
    jobs.create(job_id, tenant=TENANT, kind=kind, request={})
    return job_id


def model_status(storage: LocalStorage, model_id: str) -> ModelStatus | None:
    record = storage.read(TENANT, ModelRecord, model_id)
    return record.status if record else None


def test_the_fake_store_has_the_real_store_s_methods():
    for name, method in inspect.getmembers(FakeJobStore, inspect.isfunction):
        if name.startswith("_") or name in ("state", "error", "stages"):
            continue
        assert hasattr(JobStore, name), name
        assert inspect.signature(method) == inspect.signature(getattr(JobStore, name)), name


def test_train_then_generate(env, cohort_files):
    tasks, jobs, storage = env
    cohort_id = store_cohort(storage, cohort_files)
    job_id = new_job(jobs, JobKind.training)
    model_id = reserve_model(storage, job_id, cohort_id=cohort_id)
    tasks.train(train_payload(job_id, cohort_id, model_id))
    assert jobs.state(job_id) == JobState.succeeded, jobs.error(job_id)
    assert jobs.stages(job_id) == ["ingest", "train"] and jobs.records[job_id]["attempts"] == "1"
    record = storage.read(TENANT, ModelRecord, model_id)
    assert record is not None and record.status == ModelStatus.ready and record.config["preset"] == "tiny"
    model_dir = storage.path(TENANT, "models", model_id)
    assert (model_dir / "model.pt").is_file() and not (model_dir / "last.pt").exists()
    assert not jobs.leases  # released

    gen_id = new_job(jobs, JobKind.generation)
    tasks.generate(
        {
            "job_id": gen_id,
            "tenant": TENANT,
            "model_id": model_id,
            "n_pairs": 2,
            "seed": 1,
            "min_mask_area": 0,
        }
    )
    assert jobs.state(gen_id) == JobState.succeeded, jobs.error(gen_id)
    manifest = verify_dataset(storage.path(TENANT, "outputs", gen_id))
    assert manifest["generation"]["n_pairs"] == 2


def test_augment_exports_the_cohort_and_the_pairs(env, cohort_files):
    tasks, jobs, storage = env
    cohort_id = store_cohort(storage, cohort_files)
    job_id = new_job(jobs, JobKind.augmentation)
    model_id = reserve_model(storage, job_id, cohort_id=cohort_id)
    payload = {"job_id": job_id, "tenant": TENANT, "cohort_id": cohort_id, "model_id": model_id}
    tasks.augment({**payload, "n_pairs": 2, "preset": "tiny", "steps": 2, "min_mask_area": 0})
    assert jobs.state(job_id) == JobState.succeeded, jobs.error(job_id)
    ds = json.loads((storage.path(TENANT, "outputs", job_id) / "dataset.json").read_text())
    assert ds["real_cases"] == 3 and ds["synthetic_cases"] == 2
    assert model_status(storage, model_id) == ModelStatus.ready


def test_a_deleted_cohort_fails_the_job_and_the_model(env):
    tasks, jobs, storage = env
    job_id = new_job(jobs, JobKind.augmentation)
    model_id = reserve_model(storage, job_id)
    missing = new_id("coh")
    tasks.augment(
        {
            "job_id": job_id,
            "tenant": TENANT,
            "cohort_id": missing,
            "model_id": model_id,
            "n_pairs": 1,
            "steps": 1,
        }
    )
    assert jobs.state(job_id) == JobState.failed
    error = jobs.error(job_id)
    assert error is not None and error.type == "CohortError" and error.problems[0].file == missing
    assert model_status(storage, model_id) == ModelStatus.failed
    assert not storage.path(TENANT, "outputs", job_id).exists()


def test_cancelled_before_it_started_runs_nothing_and_ends_the_model(env, cohort_files):
    tasks, jobs, storage = env
    cohort_id = store_cohort(storage, cohort_files)
    job_id = new_job(jobs, JobKind.training)
    model_id = reserve_model(storage, job_id, cohort_id=cohort_id)
    jobs.update(job_id, {"cancel": "1"})  # a cancel that raced the delivery
    tasks.train(train_payload(job_id, cohort_id, model_id))
    assert jobs.state(job_id) == JobState.cancelled and jobs.records[job_id]["attempts"] == "0"
    assert model_status(storage, model_id) == ModelStatus.cancelled
    assert not (storage.path(TENANT, "models", model_id) / "model.pt").exists()


def test_cancel_while_running_stops_at_the_next_step(env, cohort_files, monkeypatch):
    tasks, jobs, storage = env
    cohort_id = store_cohort(storage, cohort_files)
    job_id = new_job(jobs, JobKind.training)
    model_id = reserve_model(storage, job_id, cohort_id=cohort_id)
    original = jobs.set_progress

    def cancel_once_training(job, progress):  # the user's DELETE arrives during training
        if progress.stage == "train" and progress.done >= 1:
            jobs.records[job]["cancel"] = "1"
        return original(job, progress)

    monkeypatch.setattr(jobs, "set_progress", cancel_once_training)
    payload = {"job_id": job_id, "tenant": TENANT, "cohort_id": cohort_id, "model_id": model_id}
    tasks.train({**payload, "preset": "tiny", "steps": 500})
    assert jobs.state(job_id) == JobState.cancelled
    assert model_status(storage, model_id) == ModelStatus.cancelled
    assert not list(storage.path(TENANT, "models", model_id).glob("*.pt"))


def test_a_finished_job_delivered_again_runs_nothing(env):
    tasks, jobs, storage = env
    job_id = new_job(jobs, JobKind.generation)
    jobs.transition(job_id, {JobState.queued}, JobState.succeeded)
    before = len(jobs.events[job_id])
    tasks.generate({"job_id": job_id, "tenant": TENANT, "model_id": new_id("mdl"), "n_pairs": 1})
    assert jobs.state(job_id) == JobState.succeeded and len(jobs.events[job_id]) == before


def test_a_crash_is_an_internal_error_and_cleans_up(env, monkeypatch):
    tasks, jobs, storage = env
    job_id = new_job(jobs, JobKind.generation)
    model_id = new_id("mdl")
    storage.write(TENANT, ModelRecord(id=model_id, status="ready", source="import", created_at=now_iso()))
    (storage.path(TENANT, "models", model_id) / "model.pt").write_bytes(b"")
    from pipeline import pipeline

    def explode(*args, **kwargs):
        out = storage.path(TENANT, "outputs", job_id)
        (out / "imagesTr").mkdir(parents=True)  # something half-written
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(pipeline, "generate", explode)
    tasks.generate({"job_id": job_id, "tenant": TENANT, "model_id": model_id, "n_pairs": 1})
    error = jobs.error(job_id)
    assert jobs.state(job_id) == JobState.failed and error is not None
    assert error.type == "InternalError" and "disk on fire" in error.message
    assert not storage.path(TENANT, "outputs", job_id).exists()


def _checkpoint(path: Path) -> Path:
    from models.checkpoint import save_checkpoint
    from models.config import get_preset
    from models.registry import build_model

    cfg = get_preset("tiny").replace(**{"network.image_size": 32})
    save_checkpoint(path, model=build_model(cfg), config=cfg, step=0)
    return path


@pytest.mark.parametrize("valid", [True, False])
def test_import_model(env, valid):
    tasks, jobs, storage = env
    staging = storage.new_staging(TENANT)
    upload = staging / "checkpoint.pt"
    if valid:
        _checkpoint(upload)
    else:
        upload.write_bytes(b"PK\x03\x04 not really a checkpoint")
    job_id = new_job(jobs, JobKind.model_import)
    model_id = new_id("mdl")
    storage.write(TENANT, ModelRecord(id=model_id, status="training", source="import", created_at=now_iso()))
    tasks.import_model(
        {"job_id": job_id, "tenant": TENANT, "model_id": model_id, "upload": f"{staging.name}/checkpoint.pt"}
    )
    assert not staging.exists()  # the staged upload is gone either way
    if valid:
        assert jobs.state(job_id) == JobState.succeeded, jobs.error(job_id)
        record = storage.read(TENANT, ModelRecord, model_id)
        assert record is not None and record.status == ModelStatus.ready and record.preset == "tiny"
    else:
        assert jobs.state(job_id) == JobState.failed
        error = jobs.error(job_id)
        assert error is not None and error.type == "CheckpointError"
        assert storage.read(TENANT, ModelRecord, model_id) is None  # a rejected import leaves no model


@pytest.mark.slow  # trains a generator and U-Nets, computes VGG16 metrics: ~40 s on 2 cores
def test_evaluate_writes_the_report(env, cohort_files):
    tasks, jobs, storage = env
    cohort_id = store_cohort(storage, cohort_files)
    job_id = new_job(jobs, JobKind.evaluation)
    tasks.evaluate(
        {
            "job_id": job_id,
            "tenant": TENANT,
            "cohort_id": cohort_id,
            "model": "vae",
            "steps": 2,
            "n_pairs": [2],
            "seeds": 1,
            "test_fraction": 0.34,
            "protocols": ["fixed_epochs"],
            "baselines": ["traditional"],
            "unet": "tiny",
            "unet_epochs": 1,
        }
    )
    assert jobs.state(job_id) == JobState.succeeded, jobs.error(job_id)
    out = storage.path(TENANT, "outputs", job_id)
    report = json.loads((out / "report.json").read_text())
    assert report["cohort_id"] == cohort_id and report["config"]["methods"][0] == "none"
    assert {r["method"] for r in report["rows"]} | set(report["failed_generators"]) == {
        "none",
        "vae",
        "traditional",
    }
    assert (out / "report.png").stat().st_size > 1000 and (out / "report.md").is_file()
    assert "evaluate" in jobs.stages(job_id)


def test_augment_with_insert_makes_no_model(env, cohort_files):
    tasks, jobs, storage = env
    cohort_id = store_cohort(storage, cohort_files)
    job_id = new_job(jobs, JobKind.augmentation)
    payload = {"job_id": job_id, "tenant": TENANT, "cohort_id": cohort_id, "model": "insert"}
    tasks.augment({**payload, "n_pairs": 2, "steps": 1})
    assert jobs.state(job_id) == JobState.succeeded, jobs.error(job_id)
    out = storage.path(TENANT, "outputs", job_id)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["generator"]["model"] == "insert" and not storage.list_ids(TENANT, "models")


@pytest.mark.slow  # ~20 s: six tiny U-Nets on 128 px slices and their 3D metrics
def test_evaluate_crossval_writes_the_recommendation(env, tmp_path):
    tasks, jobs, storage = env
    files = make_phantom_cohort(tmp_path / "files", n_cases=4, shape=(48, 48, 16), seed=3)
    cohort_id = store_cohort(storage, files)
    job_id = new_job(jobs, JobKind.evaluation)
    tasks.evaluate(
        {
            "job_id": job_id,
            "tenant": TENANT,
            "cohort_id": cohort_id,
            "design": "crossval",
            "folds": 2,
            "max_steps": 10,
            "n_pairs": [8],
            "arms": ["real", "insert"],
            "seeds": 1,
            "unet": "tiny",
            "unet_optimizer": "adam",
        }
    )
    assert jobs.state(job_id) == JobState.succeeded, jobs.error(job_id)
    out = storage.path(TENANT, "outputs", job_id)
    report = json.loads((out / "report.json").read_text())
    assert report["design"] == "crossval" and report["recommendation"]["words"]
    assert {r["arm"] for r in report["rows"]} == {"real", "real_aug", "insert"}
    assert {r["n"] for r in report["rows"] if r["arm"] == "insert"} == {8}
    segmenter = json.loads((out / "work" / "settings.json").read_text())["segmenter"]
    assert segmenter["optimizer"] == "adam" and segmenter["lr"] == 1e-3
    assert len(report["folds"]) == 2 and (out / "report.md").is_file() and (out / "report.png").is_file()
