"""Large-margin nearest neighbour loss (Weinberger & Saul 2009), on the batch."""

from __future__ import annotations

import torch

from dmlrun.distances import Distance
from dmlrun.losses.base import LossOutput, MetricLoss
from dmlrun.tuples import label_masks


class LMNNLoss(MetricLoss):
    """For each anchor i, its target neighbours j are its ``k`` nearest same-class points
    in the batch (chosen by the current distance, not differentiated through). Then

        (1 - mu) * sum_j D(i, j)^2  +  mu * sum_j sum_l max(0, margin + D(i, j)^2 - D(i, l)^2)

    over impostors l (other classes). The hinge is zero once every impostor is at least
    ``margin`` farther (in squared distance) than every target neighbour; moving an impostor
    away lowers it. ``reduction="mean"`` averages per-anchor losses, ``"sum"`` adds them.
    Uses the whole batch, so it takes no miner.
    """

    accepts = ()

    def __init__(
        self,
        distance: Distance | None = None,
        k: int = 3,
        mu: float = 0.5,
        margin: float = 1.0,
        reduction: str = "mean",
    ) -> None:
        super().__init__(distance, reduction)
        if k < 1 or not 0.0 <= mu <= 1.0 or margin <= 0:
            raise ValueError(f"need k >= 1, mu in [0, 1] and margin > 0, got {k}, {mu}, {margin}")
        if reduction == "mean_active":
            raise ValueError("LMNN reduces per anchor: reduction must be 'mean' or 'sum'")
        self.k, self.mu, self.margin = k, mu, margin

    def target_neighbours(self, d2: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """(B, B) mask: j is among the k nearest same-class points of i."""
        pos, _ = label_masks(labels)
        k = min(self.k, len(labels) - 1)
        if k < 1:
            return torch.zeros_like(pos)
        nearest = d2.detach().masked_fill(~pos, float("inf")).topk(k, dim=1, largest=False)
        target = torch.zeros_like(pos)
        target.scatter_(1, nearest.indices, True)
        return target & pos

    def _compute(self, embeddings, labels, indices) -> LossOutput:
        d2 = self.distance.pairwise(embeddings, embeddings).pow(2)
        target = self.target_neighbours(d2, labels)
        _, neg = label_masks(labels)
        pull = (d2 * target).sum(1)
        # hinge[i, j, l] = margin + D(i, j)^2 - D(i, l)^2
        hinge = (self.margin + d2[:, :, None] - d2[:, None, :]).clamp_min(0.0)
        valid = target[:, :, None] & neg[:, None, :]
        push = (hinge * valid).sum((1, 2))
        per_anchor = ((1.0 - self.mu) * pull + self.mu * push)[target.any(1)]
        tuples = valid.sum()
        active = ((hinge > 0) & valid).sum()
        loss = per_anchor.sum() if self.reduction == "sum" else per_anchor.mean()
        if per_anchor.numel() == 0:
            loss = embeddings.sum() * 0.0
        return LossOutput(loss, tuples, active)
