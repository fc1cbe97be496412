"""Grading during and after training: the run's ``Evaluator`` (embed with the run's
model, grade with its distance and the dataset's protocol: leave-one-out on a split, or
its queries against its gallery) and the per-epoch ``Validation``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from dmlrun.data.dataset import chunks
from dmlrun.metrics import EVAL_BATCH_SIZE, RECALL_KS, embed, embed_split, evaluate_embeddings

FRAME_POINTS = 2000  # validation points drawn in the per-epoch frames


def raw_pixels(split: Any, batch_size: int = 4096) -> torch.Tensor:
    """(N, C * H * W) float pixels in [0, 1] of a split."""
    return torch.cat([x.flatten(1).float() / 255.0 for x in
                      split.batches(chunks(len(split), batch_size))])


class Evaluator:
    """Embeds with the run's model and grades with the run's distance."""

    def __init__(self, model: torch.nn.Module, distance: Any, knn_k: int, seed: int,
                 batch_size: int, amp_dtype: torch.dtype | None,
                 recall_ks: tuple[int, ...] = RECALL_KS, clustering: bool = True) -> None:
        self.model, self.distance, self.knn_k, self.seed = model, distance, knn_k, seed
        self.batch_size, self.amp_dtype, self.recall_ks = batch_size, amp_dtype, recall_ks
        self.clustering = clustering

    def __call__(self, split: Any) -> tuple[torch.Tensor, dict[str, float]]:
        """(N, D) embeddings of a split's images, and every metric on them."""
        return self.grade(embed_split(self.model, split, self.batch_size, self.amp_dtype),
                          split)

    def grade(self, emb: torch.Tensor, split: Any) -> tuple[torch.Tensor, dict[str, float]]:
        """Every metric of (N, D) embeddings of ``split``: leave-one-out, or its queries
        against its gallery (``split.query_count``)."""
        return emb, evaluate_embeddings(emb, split.labels, self.distance, self.knn_k,
                                        self.seed, getattr(split, "query_count", None),
                                        self.recall_ks, self.clustering)

    def baselines(self, split: Any) -> dict[str, dict[str, float]]:
        """The metrics of the untrained model and of raw pixels on ``split``."""
        raw = raw_pixels(split, self.batch_size).to(split.labels.device)
        return {"untrained": self(split)[1], "raw_pixels": self.grade(raw, split)[1]}


class Validation:
    """Validation after each epoch, on the main process only. With ``frames_dir``, a fixed
    sample of validation embeddings is saved there each epoch (``frame_NNN.pt``; epoch 0 =
    the untrained network), so the per-epoch frames survive an interruption and resume."""

    def __init__(self, evaluator: Evaluator, split: Any, main: bool,
                 frames_dir: Path | None, device: torch.device) -> None:
        self.evaluator, self.split, self.main = evaluator, split, main
        self.frames_dir = frames_dir if main else None
        self.frame_idx = torch.randperm(len(split), generator=torch.Generator().manual_seed(
            0))[:FRAME_POINTS].to(device)

    def __call__(self, epoch: int) -> dict[str, float]:
        if not self.main:
            return {}
        emb, metrics = self.evaluator(self.split)
        self._save_frame(epoch, emb[self.frame_idx])
        return metrics

    def untrained_frame(self) -> None:
        """Epoch 0's frame: the network before training."""
        if self.frames_dir is not None:
            emb = embed(self.evaluator.model, self.split.take(self.frame_idx),
                        self.evaluator.batch_size, self.evaluator.amp_dtype)
            self._save_frame(0, emb)

    def _save_frame(self, epoch: int, emb: torch.Tensor) -> None:
        if self.frames_dir is not None:
            self.frames_dir.mkdir(parents=True, exist_ok=True)
            torch.save(emb.cpu(), self.frames_dir / f"frame_{epoch:03d}.pt")

    def frames(self) -> list[tuple[int, torch.Tensor]]:
        """Every saved (epoch, embeddings) frame, in epoch order (from before a resume
        too)."""
        if self.frames_dir is None or not self.frames_dir.is_dir():
            return []
        return [(int(f.stem.split("_")[1]), torch.load(f, weights_only=True))
                for f in sorted(self.frames_dir.glob("frame_*.pt"))]


@torch.no_grad()
def penultimate_features(model: torch.nn.Module, split: Any,
                         batch_size: int = EVAL_BATCH_SIZE,
                         amp_dtype: torch.dtype | None = None) -> torch.Tensor:
    """(N, F) float32 inputs of the model's last linear layer for a split's images: the
    features the embedding is read from."""
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    if not linears:
        raise ValueError("the features before the embedding are the input of the model's "
                         "last nn.Linear, and this model has none")
    captured: list[torch.Tensor] = []
    handle = linears[-1].register_forward_hook(
        lambda _module, inputs, _output: captured.append(inputs[0].float()))
    try:
        embed_split(model, split, batch_size, amp_dtype)
    finally:
        handle.remove()
    return torch.cat(captured)
