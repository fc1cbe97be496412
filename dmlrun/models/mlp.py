"""A fully connected embedding network on flattened pixels."""

import math
from collections.abc import Sequence

import torch
from torch import nn

from dmlrun.models.base import Embedder


class MLP(Embedder):
    """Flatten, then Linear+PReLU layers, then Linear to ``embedding_dim``.

    Input (B, *in_shape) float in [0, 1]; output (B, embedding_dim).
    """

    def __init__(
        self,
        embedding_dim: int = 2,
        in_shape: Sequence[int] = (1, 28, 28),
        hidden_dims: Sequence[int] = (512, 256),
        l2_normalize: bool = False,
        mean: float = 0.1307,
        std: float = 0.3081,
    ) -> None:
        super().__init__(embedding_dim, l2_normalize, mean, std)
        layers: list[nn.Module] = [nn.Flatten()]
        width = math.prod(in_shape)
        for h in hidden_dims:
            layers += [nn.Linear(width, h), nn.PReLU()]
            width = h
        layers.append(nn.Linear(width, embedding_dim))
        self.net = nn.Sequential(*layers)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
