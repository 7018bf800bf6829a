"""Safe extraction of an uploaded cohort zip.

The archive is untrusted. Before anything is written, every entry is checked (absolute paths, ``..``,
drive letters, symlinks from the Unix mode in ``external_attr``, encryption, nested archives, duplicate
names, entries whose data overlap another's, the number of entries, and the compression method: only
stored and deflate are read, because Python's bzip2 and LZMA readers inflate a whole compressed chunk
at once, gigabytes from a few kilobytes). Then each entry is read through our own bounded reader
(:func:`_inflate`): compressed bytes in ``READ`` chunks, at most ``CHUNK`` decompressed bytes per step,
the CRC checked at the end. The REAL decompressed bytes are counted, because a header's ``file_size``
is whatever the attacker wrote; the running total, each entry's running ratio (bytes out per
compressed byte consumed so far) and the archive's running ratio are checked as the bytes arrive, so a
bomb is stopped within one chunk of crossing a limit, and memory never holds more than one chunk.
"""

from __future__ import annotations

import stat
import struct
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

CHUNK = 1 << 20  # most decompressed bytes held at once
READ = 64 << 10  # compressed bytes read at a time
METHODS = {zipfile.ZIP_STORED: "stored", zipfile.ZIP_DEFLATED: "deflate"}
METHOD_NAMES = {
    zipfile.ZIP_BZIP2: "bzip2",
    zipfile.ZIP_LZMA: "LZMA",
    9: "deflate64",
    93: "zstandard",
    98: "PPMd",
}
_LOCAL_HEADER = struct.Struct("<4s5H3L2H")  # zip local file header, 30 bytes
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
    max_ratio: float = 1000.0  # one entry (an uncompressed float32 label volume: ~600:1)
    ratio_min_bytes: int = 1 << 20  # small entries may compress absurdly well without being a bomb
    max_archive_ratio: float = 200.0  # the whole archive (an uncompressed BraTS cohort: ~27:1)
    archive_ratio_min_bytes: int = 64 << 20
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
    if not info.is_dir() and info.compress_type not in METHODS:
        method = METHOD_NAMES.get(info.compress_type, f"method {info.compress_type}")
        return f"compressed with {method}: only stored and deflate entries are accepted (re-zip with deflate)"
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


def _data_start(raw: BinaryIO, info: zipfile.ZipInfo) -> int:
    """Offset of an entry's compressed data: after its local header, name and extra field."""
    raw.seek(info.header_offset)
    header = raw.read(_LOCAL_HEADER.size)
    if len(header) != _LOCAL_HEADER.size or header[:4] != b"PK\x03\x04":
        raise _bad(info.filename, "corrupt entry (bad local header)")
    fields = _LOCAL_HEADER.unpack(header)
    name_len, extra_len = fields[-2], fields[-1]
    return info.header_offset + _LOCAL_HEADER.size + name_len + extra_len


def _inflate(raw: BinaryIO, info: zipfile.ZipInfo) -> Iterator[tuple[bytes, int]]:
    """``(decompressed chunk of at most CHUNK bytes, compressed bytes used so far)`` of one entry; the
    CRC-32 is checked once the entry ends. "Used" excludes input read but not yet inflated, so a ratio
    computed from it is exact to the chunk, however well the entry compresses."""
    raw.seek(_data_start(raw, info))
    left, consumed, crc = info.compress_size, 0, 0
    inflater = zlib.decompressobj(-zlib.MAX_WBITS) if info.compress_type == zipfile.ZIP_DEFLATED else None
    while left > 0 or (inflater is not None and inflater.unconsumed_tail):
        if inflater is not None and inflater.unconsumed_tail:
            data = inflater.unconsumed_tail
        else:
            data = raw.read(min(READ, left))
            if not data:
                raise _bad(info.filename, "truncated entry (the archive ends inside it)")
            left -= len(data)
            consumed += len(data)
        try:
            out = inflater.decompress(data, CHUNK) if inflater is not None else data
        except zlib.error as e:
            raise _bad(info.filename, f"corrupt deflate data ({e})") from None
        if out:
            crc = zlib.crc32(out, crc)
            # compressed bytes the inflater actually used: what was read less what still waits
            used = consumed - (len(inflater.unconsumed_tail) if inflater is not None else 0)
            yield out, used
        if inflater is not None and inflater.eof:
            break
    if inflater is not None and not inflater.eof:
        raise _bad(info.filename, "truncated entry (the deflate stream does not end)")
    if crc != info.CRC:
        raise _bad(info.filename, "CRC-32 mismatch (the entry is corrupt)")


