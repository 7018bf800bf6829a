"""Write ``.nii.gz`` volumes one axial slice at a time, with memory that does not grow with the volume.

A single-file NIfTI-1 image (``n+1``) is a 348-byte header, 4 bytes of extension flags, then the voxels
in Fortran order (x fastest, then y, then z) starting at ``vox_offset = 352``. Because z is the slowest
axis, the axial slices ``volume[:, :, k]`` are contiguous runs of the data block, so a volume can be
streamed through gzip slice by slice and only one slice is ever held in memory.

Writes are atomic (:mod:`imaging.files`): bytes go to a hidden ``.NAME.*.partial`` in the same directory, which is fsynced and renamed to
``NAME`` only when every declared slice has been written. On error the partial file is deleted, so a
file with the final name is always complete. The gzip stream has ``mtime=0`` and no file name and a
fixed compression level, so identical data give byte-identical files.

The layout is the one nibabel reads (and writes); see ``nibabel.nifti1.Nifti1Header`` and the NIfTI-1
standard, https://nifti.nimh.nih.gov/nifti-1/documentation/nifti1fields.
"""

from __future__ import annotations

import contextlib
import gzip
import logging
import os
from pathlib import Path
from typing import BinaryIO

import nibabel as nib
import numpy as np
from numpy.typing import ArrayLike, DTypeLike

from .files import PublishOnExit, partial_path, publish

log = logging.getLogger(__name__)

NIFTI1_VOX_OFFSET = 352  # 348-byte header + 4-byte extension flag block
DEFAULT_COMPRESSLEVEL = 6  # fixed: the level is part of what makes the output byte-identical
WRITE_CHUNK_BYTES = 64 * 1024  # bytes handed to gzip per write call


def nifti1_header(shape: tuple[int, int, int], dtype: DTypeLike, affine: ArrayLike) -> nib.Nifti1Header:
    """Header of a single-file NIfTI-1 volume of ``shape`` (X, Y, Z) voxels in world space ``affine``.

    The affine (4x4, voxel index -> scanner mm) goes into both the qform and the sform with code 1
    (scanner anatomical); nibabel's loader then returns it exactly (from the sform) and the zooms are the
    column norms of its 3x3 part. Data are stored unscaled (``scl_slope`` NaN).
    """
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
        raise ValueError(f"affine must be a finite 4x4 matrix, got shape {affine.shape}")
    if len(shape) != 3 or any(int(n) < 1 for n in shape):
        raise ValueError(f"shape must be three positive sizes (X, Y, Z), got {shape}")
    header = nib.Nifti1Header()
    header.set_data_dtype(np.dtype(dtype))
    header.set_data_shape(tuple(int(n) for n in shape))
    header.set_qform(affine, code=1)
    header.set_sform(affine, code=1)
    header.set_xyzt_units(xyz="mm")
    header["vox_offset"] = NIFTI1_VOX_OFFSET
    return header


