"""Optional experiment loggers beside the run folder's own files (``logger=tensorboard``).

A logger gets ``log_steps(epoch, rows)`` and ``log_epoch(record)`` after every epoch,
``log_embedding(emb, labels, images)`` and ``log_hparams(hparams, metrics)`` once at the
end, and is closed.
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

    def log_steps(self, epoch: int, rows: list[dict]) -> None:
        """Per-step values (steps.jsonl rows of one epoch) under ``step/<field>``, at the
        global step number."""
        base = (epoch - 1) * len(rows)
        for i, row in enumerate(rows, 1):
            for key, value in row.items():
                if key not in ("epoch", "step") and isinstance(value, numbers.Real):
                    self.writer.add_scalar(f"step/{key}", float(value), base + i)
        self.writer.flush()

    def log_hparams(self, hparams: dict[str, object], metrics: dict[str, float]) -> None:
        """The run's settings beside its final metrics, for TensorBoard's HPARAMS tab (a
        sweep's runs compare there)."""
        clean = {k: v if isinstance(v, int | float | str | bool) else str(v)
                 for k, v in hparams.items()}
        self.writer.add_hparams(clean, {f"hparam/{k}": float(v) for k, v in metrics.items()},
                                run_name=".")
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
