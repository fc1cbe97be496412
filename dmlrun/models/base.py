"""Shared pieces of the embedding networks."""

import torch
import torch.nn.functional as F
from torch import nn


class Embedder(nn.Module):
    """Base class: normalises raw [0, 1] images inside the model and optionally
    L2-normalises the output, so a saved model embeds raw images.

    Subclasses implement ``embed(x) -> (B, D)`` on normalised input.
    """

    def __init__(self, embedding_dim: int, l2_normalize: bool, mean: float, std: float) -> None:
        super().__init__()
        if embedding_dim < 1 or std <= 0:
            raise ValueError(f"need embedding_dim >= 1 and std > 0, got {embedding_dim}, {std}")
        self.embedding_dim = embedding_dim
        self.l2_normalize = l2_normalize
        self.register_buffer("mean", torch.tensor(float(mean)))
        self.register_buffer("std", torch.tensor(float(std)))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) float in [0, 1] -> (B, D)."""
        out = self.embed((x - self.mean) / self.std)
        return F.normalize(out, dim=1) if self.l2_normalize else out
