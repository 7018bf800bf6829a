"""Safe extraction of an uploaded cohort zip.

The archive is untrusted. Before anything is written, every entry is checked (absolute paths, ``..``,
drive letters, symlinks from the Unix mode in ``external_attr``, encryption, nested archives, duplicate
names, entries whose data overlap another's, the number of entries). Then files are extracted one
chunk at a time while counting the REAL decompressed bytes, because a header's ``file_size`` is
whatever the attacker wrote: the total and each entry's compression ratio are checked against the
limits as the bytes arrive, so a bomb is stopped after at most one chunk past the limit.
"""

from __future__ import annotations

import stat
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

CHUNK = 1 << 20
NESTED_EXTENSIONS = (
    ".zip",
    ".tar",
    ".tgz",
    ".tar.gz",
    ".tar.bz2",
    ".tbz2",
    ".tar.xz",
    ".txz",
    ".7z",
    ".rar",
    ".bz2",
    ".xz",
    ".zst",
    ".jar",
)
JUNK_PREFIXES = ("__MACOSX/",)
JUNK_NAMES = (".DS_Store", "Thumbs.db", "desktop.ini")
UPLOAD = "<upload>"


@dataclass(frozen=True)
class ArchiveLimits:
    max_files: int = 20_000
    max_uncompressed_bytes: int = 8 << 30
    max_ratio: float = 1000.0
    ratio_min_bytes: int = 1 << 20  # small entries may compress absurdly well without being a bomb
    max_depth: int = 32


class ArchiveError(Exception):
    """The upload is refused. ``status``: 413 (too large) or 422 (bad content)."""

    def __init__(self, status: int, problems: list[tuple[str, str]]):
        self.status = status
        self.problems = problems
        super().__init__("; ".join(f"{f}: {p}" for f, p in problems))


def _bad(file: str, problem: str, status: int = 422) -> ArchiveError:
    return ArchiveError(status, [(file, problem)])


def _is_symlink(info: zipfile.ZipInfo) -> bool:
    return stat.S_ISLNK(info.external_attr >> 16)


def _is_junk(name: str) -> bool:
    base = name.rsplit("/", 1)[-1]
    return name.startswith(JUNK_PREFIXES) or base in JUNK_NAMES or base.startswith("._")


def _entry_problem(name: str, info: zipfile.ZipInfo, limits: ArchiveLimits) -> str | None:
    if any(ord(c) < 32 for c in name):
        return "control character in the file name"
    if name.startswith("/") or (len(name) > 1 and name[1] == ":") or name.startswith("//"):
        return "absolute path"
    parts = PurePosixPath(name).parts
    if ".." in parts:
        return "path escapes the archive ('..')"
    if len(parts) > limits.max_depth:
        return f"nested deeper than {limits.max_depth} folders"
    if _is_symlink(info):
        return "symbolic link (links are not accepted)"
    if info.flag_bits & 0x1:
        return "encrypted entry (upload an unencrypted archive)"
    lower = name.lower()
    if not info.is_dir() and lower.endswith(NESTED_EXTENSIONS) and not lower.endswith(".nii.gz"):
        return "nested archive (upload one zip with the files themselves)"
    return None


def _nested_magic(head: bytes) -> bool:
    return (
        head.startswith((b"PK\x03\x04", b"PK\x05\x06", b"7z\xbc\xaf\x27\x1c", b"Rar!\x1a\x07"))
        or head[257:262] == b"ustar"
    )


def check_entries(zf: zipfile.ZipFile, limits: ArchiveLimits) -> list[zipfile.ZipInfo]:
    """Validate the central directory; return the file entries to extract (junk dropped)."""
    infos = zf.infolist()
    if len(infos) > limits.max_files:
        raise _bad(UPLOAD, f"{len(infos)} entries; at most {limits.max_files} are accepted")
    problems: list[tuple[str, str]] = []
    seen: set[str] = set()
    files: list[zipfile.ZipInfo] = []
    for info in infos:
        name = info.filename.replace("\\", "/")
        problem = _entry_problem(name, info, limits)
        if problem:
            problems.append((info.filename, problem))
            continue
        norm = str(PurePosixPath(name.rstrip("/")))
        if norm in ("", "."):
            continue
        if norm in seen:
            problems.append((info.filename, "duplicate entry"))
            continue
        seen.add(norm)
        if not info.is_dir() and not _is_junk(norm):
            files.append(info)
    # Entries whose data ranges overlap are the "non-recursive" zip bomb (one payload, many names).
    spans = sorted((i.header_offset, i.header_offset + i.compress_size, i.filename) for i in infos)
    for (_, end, name), (nstart, _, _) in zip(spans, spans[1:], strict=False):
        if end > nstart:
            problems.append((name, "entry overlaps another entry's data (zip bomb)"))
            break
    if problems:
        raise ArchiveError(422, problems)
    if not files:
        raise _bad(UPLOAD, "the archive contains no files")
    declared = sum(i.file_size for i in files)
    if declared > limits.max_uncompressed_bytes:
        raise _bad(
            UPLOAD,
            f"uncompressed size {declared} bytes exceeds the limit of {limits.max_uncompressed_bytes} bytes",
            status=413,
        )
    return files


def extract_zip(zip_path: Path, dest: Path, limits: ArchiveLimits) -> int:
    """Extract ``zip_path`` into the empty folder ``dest``; return the bytes written.

    Raises ``ArchiveError``; the caller removes ``dest`` on error (nothing is cleaned here).
    """
    dest = Path(dest).resolve()
    try:
        zf = zipfile.ZipFile(zip_path)
    except (zipfile.BadZipFile, OSError) as e:
        raise _bad(UPLOAD, f"not a readable zip archive ({e})") from None
    total = 0
    with zf:
        for info in check_entries(zf, limits):
            rel = PurePosixPath(info.filename.replace("\\", "/"))
            target = (dest / rel).resolve()
            if not target.is_relative_to(dest) or target == dest:
                raise _bad(info.filename, "path escapes the archive")
            target.parent.mkdir(parents=True, exist_ok=True)
            written = 0
            try:
                with zf.open(info) as src, open(target, "xb") as out:
                    first = True
                    while chunk := src.read(CHUNK):
                        if first and _nested_magic(chunk[:512]):
                            raise _bad(
                                info.filename, "nested archive (upload one zip with the files themselves)"
                            )
                        first = False
                        written += len(chunk)
                        total += len(chunk)
                        if total > limits.max_uncompressed_bytes:
                            raise _bad(
                                UPLOAD,
                                "uncompressed size exceeds the limit of "
                                f"{limits.max_uncompressed_bytes} bytes",
                                status=413,
                            )
                        if written > limits.ratio_min_bytes and written > limits.max_ratio * max(
                            info.compress_size, 1
                        ):
                            raise _bad(
                                info.filename, f"compression ratio above {limits.max_ratio:g}:1 (zip bomb)"
                            )
                        out.write(chunk)
            except FileExistsError:
                raise _bad(info.filename, "duplicate entry") from None
            except (zipfile.BadZipFile, EOFError, NotImplementedError, RuntimeError, ValueError) as e:
                # zlib/CRC failures, unsupported compression methods
                raise _bad(info.filename, f"corrupt or unsupported entry ({e})") from None
            if written != info.file_size:
                raise _bad(info.filename, f"holds {written} bytes but its header says {info.file_size}")
    return total
