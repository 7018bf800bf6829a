"""Checkpoints: state dicts + config + code version + optimiser states + step, written atomically.

A checkpoint holds only tensors, numbers, strings, lists and dicts, so it loads with
``torch.load(weights_only=True)``: no code from a checkpoint file is ever executed, which matters because
the service imports checkpoints uploaded by users.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from imaging import __version__
from imaging.errors import CheckpointError, DHVAEError

from .config import DHVAEConfig
from .registry import build_model

if TYPE_CHECKING:
    from .train import Trainable

log = logging.getLogger(__name__)

FORMAT = "dhvae-checkpoint/1"


def save_checkpoint(
    path: Path,
    *,
    model: Trainable,
    config: DHVAEConfig,
    step: int,
    optimizers: dict[str, torch.optim.Optimizer] | None = None,
    extra: dict[str, Any] | None = None,
) -> None:
    """Write a checkpoint to ``path`` atomically (temporary file in the same folder, fsync, rename)."""
    payload = {
        "format": FORMAT,
        "code_version": __version__,
        "config": config.to_dict(),
        "step": int(step),
        "model": model.state_dict(),
        "optimizers": {k: o.state_dict() for k, o in (optimizers or {}).items()},
        "extra": extra or {},
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load and structurally validate a checkpoint (weights_only=True). Raises CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # a pickle with code in it lands here too: weights_only refuses it
        raise CheckpointError(
            f"{path.name}: not a loadable dHVAE checkpoint ({type(e).__name__}: {e})"
        ) from e
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path.name}: not a dHVAE checkpoint (expected format {FORMAT!r})")
    for key, kind in (("config", dict), ("model", dict), ("step", int)):
        if not isinstance(payload.get(key), kind):
            raise CheckpointError(f"{path.name}: field {key!r} missing or not a {kind.__name__}")
    try:
        payload["config_obj"] = DHVAEConfig.from_dict(payload["config"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path.name}: config does not match any known configuration ({e})") from e
    return payload


def model_from_checkpoint(
    path: Path, map_location: str | torch.device = "cpu"
) -> tuple[Trainable, dict[str, Any]]:
    """Rebuild the model of a checkpoint and load its weights strictly. Returns (model, payload)."""
    payload = load_checkpoint(path, map_location)
    try:
        model = build_model(payload["config_obj"])
    except DHVAEError as e:
        raise CheckpointError(f"{Path(path).name}: {e}") from e
    try:
        model.load_state_dict(payload["model"], strict=True)
    except RuntimeError as e:
        raise CheckpointError(
            f"{Path(path).name}: weights do not fit the configuration it declares ({e})"
        ) from e
    return model, payload


def validate_checkpoint(path: Path) -> dict[str, Any]:
    """Check an imported checkpoint fully; return a summary (preset, model, step, parameters)."""
    model, payload = model_from_checkpoint(path)
    for name, t in payload["model"].items():
        if torch.is_tensor(t) and t.is_floating_point() and not torch.isfinite(t).all():
            raise CheckpointError(f"{Path(path).name}: tensor {name!r} has non-finite values")
    cfg: DHVAEConfig = payload["config_obj"]
    return {
        "model": cfg.model,
        "preset": cfg.preset,
        "step": payload["step"],
        "parameters": sum(p.numel() for p in model.parameters()),
        "code_version": payload.get("code_version"),
        "config": cfg.to_dict(),
    }
