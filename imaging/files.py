"""Files that appear whole or not at all, and their digests: the one implementation every writer uses.

A file is written under a hidden temporary name in its own folder (``.NAME.partial``, or ``.NAME.<random>.partial`` when writers may race), flushed
and fsynced, then renamed to ``NAME`` (one ``rename``: atomic on POSIX) and the folder fsynced, so a
file under its final name is always complete, a reader never sees half of it, and a crash leaves at
most a hidden ``*.partial`` that the dataset layout ignores. Checkpoints, records, JSON reports,
preprocessing caches, plots and the streamed NIfTI volumes (:mod:`imaging.nifti`) all go through here.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self

import numpy as np

PARTIAL_SUFFIX = ".partial"


def partial_path(path: Path) -> Path:
    """The hidden name a streamed file is written under before it is published: ``dir/.NAME.partial``."""
    return path.with_name(f".{path.name}{PARTIAL_SUFFIX}")


def fsync_directory(directory: Path) -> None:
    """Make a rename durable (POSIX); a no-op where directories cannot be opened (Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def publish(tmp: Path, path: Path) -> None:
    """Give the finished temporary file ``tmp`` its final name ``path`` (same folder), durably."""
    os.replace(tmp, path)
    fsync_directory(path.parent)


class PublishOnExit:
    """A writer that publishes its file(s) with ``close()`` or discards them with ``abort()``; as a
    context manager it closes when the block ends normally and aborts when it raises."""

    def close(self) -> None:
        raise NotImplementedError

    def abort(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


@contextmanager
def atomic_file(path: Path, mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temporary file for writing that becomes ``path`` when the block ends without error.

    On an error (or a KeyboardInterrupt) the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}{PARTIAL_SUFFIX}")  # unique: writers may race
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        publish(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, obj: Any) -> Path:
    """Write ``obj`` as deterministic JSON (sorted keys, 2-space indent, trailing newline), atomically."""
    text = json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False, allow_nan=False, default=_to_json)
    with atomic_file(path, "w") as f:
        f.write(text + "\n")
    return path


def write_npy_atomic(path: Path, array: np.ndarray) -> Path:
    """Write one array as ``.npy`` (never pickled), atomically."""
    with atomic_file(path) as f:
        np.save(f, array, allow_pickle=False)
    return path


def _to_json(value: Any) -> Any:
    """numpy scalars and arrays and paths, which callers' configs often contain, as plain JSON."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return value.as_posix()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable: {value!r}")


def sha256_file(path: Path, chunk_bytes: int = 1 << 20) -> str:
    """Hex sha256 of a file's contents, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()
