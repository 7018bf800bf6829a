"""The dHVAE augmentation service from Python: upload a cohort, start jobs, wait for them, download.

    from dhvae_client import Client
    c = Client("http://127.0.0.1:8000", key)
    cohort = c.upload_cohort("path/to/cohort_folder_or.zip")   # a folder is zipped on the fly, streamed
    job = c.augment(cohort, n_pairs=500, preset="small", steps=2000, seed=1)
    job.wait()                                                 # progress bar fed by the job's events
    job.download("augmented/")                                 # unzipped, sha256 checked against manifest.json

What it does for you:
- every POST carries an ``Idempotency-Key`` (a new UUID per call, the same one across that call's
  retries), so a retried upload or job submission starts nothing twice;
- a 503 (Redis or the workers away), a 429 with ``Retry-After`` and a dropped connection are retried
  with exponential backoff (``Retry-After`` when the service gives one), up to ``retries`` times;
- every error answer becomes a typed exception of :mod:`dhvae_client.errors`, with the service's words;
- progress bars come from ``tqdm.auto`` (a widget in Jupyter, text in a terminal); ``progress=False``
  turns them off.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tempfile
import time
import uuid
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import httpx
from tqdm.auto import tqdm

from .errors import IntegrityError, JobFailed, ServiceError, Unavailable, error_for

CHUNK = 1 << 20
TERMINAL = ("succeeded", "failed", "cancelled")
RETRY_STATUS = (502, 503, 504)


@dataclass
class Cohort:
    """An uploaded cohort, as ``GET /v1/cohorts/{id}`` describes it."""

    id: str
    data: dict[str, Any] = field(repr=False)

    @property
    def cases(self) -> list[str]:
        return list(self.data.get("cases", []))

    @property
    def warnings(self) -> list[str]:
        return list(self.data.get("warnings", []))

    def __repr__(self) -> str:
        d = self.data
        return (
            f"<Cohort {self.id}: {len(self.cases)} cases, channels {', '.join(d.get('channels', []))}, "
            f"{d.get('tumour_slices')} tumour / {d.get('training_slices')} training slices"
            f"{', ' + str(len(self.warnings)) + ' warning(s)' if self.warnings else ''}>"
        )


class Job:
    """A job of the service: its last known state in ``data`` (``GET /v1/jobs/{id}``)."""

    def __init__(self, client: Client, data: dict[str, Any]) -> None:
        self.client, self.data = client, data

    id = property(lambda self: self.data["id"])
    kind = property(lambda self: self.data.get("kind"))
    state = property(lambda self: self.data.get("state"))
    progress = property(lambda self: self.data.get("progress") or {})
    model_id = property(lambda self: self.data.get("model_id"))

    def __repr__(self) -> str:
        p = self.progress
        where = (
            f" {p.get('stage')} {p.get('done')}/{p.get('total')} {p.get('unit')}" if p.get("total") else ""
        )
        return f"<Job {self.id} {self.kind} {self.state}{where}>"

    def refresh(self) -> Job:
        self.data = self.client._json("GET", f"/v1/jobs/{self.id}")
        return self

    def cancel(self) -> Job:
        self.data = self.client._json("DELETE", f"/v1/jobs/{self.id}")
        return self

    def wait(
        self, *, timeout: float | None = None, progress: bool | None = None, raise_on_failure: bool = True
    ) -> Job:
        """Follow the job's events (``GET /v1/jobs/{id}/events``) until it ends; a progress bar per stage.

        A dropped stream is resumed after its last event (``Last-Event-ID``). Raises :class:`JobFailed`
        when the job ends failed or cancelled (unless ``raise_on_failure`` is False), TimeoutError
        after ``timeout`` seconds.
        """
        show = self.client.progress if progress is None else progress
        deadline = None if timeout is None else time.monotonic() + timeout
        bar, stage, last_id, failures = None, None, None, 0
        try:
            while self.state not in TERMINAL:
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(f"job {self.id} still {self.state} after {timeout} s")
                try:
                    for event_id, data in self.client._events(self.id, last_id, deadline):
                        last_id, failures = event_id or last_id, 0
                        self.data = data
                        p = self.progress
                        if show and p.get("total"):
                            if bar is None or p.get("stage") != stage:
                                if bar is not None:
                                    bar.close()
                                stage = p.get("stage")
                                bar = tqdm(
                                    total=p["total"], desc=f"{self.kind} {stage}", unit=p.get("unit") or "it"
                                )
                            bar.n = min(p.get("done", 0), p["total"])
                            bar.set_postfix_str(self.state or "", refresh=False)
                            bar.refresh()
                        if self.state in TERMINAL:
                            break
                    else:
                        self.refresh()  # the stream ended: the job's state says whether it is over
                except (httpx.TransportError, Unavailable):
                    failures += 1
                    if failures > self.client.retries:
                        raise
                    time.sleep(self.client._backoff(failures))
        finally:
            if bar is not None:
                bar.close()
        if raise_on_failure and self.state != "succeeded":
            raise JobFailed(self)
        return self

    def download(
        self, dest: str | os.PathLike[str], *, verify: bool = True, progress: bool | None = None
    ) -> Path:
        """The job's dataset, unzipped into ``dest`` (created); every file checked against manifest.json.

        The zip is streamed to a temporary file next to ``dest`` first, then extracted (names that
        would leave ``dest`` are refused). Raises :class:`IntegrityError` if a file's sha256 or size
        differs from the manifest's, or if a file the manifest lists is missing.
        """
        dest = Path(dest)
        dest.mkdir(parents=True, exist_ok=True)
        show = self.client.progress if progress is None else progress
        with tempfile.NamedTemporaryFile(dir=dest, prefix=".download-", suffix=".zip", delete=False) as tmp:
            try:
                with self.client._stream("GET", f"/v1/jobs/{self.id}/download") as r:
                    bar = tqdm(desc="download", unit="B", unit_scale=True, disable=not show)
                    for chunk in r.iter_bytes(CHUNK):
                        tmp.write(chunk)
                        bar.update(len(chunk))
                    bar.close()
                tmp.flush()
                _safe_extract(Path(tmp.name), dest)
            finally:
                os.unlink(tmp.name)
        if verify:
            verify_dataset(dest)
        return dest

    def preview(self, n: int = 16) -> bytes:
        """PNG of up to ``n`` generated pairs (image with the mask outline)."""
        return self.client._request("GET", f"/v1/jobs/{self.id}/preview.png", params={"n": n}).content

    def report(self) -> dict[str, Any]:
        """An evaluation's report (``GET /v1/jobs/{id}/report.json``)."""
        return self.client._json("GET", f"/v1/jobs/{self.id}/report.json")


