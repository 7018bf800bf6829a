"""A zip written as a stream of byte chunks: no temporary file, memory bounded by one chunk.

``zipfile`` writes to any object with ``write`` and ``tell`` but no ``seek``: it then puts each
entry's CRC and sizes in a data descriptor after the data instead of going back to patch the local
header. The sink below hands the bytes out as soon as they are written. Only the central directory
(about 100 bytes per entry) is kept until the end.
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterator
from pathlib import Path

CHUNK = 1 << 20
EPOCH = (1980, 1, 1, 0, 0, 0)  # fixed timestamps: the same files give the same zip
COMPRESSED_SUFFIXES = (".gz", ".png", ".zip", ".pt")


class _Sink:
    def __init__(self) -> None:
        self._buf = bytearray()
        self._pos = 0

    def write(self, data: bytes) -> int:
        self._buf += data
        self._pos += len(data)
        return len(data)

    def tell(self) -> int:
        return self._pos

    def flush(self) -> None:
        pass

    def drain(self) -> bytes:
        out = bytes(self._buf)
        self._buf.clear()
        return out


class ZipStream:
    """``for chunk in zs.add_file(path, name)``, then ``zs.close()`` for the central directory."""

    def __init__(self) -> None:
        self._sink = _Sink()
        self._zf = zipfile.ZipFile(self._sink, mode="w", allowZip64=True)  # type: ignore[call-overload]  # a write-only sink

    def add_file(self, path: Path, arcname: str) -> Iterator[bytes]:
        info = zipfile.ZipInfo(arcname, date_time=EPOCH)
        info.external_attr = 0o644 << 16
        info.file_size = path.stat().st_size
        # NIfTI .gz is already compressed: store it (deflating again costs CPU and gains nothing)
        info.compress_type = (
            zipfile.ZIP_STORED if arcname.endswith(COMPRESSED_SUFFIXES) else zipfile.ZIP_DEFLATED
        )
        with open(path, "rb") as src, self._zf.open(info, mode="w") as dst:
            while chunk := src.read(CHUNK):
                dst.write(chunk)
                yield self._sink.drain()
        yield self._sink.drain()

    def close(self) -> bytes:
        self._zf.close()
        return self._sink.drain()
