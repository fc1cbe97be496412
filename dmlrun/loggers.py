"""Optional experiment loggers beside the run folder's own files (``logger=tensorboard``).

A logger gets ``log_epoch(record)`` after every epoch and ``log_embedding(emb, labels,
images)`` once with the test embeddings, and is closed at the end of the run.
"""

from __future__ import annotations

import numbers
from pathlib import Path

import torch

from dmlrun.errors import ConfigError


class TensorBoardLogger:
    """Scalars per epoch and the test embeddings for TensorBoard's projector, written to
    ``<run folder>/<subdir>``; view with ``tensorboard --logdir <run folder or sweep>``."""

    def __init__(self, run_dir: str | Path, subdir: str = "tensorboard",
                 projector_points: int = 2000) -> None:
        try:  # deliberately here: tensorboard is an optional dependency
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise ConfigError("logger=tensorboard needs the tensorboard package: "
                              "pip install 'dmlrun[tensorboard]'") from exc
        self.writer = SummaryWriter(str(Path(run_dir) / subdir))
        self.projector_points = projector_points

    def log_epoch(self, record: dict) -> None:
        epoch = int(record["epoch"])
        for key, value in record.items():
            if key == "epoch" or not isinstance(value, numbers.Real):
                continue
            group = "val" if key.startswith("val_") else "train"
            self.writer.add_scalar(f"{group}/{key.removeprefix('val_')}", float(value), epoch)
        self.writer.flush()

    def log_embedding(self, emb: torch.Tensor, labels: torch.Tensor,
                      images: torch.Tensor) -> None:
        """(N, D) embeddings, (N,) labels, (N, C, H, W) uint8 images; the first
        ``projector_points`` go to the projector, each with its image as a sprite."""
        n = min(self.projector_points, len(emb))
        self.writer.add_embedding(emb[:n].float().cpu(), metadata=labels[:n].tolist(),
                                  label_img=images[:n].float().cpu() / 255.0, tag="test")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
