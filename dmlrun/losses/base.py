"""The loss contract and the shared checks; subclasses write only the math."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from dmlrun.distances import Distance, EuclideanDistance
from dmlrun.tuples import all_pairs, is_pairs, triplets_to_pairs

REDUCTIONS = ("sum", "mean", "mean_active")


class LossOutput(NamedTuple):
    """``loss`` scalar; ``tuples`` and ``active`` (non-zero loss) counts as 0-d tensors."""

    loss: torch.Tensor
    tuples: torch.Tensor
    active: torch.Tensor


class MetricLoss(nn.Module):
    """Base class. ``accepts`` names the index tuples a loss can take from a miner or
    sampler: ``"pairs"`` ``(a1, p, a2, n)`` and/or ``"triplets"`` ``(a, p, n)``."""

    accepts: tuple[str, ...] = ("pairs", "triplets")

    def __init__(self, distance: Distance | None = None, reduction: str = "mean") -> None:
        super().__init__()
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        self.distance = distance if distance is not None else EuclideanDistance()
        self.reduction = reduction

    def forward(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        indices: tuple[torch.Tensor, ...] | None = None,
    ) -> torch.Tensor:
        return self.compute(embeddings, labels, indices).loss

    def compute(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        indices: tuple[torch.Tensor, ...] | None = None,
    ) -> LossOutput:
        """Loss and tuple counts for (B, D) embeddings and (B,) labels."""
        self._check(embeddings, labels, indices)
        return self._compute(embeddings, labels, indices)

    def _compute(self, embeddings, labels, indices) -> LossOutput:
        raise NotImplementedError

    def _check(self, embeddings, labels, indices) -> None:
        if embeddings.ndim != 2 or labels.ndim != 1 or len(embeddings) != len(labels):
            raise ValueError(
                f"expected embeddings (B, D) and labels (B,), got {tuple(embeddings.shape)} "
                f"and {tuple(labels.shape)}"
            )
        if indices is not None:
            kind = "pairs" if is_pairs(indices) else "triplets"
            if kind not in self.accepts:
                raise ValueError(f"{type(self).__name__} accepts {self.accepts}, got {kind}")

    def reduce(self, losses: torch.Tensor, anchor: torch.Tensor) -> LossOutput:
        """Reduce per-tuple losses (T,). ``anchor`` is any tensor of the graph, used to
        return a zero that still connects to it when there are no tuples."""
        active = (losses > 0).sum()
        tuples = torch.tensor(losses.numel(), device=losses.device)
        if losses.numel() == 0:
            return LossOutput(anchor.sum() * 0.0, tuples, active)
        if self.reduction == "sum":
            loss = losses.sum()
        elif self.reduction == "mean":
            loss = losses.mean()
        else:
            loss = losses.sum() / active.clamp_min(1)
        return LossOutput(loss, tuples, active)


class PairLoss(MetricLoss):
    """A loss on positive and negative pairs. Triplets are split into their two pairs;
    with no indices every pair of the batch is used."""

    def pair_losses(
        self, pos_dist: torch.Tensor, neg_dist: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(P,) positive-pair and (N,) negative-pair distances -> per-pair losses."""
        raise NotImplementedError

    def _compute(self, embeddings, labels, indices) -> LossOutput:
        if indices is None:
            indices = all_pairs(labels)
        elif not is_pairs(indices):
            indices = triplets_to_pairs(indices)
        a1, p, a2, n = indices
        dist = self.distance.pairwise(embeddings, embeddings)
        pos_loss, neg_loss = self.pair_losses(dist[a1, p], dist[a2, n])
        return self.reduce(torch.cat([pos_loss, neg_loss]), embeddings)
