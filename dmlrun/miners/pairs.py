"""Pair miners: positive pairs ``(a1, p)`` and negative pairs ``(a2, n)``, ordered
(both directions of a pair can appear), chosen with (B, B) masks."""

from __future__ import annotations

import torch

from dmlrun.distances import Distance
from dmlrun.miners.base import Miner
from dmlrun.tuples import label_masks


class PairMarginMiner(Miner):
    """The contrastive miner: positives farther than ``pos_margin`` and negatives closer
    than ``neg_margin`` (the pairs a contrastive loss with those margins still counts)."""

    yields = "pairs"

    def __init__(
        self, distance: Distance | None = None, pos_margin: float = 0.2, neg_margin: float = 0.8
    ) -> None:
        super().__init__(distance)
        self.pos_margin, self.neg_margin = pos_margin, neg_margin

    def mine(self, embeddings, labels):
        dist = self.distance.pairwise(embeddings, embeddings)
        pos, neg = label_masks(labels)
        a1, p = torch.nonzero(pos & (dist > self.pos_margin), as_tuple=True)
        a2, n = torch.nonzero(neg & (dist < self.neg_margin), as_tuple=True)
        return a1, p, a2, n


class MultiSimilarityMiner(Miner):
    """Wang et al. 2019: for anchor i, a positive is kept when it is farther than i's
    closest negative minus ``epsilon``, a negative when it is closer than i's farthest
    positive plus ``epsilon`` (in distances; with cosine this is the paper's rule on
    similarities)."""

    yields = "pairs"

    def __init__(self, distance: Distance | None = None, epsilon: float = 0.1) -> None:
        super().__init__(distance)
        self.epsilon = epsilon

    def mine(self, embeddings, labels):
        dist = self.distance.pairwise(embeddings, embeddings)
        pos, neg = label_masks(labels)
        closest_neg = dist.masked_fill(~neg, float("inf")).amin(1, keepdim=True)
        farthest_pos = dist.masked_fill(~pos, float("-inf")).amax(1, keepdim=True)
        a1, p = torch.nonzero(pos & (dist + self.epsilon > closest_neg), as_tuple=True)
        a2, n = torch.nonzero(neg & (dist - self.epsilon < farthest_pos), as_tuple=True)
        return a1, p, a2, n
