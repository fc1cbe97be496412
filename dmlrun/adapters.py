"""Bring your own loss or miner: any that follows pytorch-metric-learning's call
convention trains as it is.

    loss(embeddings (B, D), labels (B,), indices_tuple=None) -> scalar
    miner(embeddings (B, D), labels (B,)) -> pairs (a1, p, a2, n) or triplets (a, p, n)

``build_components`` wraps such a loss in ``ConventionLoss`` and such a miner in
``ConventionMiner``, so the run treats them as its own: the loss's parameters (proxies)
are optimised, the compatibility checks that apply run, and the diagnostics that can be
computed from outside (distances, inverted fraction, tuples given) are recorded.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from dmlrun.distances import (
    CosineDistance,
    Distance,
    DotProductDistance,
    EuclideanDistance,
    SquaredEuclideanDistance,
)
from dmlrun.losses.base import LossOutput, MetricLoss
from dmlrun.miners.base import Miner
from dmlrun.tuples import is_pairs, num_tuples


def matching_distance(obj: Any) -> Distance:
    """Our distance for a pytorch-metric-learning object's ``distance`` attribute (the
    run grades and diagnoses with it): LpDistance -> (squared) euclidean, CosineSimilarity
    -> cosine, DotProductSimilarity -> dot; euclidean when there is none."""
    theirs = getattr(obj, "distance", None)
    if isinstance(theirs, Distance):
        return theirs
    name = type(theirs).__name__
    normalize = bool(getattr(theirs, "normalize_embeddings", False))
    if name == "CosineSimilarity":
        return CosineDistance()
    if name == "DotProductSimilarity":
        return DotProductDistance(normalize=normalize)
    if name == "LpDistance" and getattr(theirs, "p", 2) == 2:
        power = getattr(theirs, "power", 1)
        return (SquaredEuclideanDistance if power == 2 else EuclideanDistance)(
            normalize=normalize)
    return EuclideanDistance()


class ConventionLoss(MetricLoss):
    """A loss called as ``loss(embeddings, labels, indices_tuple)``. It takes pairs or
    triplets (pytorch-metric-learning converts between them) or the whole batch. Its
    per-tuple terms are not visible from outside: ``tuples`` and ``active`` count the
    tuples it was given (0 for the whole batch)."""

    accepts = ("pairs", "triplets")

    def __init__(self, loss: nn.Module) -> None:
        super().__init__(matching_distance(loss))
        self.inner = loss

    def _compute(self, embeddings, labels, indices) -> LossOutput:
        if indices is None:
            value = self.inner(embeddings, labels)
            count = torch.zeros((), dtype=torch.long, device=embeddings.device)
        else:
            value = self.inner(embeddings, labels, indices)
            count = torch.tensor(num_tuples(indices), device=embeddings.device)
        return LossOutput(value, count, count)

    def __repr__(self) -> str:
        return f"ConventionLoss({self.inner!r})"


class ConventionMiner(Miner):
    """A miner called as ``miner(embeddings, labels)`` returning an index tuple. What it
    yields (pairs or triplets) is read from one call on a small random batch."""

    def __init__(self, miner: Any) -> None:
        super().__init__(matching_distance(miner))
        self.inner = miner
        probe = torch.randn(8, 4, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            out = tuple(miner(probe, torch.arange(4).repeat_interleave(2)))
        if len(out) not in (3, 4):
            raise ValueError(f"{type(miner).__name__} returned {len(out)} index tensors; a "
                             "miner returns pairs (a1, p, a2, n) or triplets (a, p, n)")
        self.yields = "pairs" if is_pairs(out) else "triplets"

    def mine(self, embeddings: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.inner(embeddings, labels))

    def __repr__(self) -> str:
        return f"ConventionMiner({self.inner!r}, yields {self.yields})"