class StreamingNiftiWriter(PublishOnExit):
    """Context manager that writes a 3D ``.nii.gz`` volume as a sequence of axial slices.

    Example::

        with StreamingNiftiWriter(path, (H, W, D), np.float32, affine) as writer:
            for k in range(D):
                writer.write_slice(volume_slice_k)      # (H, W)

    Args:
        path: final file name (should end in ``.nii.gz``); its directory must exist.
        shape: ``(X, Y, Z)`` voxels; exactly ``Z`` slices of shape ``(X, Y)`` must be written.
        dtype: on-disk voxel type, e.g. ``np.float32`` for images, ``np.uint8`` for masks. Slices are
            cast to it; for integer types the cast must be exact (``0.7`` is rejected, not truncated).
        affine: 4x4 voxel-to-world matrix in mm.
        compresslevel: gzip level (1-9); keep it fixed for reproducible bytes.

    Leaving the ``with`` block normally publishes the file (``close``); leaving it with an exception
    deletes the partial file (``abort``). Closing with fewer slices than declared raises ``ValueError``
    and publishes nothing.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        shape: tuple[int, int, int],
        dtype: DTypeLike,
        affine: ArrayLike,
        *,
        compresslevel: int = DEFAULT_COMPRESSLEVEL,
    ) -> None:
        self.path = Path(path)
        self.partial = partial_path(self.path)
        header = nifti1_header(shape, dtype, affine)
        nx, ny, nz = (int(n) for n in shape)
        self.shape: tuple[int, int, int] = (nx, ny, nz)
        # the header's dtype carries the byte order the header declares, so slices are cast to exactly it
        self.dtype: np.dtype = header.get_data_dtype()
        self.slices_written = 0
        self._closed = False
        self._raw: BinaryIO = open(self.partial, "wb")  # closed by close() or abort()
        try:
            self._gz = gzip.GzipFile(
                filename="", mode="wb", fileobj=self._raw, compresslevel=compresslevel, mtime=0
            )
            block = header.binaryblock
            assert len(block) == 348, "a NIfTI-1 header is 348 bytes"
            self._gz.write(block)
            self._gz.write(b"\x00\x00\x00\x00")  # extension flags: no extensions follow
        except BaseException:
            self.abort()
            raise

    # -- writing ---------------------------------------------------------------------------------------

    def write_slice(self, data: ArrayLike) -> None:
        """Append the next axial slice, a 2D array of shape ``(X, Y)``."""
        if self._closed:
            raise ValueError(f"{self.path}: writer is closed")
        nx, ny, nz = self.shape
        if self.slices_written >= nz:
            raise ValueError(f"{self.path}: all {nz} declared slices are already written")
        arr = np.asarray(data)
        if arr.shape != (nx, ny):
            raise ValueError(
                f"{self.path}: slice {self.slices_written} has shape {arr.shape}, expected {(nx, ny)}"
            )
        out = arr.astype(self.dtype, copy=False)
        if self.dtype.kind in "iub" and not np.array_equal(out, arr):
            raise ValueError(
                f"{self.path}: slice {self.slices_written} has values that {self.dtype} cannot hold exactly"
            )
        # NIfTI stores x fastest, so rows of the transpose (Y, X) are written in order. A few rows at a
        # time: neither the reordered copy nor zlib's output buffer ever holds a whole slice.
        rows = max(1, WRITE_CHUNK_BYTES // (nx * out.itemsize))
        for y0 in range(0, ny, rows):
            chunk = np.ascontiguousarray(out[:, y0 : y0 + rows].T)
            self._gz.write(chunk.tobytes())  # at most WRITE_CHUNK_BYTES
        self.slices_written += 1

    # -- finishing -------------------------------------------------------------------------------------

    def close(self) -> None:
        """Finish the gzip stream, fsync, and rename the partial file to its final name.

        Raises ``ValueError`` (after deleting the partial file) if fewer slices than declared were written.
        """
        if self._closed:
            return
        nz = self.shape[2]
        if self.slices_written != nz:
            self.abort()
            raise ValueError(
                f"{self.path}: closed after {self.slices_written} of {nz} slices; nothing was written"
            )
        try:
            self._gz.close()  # writes the gzip trailer; does not close the underlying file
            self._raw.flush()
            os.fsync(self._raw.fileno())
            self._raw.close()
            publish(self.partial, self.path)
        except BaseException:
            self.abort()
            raise
        self._closed = True
        log.debug("wrote %s (%s, %s)", self.path, self.shape, self.dtype)

    def abort(self) -> None:
        """Stop writing and delete the partial file. Safe to call more than once."""
        if self._closed:
            return
        self._closed = True
        gz = getattr(self, "_gz", None)
        try:
            if gz is not None:
                # the file is deleted below, so a failure to finish its gzip trailer does not matter and
                # must not hide the exception that made us abort
                with contextlib.suppress(OSError, ValueError):
                    gz.close()
        finally:
            self._raw.close()
            self.partial.unlink(missing_ok=True)

    @property
    def closed(self) -> bool:
        """True once the file is published or aborted."""
        return self._closed


def write_volume(
    path: str | os.PathLike[str],
    array: ArrayLike,
    affine: ArrayLike,
    dtype: DTypeLike,
    *,
    compresslevel: int = DEFAULT_COMPRESSLEVEL,
) -> Path:
    """Write a whole 3D ``array`` (X, Y, Z) to ``path`` slice by slice; return the path."""
    volume = np.asarray(array)
    if volume.ndim != 3:
        raise ValueError(f"{path}: expected a 3D volume (X, Y, Z), got shape {volume.shape}")
    with StreamingNiftiWriter(path, volume.shape, dtype, affine, compresslevel=compresslevel) as writer:
        for k in range(volume.shape[2]):
            writer.write_slice(volume[:, :, k])
    return writer.path
