"""Pairwise distances between embeddings. Smaller always means closer.

``pairwise(x (N, D), y (M, D)) -> (N, M)``; ``paired(x (N, D), y (N, D)) -> (N,)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_EPS = 1e-12


class Distance:
    """Base class; subclasses implement ``pairwise`` and ``paired``."""

    name = "distance"

    def pairwise(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def paired(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return self.pairwise(x, x if y is None else y)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class SquaredEuclideanDistance(Distance):
    """||x - y||^2."""

    name = "squared"

    def pairwise(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        sq = (x * x).sum(1, keepdim=True) + (y * y).sum(1)[None, :] - 2.0 * x @ y.T
        return sq.clamp_min(0.0)

    def paired(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (x - y).pow(2).sum(1)


class EuclideanDistance(SquaredEuclideanDistance):
    """||x - y||; the square root is taken of max(d^2, 1e-12) so gradients stay finite
    for identical points."""

    name = "euclidean"

    def pairwise(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return super().pairwise(x, y).clamp_min(_EPS).sqrt()

    def paired(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return super().paired(x, y).clamp_min(_EPS).sqrt()


class CosineDistance(Distance):
    """1 - cos(x, y), in [0, 2]."""

    name = "cosine"

    def pairwise(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return 1.0 - F.normalize(x, dim=1) @ F.normalize(y, dim=1).T

    def paired(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return 1.0 - (F.normalize(x, dim=1) * F.normalize(y, dim=1)).sum(1)
