"""Atomic checkpoint writes and safe loads.

A checkpoint is written to a temporary file in the same folder, flushed to disk, then
renamed over the target: a crash mid-write leaves the previous checkpoint intact.
"""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from longtail.errors import LongtailError, shown


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    """Save ``state`` (tensors, numbers, strings, lists, dicts only) atomically."""
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint without unpickling arbitrary objects (``weights_only=True``)."""
    if not path.is_file():
        raise LongtailError(
            f"checkpoint {shown(path)} does not exist; was the run trained to the end?"
        )
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # corrupt, truncated or foreign file
        raise LongtailError(
            f"checkpoint {shown(path)} cannot be read ({type(e).__name__}); it is corrupt, "
            "truncated "
            "or not a longtail checkpoint"
        ) from None
