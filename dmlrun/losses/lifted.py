"""Lifted structured loss (Oh Song et al. 2016), in the smooth form of the paper."""

from __future__ import annotations

import torch

from dmlrun.distances import Distance
from dmlrun.losses.base import LossOutput, MetricLoss, masked_logsumexp, pair_masks


class LiftedStructureLoss(MetricLoss):
    """Per positive pair (i, j), with the negatives N_i of i and N_j of j:

        1/2 * max(0, log(sum_{n in N_i} exp(m - D(i, n)) + sum_{n in N_j} exp(m - D(j, n)))
                     + D(i, j) - pos_margin)^2

    averaged over positive pairs (each unordered pair appears in both directions, hence
    the 1/2). ``m`` is ``neg_margin``.
    """

    distance_params = ("neg_margin",)

    def __init__(
        self,
        distance: Distance | None = None,
        neg_margin: float = 1.0,
        pos_margin: float = 0.0,
        reduction: str = "mean",
    ) -> None:
        super().__init__(distance, reduction)
        self.neg_margin, self.pos_margin = neg_margin, pos_margin

    def _compute(self, embeddings, labels, indices) -> LossOutput:
        dist = self.distance.pairwise(embeddings, embeddings)
        pos, neg = pair_masks(labels, indices)
        a, p = torch.nonzero(pos, as_tuple=True)
        row_lse = masked_logsumexp(self.neg_margin - dist, neg)  # (B,)
        has_neg = neg.any(1)
        lse = torch.logaddexp(row_lse[a].masked_fill(~has_neg[a], float("-inf")),
                              row_lse[p].masked_fill(~has_neg[p], float("-inf")))
        keep = has_neg[a] | has_neg[p]
        losses = (lse + dist[a, p] - self.pos_margin).clamp_min(0.0).pow(2) / 2
        losses = torch.where(keep, losses, torch.zeros_like(losses))
        return self.reduce(losses, embeddings, tuples=pos.sum() + neg.sum())
