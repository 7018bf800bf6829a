"""Hostile and broken zip archives, built in memory."""

from __future__ import annotations

import io
import stat
import zipfile

NIFTI_GZ = b"\x1f\x8b" + b"\x00" * 64  # a name the engine would read; content irrelevant for archive checks


def make_zip(
    entries: list[tuple[str | zipfile.ZipInfo, bytes]], compression: int = zipfile.ZIP_DEFLATED
) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression) as zf:
        for name, data in entries:
            zf.writestr(name, data)
    return buf.getvalue()


def symlink_zip() -> bytes:
    info = zipfile.ZipInfo("case/flair.nii.gz")
    info.create_system = 3
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return make_zip([(info, b"/etc/passwd"), ("case/seg.nii.gz", NIFTI_GZ)])


def encrypted_zip() -> bytes:
    """An entry whose flags say "encrypted" (zipfile cannot write one; set the bit in both headers)."""
    data = bytearray(make_zip([("case/flair.nii.gz", NIFTI_GZ)]))
    local = data.find(b"PK\x03\x04")
    central = data.find(b"PK\x01\x02")
    data[local + 6] |= 0x1
    data[central + 8] |= 0x1
    return bytes(data)


def bomb_zip(size: int = 8 << 20) -> bytes:
    """One entry of zeros, deflate at its highest ratio (~1030:1)."""
    return make_zip([("case/flair.nii", b"\x00" * size)], compression=zipfile.ZIP_DEFLATED)


def overlapping_zip() -> bytes:
    """Two central-directory entries pointing at the same data (the non-recursive bomb's trick)."""
    data = bytearray(make_zip([("a.nii", b"\x00" * 4096), ("b.nii", b"\x00" * 4096)], zipfile.ZIP_STORED))
    cd = data.find(b"PK\x01\x02")
    second = data.find(b"PK\x01\x02", cd + 4)
    data[second + 42 : second + 46] = data[cd + 42 : cd + 46]  # b's local-header offset := a's
    return bytes(data)


def nested_zip() -> bytes:
    inner = make_zip([("x.nii.gz", NIFTI_GZ)])
    return make_zip([("case/inner.zip", inner), ("case/flair.nii.gz", NIFTI_GZ)])


def disguised_nested_zip() -> bytes:
    inner = make_zip([("x.nii.gz", NIFTI_GZ)])
    return make_zip([("case/flair.nii.gz", inner)])


def streamed_zip(name: str, size: int, compression: int, *, sparse_every: int = 0) -> bytes:
    """One entry of ``size`` zero bytes (a random byte every ``sparse_every`` bytes when given, to set
    the ratio), written through zipfile's streaming writer: nothing of ``size`` is held in memory."""
    import random

    rnd = random.Random(0)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression) as zf, zf.open(name, "w", force_zip64=True) as out:
        chunk = bytearray(1 << 20)
        written = 0
        while written < size:
            block = chunk[: min(len(chunk), size - written)]
            if sparse_every:
                for i in range(0, len(block), sparse_every):
                    block[i] = rnd.randrange(256)
            out.write(bytes(block))
            written += len(block)
    return buf.getvalue()
