"""Checkpoints: atomic save (temp file + rename), load with clear errors."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from dmlrun.errors import UserError

FORMAT = "dmlrun-checkpoint-1"


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically: a crash mid-write leaves the old file intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({"format": FORMAT, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it 0600; follow the umask
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by ``save_checkpoint``; UserError if missing or corrupt."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise UserError(
            f"checkpoint {path} cannot be read (truncated or corrupt?): {type(exc).__name__}: "
            f"{str(exc)[:200]}"
        ) from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise UserError(f"{path} is not a dmlrun checkpoint")
    return state


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint file, or a run folder (its best.pt, else last.pt) -> checkpoint path."""
    path = Path(path)
    if path.is_dir():
        for name in ("best.pt", "last.pt"):
            candidate = path / "checkpoints" / name
            if candidate.is_file():
                return candidate
        raise UserError(f"no checkpoints/best.pt or checkpoints/last.pt in run folder {path}")
    return path
