"""Pairwise distances between embeddings. Smaller always means closer.

``pairwise(x (N, D), y (M, D)) -> (N, M)``; ``paired(x (N, D), y (N, D)) -> (N,)``;
``similarity(x, y) -> (N, M)``, larger means closer (``offset - pairwise``), for the
losses written in similarities (multi-similarity, N-pair, SupCon, NT-Xent).
With ``normalize=True`` embeddings are L2-normalised before any of these.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

_EPS = 1e-12


class Distance:
    """Base class; subclasses implement ``_pairwise`` and ``_paired`` on prepared inputs."""

    name = "distance"
    offset = 0.0  # similarity = offset - distance
    max_value = math.inf  # largest distance possible (for margin checks)

    def __init__(self, normalize: bool = False) -> None:
        self.normalize = normalize

    def _prep(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=1) if self.normalize else x

    def pairwise(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self._pairwise(self._prep(x), self._prep(y))

    def paired(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self._paired(self._prep(x), self._prep(y))

    def similarity(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.offset - self.pairwise(x, y)

    def bounded_max(self) -> float:
        """Largest distance the embeddings can have (finite once normalised)."""
        return self.max_value

    def _pairwise(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _paired(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return self.pairwise(x, x if y is None else y)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(normalize={self.normalize})"


class SquaredEuclideanDistance(Distance):
    """||x - y||^2."""

    name = "squared"

    def bounded_max(self) -> float:
        return 4.0 if self.normalize else math.inf

    def _pairwise(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        sq = (x * x).sum(1, keepdim=True) + (y * y).sum(1)[None, :] - 2.0 * x @ y.T
        return sq.clamp_min(0.0)

    def _paired(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (x - y).pow(2).sum(1)


class EuclideanDistance(SquaredEuclideanDistance):
    """||x - y||; the square root is taken of max(d^2, 1e-12) so gradients stay finite
    for identical points."""

    name = "euclidean"

    def bounded_max(self) -> float:
        return 2.0 if self.normalize else math.inf

    def _pairwise(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return super()._pairwise(x, y).clamp_min(_EPS).sqrt()

    def _paired(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return super()._paired(x, y).clamp_min(_EPS).sqrt()


class CosineDistance(Distance):
    """1 - cos(x, y), in [0, 2]; its similarity is cos(x, y). Always normalises."""

    name = "cosine"
    offset = 1.0
    max_value = 2.0

    def _pairwise(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return 1.0 - F.normalize(x, dim=1) @ F.normalize(y, dim=1).T

    def _paired(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return 1.0 - (F.normalize(x, dim=1) * F.normalize(y, dim=1)).sum(1)


class DotProductDistance(Distance):
    """-<x, y>: the negated dot product, so that smaller means closer; its similarity is
    <x, y>. With ``normalize=True`` this is cosine similarity shifted by one."""

    name = "dot"

    def bounded_max(self) -> float:
        return 1.0 if self.normalize else math.inf

    def _pairwise(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return -(x @ y.T)

    def _paired(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return -(x * y).sum(1)
