"""The augmented dataset of a job as it is being produced: which files are complete, the streamed zip,
and the preview grid.

The engine writes every NIfTI under a temporary name and renames it when complete, so a file with its
final name is whole. A pair is sent once its label and its image are published
(:func:`imaging.export.published_pairs`: the export module is the one that knows the layout); when the job has succeeded, everything else (``dataset.json``,
``manifest.json``) follows.
"""

from __future__ import annotations

import io
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import anyio

from contract.schemas import JobState
from imaging.export import DATASET_JSON, MANIFEST_JSON, dataset_files, published_pairs
from service.zipstream import ZipStream

LAST_FILES = (DATASET_JSON, MANIFEST_JSON)
BLOCK = 512 * 1024


class JobAborted(Exception):
    """The job failed or was cancelled while its dataset was being streamed."""


def remaining_files(out_dir: Path, sent: set[str]) -> list[str]:
    """Every file of a finished dataset not sent yet; dataset.json and manifest.json last."""
    files = dataset_files(out_dir)
    rest = [f for f in files if f not in sent and f not in LAST_FILES]
    return rest + [f for f in LAST_FILES if f in files and f not in sent]


def _zip_blocks(zs: ZipStream, out_dir: Path, rels: list[str], sent: set[str]) -> Iterator[bytes]:
    """Zip ``rels`` into blocks of at least BLOCK bytes (many small NIfTI files per block: one thread hop
    and one ASGI message per block, not per file). Memory: one block plus one read chunk."""
    buf = bytearray()
    for rel in rels:
        for chunk in zs.add_file(out_dir / rel, rel):
            buf += chunk
            if len(buf) >= BLOCK:
                yield bytes(buf)
                buf.clear()
        sent.add(rel)
    if buf:
        yield bytes(buf)


async def stream_dataset(
    out_dir: Path, job_state: Callable[[], JobState | None], poll_s: float
) -> AsyncIterator[bytes]:
    """Zip chunks of the job's dataset: finished pairs at once, the rest when the job has succeeded."""
    zs = ZipStream()
    sent: set[str] = set()

    async def send(rels: list[str]) -> AsyncIterator[bytes]:
        blocks = _zip_blocks(zs, out_dir, rels, sent)
        while (block := await anyio.to_thread.run_sync(next, blocks, None)) is not None:
            yield block

    while True:
        state = await anyio.to_thread.run_sync(job_state)
        if state in (JobState.failed, JobState.cancelled, None):
            raise JobAborted(f"job ended {state.value if state else 'unknown'} during the download")
        pairs = await anyio.to_thread.run_sync(published_pairs, out_dir)
        new = [rel for _case, files in pairs for rel in files if rel not in sent]
        async for block in send(new):
            yield block
        if state == JobState.succeeded:
            break
        await anyio.sleep(poll_s)
    async for block in send(await anyio.to_thread.run_sync(remaining_files, out_dir, sent)):
        yield block
    yield zs.close()


def synthetic_pairs_page(out_dir: Path, offset: int, limit: int) -> tuple[int, list[dict]]:
    """``(total, [{"case", "slices", "mask_area_px"}])``: a page of the generated pairs on disk so far."""
    import nibabel as nib
    import numpy as np

    pairs = [p for p in published_pairs(out_dir) if p[0].startswith("synth")]
    items = []
    for case, files in pairs[offset : offset + limit]:
        mask = np.asarray(nib.Nifti1Image.from_filename(out_dir / files[-1]).dataobj) > 0
        depth = mask.shape[-1] if mask.ndim == 3 else 1
        items.append({"case": case, "slices": depth, "mask_area_px": int(mask.sum())})
    return len(pairs), items


def preview_png(out_dir: Path, n: int, synthetic_only: bool = True, offset: int = 0) -> bytes | None:
    """A grid of up to ``n`` pairs from the ``offset``-th: each image's slice with the most tumour, grey,
    with the mask outline in red."""
    import nibabel as nib
    import numpy as np

    pairs = [p for p in published_pairs(out_dir) if not synthetic_only or p[0].startswith("synth")]
    pairs = pairs[offset : offset + n]
    if not pairs:
        return None
    tiles = []
    for _case, files in pairs:
        image = np.asarray(nib.Nifti1Image.from_filename(out_dir / files[0]).dataobj, dtype=np.float32)
        mask = np.asarray(nib.Nifti1Image.from_filename(out_dir / files[-1]).dataobj) > 0
        if image.ndim == 2:
            image, mask = image[..., None], mask[..., None]
        tiles.append(_most_tumour_tile(image, mask))
    cols = min(len(tiles), 4)
    rows = (len(tiles) + cols - 1) // cols
    h, w = tiles[0].shape[:2]
    grid = np.zeros((rows * (h + 2), cols * (w + 2), 3), dtype=np.uint8)
    for i, t in enumerate(tiles):
        r, c = divmod(i, cols)
        grid[r * (h + 2) + 1 : r * (h + 2) + 1 + h, c * (w + 2) + 1 : c * (w + 2) + 1 + w] = t
    return _png(grid)


def case_preview_png(root: Path, case_id: str, channel: str | None) -> bytes:
    """PNG of a stored cohort case's axial slice with the most tumour (mask outline in red)."""
    from imaging.cohort import CohortSpec, load_case, read_cohort

    spec = CohortSpec(channel=channel) if channel else CohortSpec()
    case = next(c for c in read_cohort(root, spec).cases if c.case_id == case_id)
    image, mask, _ = load_case(case, spec)
    return _png(_most_tumour_tile(image, mask > 0))


def _png(rgb) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def _most_tumour_tile(image, mask):
    """The tile (:func:`_tile`) of a volume's axial slice with the most tumour (the middle one if none)."""
    import numpy as np

    areas = mask.reshape(-1, mask.shape[-1]).sum(0)
    z = int(np.argmax(areas)) if areas.any() else image.shape[-1] // 2
    return _tile(image[..., z], mask[..., z])


def _tile(image, mask):
    """(X, Y) slice -> (Y, X, 3) uint8 in radiological display orientation, mask outline in red."""
    import numpy as np

    lo, hi = float(np.min(image)), float(np.max(image))
    grey = ((image - lo) / (hi - lo) * 255).astype(np.uint8) if hi > lo else np.zeros(image.shape, np.uint8)
    m = mask.astype(bool)
    interior = m.copy()
    interior[1:, :] &= m[:-1, :]
    interior[:-1, :] &= m[1:, :]
    interior[:, 1:] &= m[:, :-1]
    interior[:, :-1] &= m[:, 1:]
    edge = m & ~interior
    rgb = np.stack([grey] * 3, axis=-1)
    rgb[edge] = (255, 40, 40)
    return np.ascontiguousarray(np.flipud(rgb.transpose(1, 0, 2)))
