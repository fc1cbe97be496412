"""Shared pieces of the embedding networks."""

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class Embedder(nn.Module):
    """Base class: normalises raw [0, 1] images inside the model and optionally
    L2-normalises the output, so a saved model embeds raw images.

    Subclasses implement ``embed(x) -> (B, D)`` on normalised input.
    """

    def __init__(self, embedding_dim: int, l2_normalize: bool, mean: float | Sequence[float],
                 std: float | Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", _channel_stat(mean))
        self.register_buffer("std", _channel_stat(std))
        if embedding_dim < 1 or bool((self.std <= 0).any()):
            raise ValueError(f"need embedding_dim >= 1 and std > 0, got {embedding_dim}, {std}")
        self.embedding_dim = embedding_dim
        self.l2_normalize = l2_normalize

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) float in [0, 1] -> (B, D)."""
        out = self.embed((x - self.mean) / self.std)
        return F.normalize(out, dim=1) if self.l2_normalize else out


def _channel_stat(value: float | Sequence[float]) -> torch.Tensor:
    """A scalar (every channel alike) or one value per channel, shaped (C, 1, 1)."""
    if isinstance(value, int | float):
        return torch.tensor(float(value))
    return torch.tensor([float(v) for v in value]).view(-1, 1, 1)