def extract_zip(
    zip_path: Path,
    dest: Path,
    limits: ArchiveLimits,
    *,
    room: int | None = None,
    deadline: Callable[[], None] | None = None,
) -> int:
    """Extract ``zip_path`` into the empty folder ``dest``; return the bytes written.

    ``room``: bytes the tenant may still store (its quota less what it holds); crossing it is a 507.
    ``deadline``: called between chunks; raises to stop a slow extraction.
    Raises ``ArchiveError``; the caller removes ``dest`` on error (nothing is cleaned here).
    """
    dest = Path(dest).resolve()
    try:
        zf = zipfile.ZipFile(zip_path)
    except (zipfile.BadZipFile, OSError) as e:
        raise _bad(UPLOAD, f"not a readable zip archive ({e})") from None
    total = consumed_total = 0
    with zf, open(zip_path, "rb") as raw:
        for info in check_entries(zf, limits):
            rel = PurePosixPath(info.filename.replace("\\", "/"))
            target = (dest / rel).resolve()
            if not target.is_relative_to(dest) or target == dest:
                raise _bad(info.filename, "path escapes the archive")
            target.parent.mkdir(parents=True, exist_ok=True)
            written = 0
            try:
                with open(target, "xb") as out:
                    for chunk, consumed in _inflate(raw, info):
                        if deadline is not None:
                            deadline()
                        if written == 0 and _nested_magic(chunk[:512]):
                            raise _bad(
                                info.filename, "nested archive (upload one zip with the files themselves)"
                            )
                        written += len(chunk)
                        total += len(chunk)
                        _check_running(
                            info, limits, written, consumed, total, consumed_total + consumed, room
                        )
                        out.write(chunk)
                    consumed_total += info.compress_size
            except FileExistsError:
                raise _bad(info.filename, "duplicate entry") from None
            if written != info.file_size:
                raise _bad(info.filename, f"holds {written} bytes but its header says {info.file_size}")
    return total


def _check_running(
    info: zipfile.ZipInfo,
    limits: ArchiveLimits,
    written: int,
    consumed: int,
    total: int,
    total_consumed: int,
    room: int | None,
) -> None:
    """The limits, against the bytes decompressed so far: the total, the tenant's room, the entry's
    ratio and the archive's ratio (decompressed per compressed byte consumed)."""
    if total > limits.max_uncompressed_bytes:
        raise _bad(
            UPLOAD,
            f"uncompressed size exceeds the limit of {limits.max_uncompressed_bytes} bytes",
            status=413,
        )
    if room is not None and total > room:
        raise _bad(
            UPLOAD,
            f"the extracted cohort would exceed your storage quota ({room} bytes left); delete cohorts, "
            "models or outputs you no longer need",
            status=507,
        )
    if written > limits.ratio_min_bytes and written > limits.max_ratio * max(consumed, 1):
        raise _bad(info.filename, f"compression ratio above {limits.max_ratio:g}:1 (zip bomb)")
    if total > limits.archive_ratio_min_bytes and total > limits.max_archive_ratio * max(total_consumed, 1):
        raise _bad(
            UPLOAD,
            f"the archive expands more than {limits.max_archive_ratio:g}:1: mostly padding, not a cohort "
            "(zip bomb)",
        )
