"""Checkpoint format shared by training, evaluation, export and inference.

A checkpoint is a ``torch.save`` dict with at least ``model`` (state dict), ``arch`` (see
``pose.models.arch_description``), ``joints``, ``input_hw`` and ``color_order`` so that any
command can rebuild the network from the file alone. Writes are atomic: write a temp file, rename.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pose.models import model_from_description


def save_atomic(obj: Any, path: str | Path) -> None:
    """``torch.save`` to a temporary file in the same folder, fsync, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        data = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # torch raises several types for truncated or foreign files
        raise ValueError(f"checkpoint {path} cannot be read: {exc}") from exc
    if not isinstance(data, dict) or "model" not in data or "arch" not in data:
        raise ValueError(f"checkpoint {path} is not an effpose checkpoint (no 'model'/'arch' entries)")
    return data


def load_model(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the network stored in a checkpoint, load its weights, return (model in eval mode, checkpoint)."""
    data = load_checkpoint(path)
    model = model_from_description(data["arch"], int(data.get("joints", 16)))
    model.load_state_dict(data["model"])
    model.eval()
    return model, data


def load_model_weights(model: nn.Module, path: str | Path) -> dict[str, Any]:
    data = load_checkpoint(path)
    model.load_state_dict(data["model"])
    return data