class Client:
    """The service at ``base_url`` with the API key ``api_key``.

    ``retries``: how often a 503 / 502 / 504, a 429 with Retry-After, or a dropped connection is
    retried before the error is raised; ``backoff``: the first wait in seconds (doubling, at most
    30 s). ``transport``: an httpx transport (tests pass an ASGI one).
    """

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        timeout: float = 60.0,
        retries: int = 5,
        backoff: float = 0.5,
        progress: bool = True,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.base_url, self.retries, self.backoff, self.progress = (
            base_url.rstrip("/"),
            retries,
            backoff,
            progress,
        )
        self.http = httpx.Client(
            base_url=self.base_url,
            headers={"Authorization": f"Bearer {api_key}", "User-Agent": "dhvae-client/0.1"},
            timeout=httpx.Timeout(timeout, connect=10.0),
            transport=transport,
        )

    def __repr__(self) -> str:
        return f"<Client {self.base_url}>"

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- the service's resources ------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        return self._json("GET", "/health/ready")

    def upload_cohort(self, path: str | os.PathLike[str], *, progress: bool | None = None) -> Cohort:
        """Upload a cohort: a ``.zip`` file as it is, or a folder zipped on the fly (stored entries,
        streamed: nothing is written to disk and memory holds one chunk). 422 raises
        :class:`CohortInvalid` with the service's ``{file, problem}`` list."""
        path = Path(path)
        show = self.progress if progress is None else progress
        if path.is_dir():
            files = _cohort_files(path)
            if not files:
                raise ValueError(f"{path.name}: the folder holds no file")
            total = sum(f.stat().st_size for _, f in files)
            bar = tqdm(total=total, desc=f"upload {path.name}", unit="B", unit_scale=True, disable=not show)
            body: Any = lambda: _zip_stream(files, bar)  # noqa: E731  (a new stream per attempt)
            length = None
        elif path.is_file():
            size = path.stat().st_size
            bar = tqdm(total=size, desc=f"upload {path.name}", unit="B", unit_scale=True, disable=not show)
            body = lambda: _file_stream(path, bar)  # noqa: E731
            length = size
        else:
            raise FileNotFoundError(f"{path}: no such file or folder")
        headers = {"Content-Type": "application/zip"}
        if length is not None:
            headers["Content-Length"] = str(length)
        try:
            data = self._json(
                "POST", "/v1/cohorts", content=body, headers=headers, upload=True, on_retry=bar.reset
            )
        finally:
            bar.close()
        return Cohort(data["id"], data)

    def cohorts(self) -> list[Cohort]:
        return [Cohort(d["id"], d) for d in self._json("GET", "/v1/cohorts")["items"]]

    def cohort(self, cohort_id: str) -> Cohort:
        data = self._json("GET", f"/v1/cohorts/{cohort_id}")
        return Cohort(data["id"], data)

    def case_preview(self, cohort: Cohort | str, case: str) -> bytes:
        """PNG of a case's mid-tumour slice with the mask outline."""
        return self._request("GET", f"/v1/cohorts/{_id(cohort)}/cases/{case}/preview.png").content

    def train(
        self,
        cohort: Cohort | str,
        *,
        steps: int,
        preset: str = "tiny",
        model: str = "dhvae",
        seed: int = 0,
        **extra: Any,
    ) -> Job:
        body = {
            "cohort_id": _id(cohort),
            "steps": steps,
            "preset": preset,
            "model": model,
            "seed": seed,
            **extra,
        }
        return self._submit("/v1/trainings", body)

    def augment(
        self,
        cohort: Cohort | str,
        *,
        n_pairs: int,
        steps: int,
        preset: str = "tiny",
        model: str = "dhvae",
        seed: int = 0,
        **extra: Any,
    ) -> Job:
        body = {
            "cohort_id": _id(cohort),
            "n_pairs": n_pairs,
            "steps": steps,
            "preset": preset,
            "model": model,
            "seed": seed,
            **extra,
        }
        return self._submit("/v1/augmentations", body)

    def generate(self, model_id: str, *, n_pairs: int, seed: int = 0, **extra: Any) -> Job:
        return self._submit(
            "/v1/generations", {"model_id": model_id, "n_pairs": n_pairs, "seed": seed, **extra}
        )

    def evaluate(
        self,
        cohort: Cohort | str,
        *,
        n_pairs: Iterable[int] = (250, 500),
        seeds: int | list[int] = 5,
        **extra: Any,
    ) -> Job:
        body = {"cohort_id": _id(cohort), "n_pairs": list(n_pairs), "seeds": seeds, **extra}
        return self._submit("/v1/evaluations", body)

    def job(self, job_id: str) -> Job:
        return Job(self, self._json("GET", f"/v1/jobs/{job_id}"))

    def jobs(self) -> list[Job]:
        return [Job(self, d) for d in self._json("GET", "/v1/jobs")["items"]]

    # --- HTTP -------------------------------------------------------------------------------------

    def _submit(self, path: str, body: dict[str, Any]) -> Job:
        accepted = self._json("POST", path, json=body)
        return self.job(accepted["job_id"])

    def _backoff(self, attempt: int, retry_after: str | None = None) -> float:
        if retry_after:
            try:
                return min(max(float(retry_after), 0.0), 60.0)
            except ValueError:
                pass
        return min(self.backoff * 2 ** (attempt - 1), 30.0)

    def _request(
        self,
        method: str,
        path: str,
        *,
        upload: bool = False,
        on_retry: Any = None,
        stream: bool = False,
        **kw: Any,
    ) -> httpx.Response:
        """One call with the retries and the typed errors; POSTs get an Idempotency-Key."""
        headers = dict(kw.pop("headers", None) or {})
        if method == "POST":
            headers.setdefault("Idempotency-Key", str(uuid.uuid4()))
        body = kw.pop("content", None)
        attempt = 0
        while True:
            attempt += 1
            content = body() if callable(body) else body
            try:
                req = self.http.build_request(method, path, headers=headers, content=content, **kw)
                r = self.http.send(req, stream=stream)
            except httpx.TransportError:
                if attempt > self.retries:
                    raise
                time.sleep(self._backoff(attempt))
                if on_retry:
                    on_retry()
                continue
            if r.status_code < 400:
                return r
            retry_after = r.headers.get("Retry-After")
            if attempt <= self.retries and (
                r.status_code in RETRY_STATUS or (r.status_code == 429 and retry_after)
            ):
                r.close()
                time.sleep(self._backoff(attempt, retry_after))
                if on_retry:
                    on_retry()
                continue
            if stream:
                r.read()
            try:
                payload: Any = r.json()
            except ValueError:
                payload = r.text
            raise error_for(r.status_code, payload, upload=upload)

    def _json(self, method: str, path: str, **kw: Any) -> Any:
        return self._request(method, path, **kw).json()

    def _stream(self, method: str, path: str, **kw: Any) -> _Streamed:
        return _Streamed(self._request(method, path, stream=True, **kw))

    def _events(
        self, job_id: str, last_id: str | None, deadline: float | None
    ) -> Iterator[tuple[str | None, dict[str, Any]]]:
        """``(event id, JobOut)`` of each Server-Sent Event of the job, from after ``last_id``."""
        headers = {"Accept": "text/event-stream"}
        if last_id:
            headers["Last-Event-ID"] = last_id
        timeout = httpx.Timeout(
            None if deadline is None else max(deadline - time.monotonic(), 1.0), connect=10.0
        )
        with self._stream("GET", f"/v1/jobs/{job_id}/events", headers=headers, timeout=timeout) as r:
            event_id: str | None = None
            data: list[str] = []
            for line in r.iter_lines():
                if not line:
                    if data:
                        yield event_id, json.loads("\n".join(data))
                    event_id, data = None, []
                elif line.startswith("data:"):
                    data.append(line[5:].lstrip())
                elif line.startswith("id:"):
                    event_id = line[3:].strip()
            if data:
                yield event_id, json.loads("\n".join(data))


