"""The miner contract: runs without gradients, returns index tuples and a count."""

from __future__ import annotations

from typing import NamedTuple

import torch

from dmlrun.distances import Distance, EuclideanDistance
from dmlrun.tuples import num_tuples


class MiningResult(NamedTuple):
    """``indices``: pairs ``(a1, p, a2, n)`` or triplets ``(a, p, n)``; ``mined``: 0-d count."""

    indices: tuple[torch.Tensor, ...]
    mined: torch.Tensor


class Miner:
    """Base class. ``yields`` is ``"pairs"`` or ``"triplets"``; subclasses write ``mine``."""

    yields: str = "triplets"

    def __init__(self, distance: Distance | None = None) -> None:
        self.distance = distance if distance is not None else EuclideanDistance()

    def __call__(self, embeddings: torch.Tensor, labels: torch.Tensor) -> MiningResult:
        if embeddings.ndim != 2 or len(embeddings) != len(labels):
            raise ValueError(
                f"expected embeddings (B, D) and labels (B,), got {tuple(embeddings.shape)} "
                f"and {tuple(labels.shape)}"
            )
        with torch.no_grad():
            indices = self.mine(embeddings.detach().float(), labels)
        return MiningResult(indices, torch.tensor(num_tuples(indices), device=labels.device))

    def mine(self, embeddings: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(distance={self.distance!r})"
