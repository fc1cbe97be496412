"""Triplet margin loss (Schroff, Kalenichenko & Philbin 2015, "FaceNet")."""

from __future__ import annotations

from dmlrun.distances import Distance
from dmlrun.losses.base import LossOutput, MetricLoss
from dmlrun.tuples import label_masks


class TripletLoss(MetricLoss):
    """Per triplet ``max(0, D(a, p) - D(a, n) + margin)``.

    ``reduction="mean"`` averages over all triplets, ``"mean_active"`` over triplets
    with non-zero loss, ``"sum"`` adds them. With no indices every valid triplet of
    the batch is used (computed densely on the (B, B, B) grid, no index lists).
    """

    accepts = ("triplets",)
    distance_params = ("margin",)

    def __init__(
        self, distance: Distance | None = None, margin: float = 1.0, reduction: str = "mean"
    ) -> None:
        super().__init__(distance, reduction)
        if margin < 0:
            raise ValueError(f"margin must be >= 0, got {margin}")
        self.margin = margin

    def _compute(self, embeddings, labels, indices) -> LossOutput:
        dist = self.distance.pairwise(embeddings, embeddings)
        if indices is None:
            pos, neg = label_masks(labels)
            valid = pos[:, :, None] & neg[:, None, :]
            grid = (dist[:, :, None] - dist[:, None, :] + self.margin).clamp_min(0.0)
            return self.reduce(grid[valid], embeddings)
        a, p, n = indices
        losses = (dist[a, p] - dist[a, n] + self.margin).clamp_min(0.0)
        return self.reduce(losses, embeddings)
