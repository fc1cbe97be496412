"""N-pair loss (Sohn 2016)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dmlrun.distances import Distance
from dmlrun.losses.base import LossOutput, MetricLoss, pair_masks


class NPairsLoss(MetricLoss):
    """One (anchor, positive) pair per class of the batch; each anchor must pick its own
    positive among all N positives: cross-entropy over similarities S(anchor_i, positive_j)
    with target j = i. The pair per class is the first in batch order (lowest anchor, then
    lowest positive). Meant for the dot product (``distance=dot``) or cosine. With the dot
    product, ``embedding_reg`` adds Sohn's penalty ``embedding_reg * mean ||f||^2`` over the
    anchors and positives, which keeps the logits from growing without bound."""

    accepts = ("pairs", "triplets")
    distances = ("dot", "cosine")

    def __init__(self, distance: Distance | None = None, embedding_reg: float = 0.0) -> None:
        super().__init__(distance, "mean")
        if embedding_reg < 0:
            raise ValueError(f"embedding_reg must be >= 0, got {embedding_reg}")
        self.embedding_reg = embedding_reg

    def _compute(self, embeddings, labels, indices) -> LossOutput:
        pos, _ = pair_masks(labels, indices)
        a, p = torch.nonzero(pos, as_tuple=True)  # row-major: sorted by anchor, then positive
        order = torch.arange(len(a), device=a.device)
        classes, inverse = torch.unique(labels[a], return_inverse=True)
        first = torch.full((len(classes),), len(a), device=a.device).scatter_reduce(
            0, inverse, order, reduce="amin")
        a, p = a[first], p[first]
        if len(a) == 0:
            return self.empty(embeddings)
        sim = self.distance.similarity(embeddings[a], embeddings[p])
        losses = F.cross_entropy(sim, torch.arange(len(a), device=a.device), reduction="none")
        out = self.reduce(losses, embeddings)
        if self.embedding_reg:
            norms = torch.cat([embeddings[a], embeddings[p]]).pow(2).sum(1).mean()
            out = out._replace(loss=out.loss + self.embedding_reg * norms)
        return out
