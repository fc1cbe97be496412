"""dmlrun: a command-line experiment runner for deep metric learning."""

from __future__ import annotations

from pathlib import Path

__version__ = "0.1.0"

from dmlrun import config as _config  # noqa: E402,F401  (registers resolvers)


def load_embedder(path: str | Path, device: str = "cpu"):
    """Trained embedder from a run folder (its best.pt, else last.pt) or a checkpoint file.

    Returns the model in eval mode, mapping float images in [0, 1] of shape
    (B, C, H, W) to (B, D); input normalisation is inside the model.
    """
    from hydra.utils import instantiate

    from dmlrun.checkpoint import load_checkpoint, resolve_checkpoint

    state = load_checkpoint(resolve_checkpoint(path), map_location=device)
    model = instantiate(state["config"]["model"])
    model.load_state_dict(state["model"])
    return model.to(device).eval()


__all__ = ["__version__", "load_embedder"]
