"""Archive safety, entry by entry (service/archive.py), without the API."""

from __future__ import annotations

import zipfile

import pytest

from service.archive import ArchiveError, ArchiveLimits, extract_zip
from tests.service import zips

LIMITS = ArchiveLimits(max_files=50, max_uncompressed_bytes=8 << 20)

CASES = [
    ("zip-slip", lambda: zips.make_zip([("../evil.nii.gz", zips.NIFTI_GZ)]), 422, "escapes"),
    ("deep zip-slip", lambda: zips.make_zip([("a/../../evil.nii.gz", zips.NIFTI_GZ)]), 422, "escapes"),
    ("absolute path", lambda: zips.make_zip([("/tmp/evil.nii.gz", zips.NIFTI_GZ)]), 422, "absolute"),
    ("drive letter", lambda: zips.make_zip([("C:/evil.nii.gz", zips.NIFTI_GZ)]), 422, "absolute"),
    ("backslash slip", lambda: zips.make_zip([("..\\evil.nii.gz", zips.NIFTI_GZ)]), 422, "escapes"),
    ("symlink", zips.symlink_zip, 422, "symbolic link"),
    ("encrypted", zips.encrypted_zip, 422, "encrypted"),
    ("nested archive", zips.nested_zip, 422, "nested archive"),
    ("nested archive by content", zips.disguised_nested_zip, 422, "nested archive"),
    ("bomb (ratio)", zips.bomb_zip, 422, "compression ratio"),
    ("overlapping entries", zips.overlapping_zip, 422, "overlaps"),
    ("too many files", lambda: zips.make_zip([(f"f{i}.nii.gz", b"x") for i in range(51)]), 422, "entries"),
    (
        "too large",
        lambda: zips.make_zip([("big.nii", b"\x01" * (9 << 20))], zipfile.ZIP_STORED),
        413,
        "exceeds",
    ),
    ("duplicate names", lambda: zips.make_zip([("a.nii.gz", b"1"), ("a.nii.gz", b"2")]), 422, "duplicate"),
    ("not a zip", lambda: b"this is not a zip archive at all", 422, "not a readable zip"),
    ("empty archive", lambda: zips.make_zip([]), 422, "no files"),
]


@pytest.mark.filterwarnings("ignore:Duplicate name")
@pytest.mark.parametrize("name,build,status,message", CASES, ids=[c[0] for c in CASES])
def test_hostile_archive_is_refused(tmp_path, name, build, status, message):
    archive = tmp_path / "upload.zip"
    archive.write_bytes(build())
    dest = tmp_path / "out"
    dest.mkdir()
    with pytest.raises(ArchiveError) as err:
        extract_zip(archive, dest, LIMITS)
    assert err.value.status == status
    assert any(message in problem for _, problem in err.value.problems), err.value.problems
    assert not (tmp_path / "evil.nii.gz").exists() and not (tmp_path.parent / "evil.nii.gz").exists()


def test_header_lying_about_size_is_caught_while_extracting(tmp_path):
    """A central directory that claims 10 bytes for 5 MiB: the real bytes are counted."""
    data = bytearray(zips.make_zip([("a.nii", b"\x07" * (5 << 20))]))
    for sig, off in ((b"PK\x01\x02", 24), (b"PK\x03\x04", 22)):  # uncompressed size fields
        pos = data.find(sig)
        data[pos + off : pos + off + 4] = (10).to_bytes(4, "little")
    archive = tmp_path / "upload.zip"
    archive.write_bytes(bytes(data))
    (tmp_path / "out").mkdir()
    with pytest.raises(ArchiveError) as err:
        extract_zip(archive, tmp_path / "out", ArchiveLimits(max_uncompressed_bytes=1 << 20))
    assert err.value.status in (413, 422)


def test_good_archive_extracts_and_skips_junk(tmp_path):
    archive = tmp_path / "upload.zip"
    archive.write_bytes(
        zips.make_zip(
            [("c/case1/flair.nii.gz", b"abc"), ("__MACOSX/c/._flair.nii.gz", b"x"), ("c/.DS_Store", b"")]
        )
    )
    dest = tmp_path / "out"
    dest.mkdir()
    assert extract_zip(archive, dest, LIMITS) == 3
    assert sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file()) == [
        "c/case1/flair.nii.gz"
    ]