class _Streamed:
    """A streamed response as a context manager that closes it."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response

    def __enter__(self) -> httpx.Response:
        return self.response

    def __exit__(self, *exc: object) -> None:
        self.response.close()


def _id(x: Cohort | str) -> str:
    return x.id if isinstance(x, Cohort) else x


# --- uploads: a folder as a zip stream --------------------------------------------------------------


def _cohort_files(folder: Path) -> list[tuple[str, Path]]:
    """``(name in the zip, file)`` of every regular file under ``folder`` (symlinks followed, hidden
    files skipped), sorted."""
    out = []
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder)
        if p.is_file() and not any(part.startswith(".") for part in rel.parts):
            out.append((rel.as_posix(), p))
    return out


class _Sink(io.RawIOBase):
    """A write-only, non-seekable file that keeps what is written until :meth:`drain`."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.pos = 0

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        data = bytes(b)
        self.parts.append(data)
        self.pos += len(data)
        return len(data)

    def tell(self) -> int:
        return self.pos

    def drain(self) -> bytes:
        out, self.parts = b"".join(self.parts), []
        return out


def _zip_stream(files: list[tuple[str, Path]], bar: Any) -> Iterator[bytes]:
    """The zip of ``files`` (stored: NIfTI is usually gzipped already), yielded as it is written."""
    sink = _Sink()
    with zipfile.ZipFile(sink, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, path in files:
            info = zipfile.ZipInfo.from_file(path, name)
            info.compress_type = zipfile.ZIP_STORED
            with open(path, "rb") as src, zf.open(info, "w", force_zip64=info.file_size > (1 << 31)) as dst:
                while chunk := src.read(CHUNK):
                    dst.write(chunk)
                    bar.update(len(chunk))
                    yield sink.drain()
        yield sink.drain()
    yield sink.drain()


def _file_stream(path: Path, bar: Any) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            bar.update(len(chunk))
            yield chunk


# --- downloads --------------------------------------------------------------------------------------


def _safe_extract(zip_path: Path, dest: Path) -> None:
    """Extract ``zip_path`` into ``dest``, refusing names that would leave it."""
    root = dest.resolve()
    with zipfile.ZipFile(zip_path) as zf:
        for info in zf.infolist():
            name = PurePosixPath(info.filename)
            if (
                name.is_absolute()
                or ".." in name.parts
                or (root / name).resolve().parent != (root / name).parent.resolve()
            ):
                raise IntegrityError(f"{info.filename}: a name outside the dataset folder")
            if info.is_dir():
                continue
            target = root / name
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst, CHUNK)


def verify_dataset(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """Check every file ``manifest.json`` lists against its sha256 and size; returns the manifest."""
    folder = Path(folder)
    manifest_path = folder / "manifest.json"
    if not manifest_path.is_file():
        raise IntegrityError("manifest.json is missing: the download is incomplete (did the job finish?)")
    manifest = json.loads(manifest_path.read_text())
    for rel, meta in manifest.get("files", {}).items():
        path = folder / rel
        if not path.is_file():
            raise IntegrityError(f"{rel}: listed in manifest.json but missing")
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(CHUNK):
                h.update(chunk)
        if h.hexdigest() != meta.get("sha256") or path.stat().st_size != meta.get("bytes"):
            raise IntegrityError(f"{rel}: sha256 or size differs from manifest.json")
    return manifest


__all__ = ["Client", "Cohort", "Job", "ServiceError", "verify_dataset"]
