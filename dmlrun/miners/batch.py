"""Triplet miners that search the whole batch with (B, B) masks, no Python loops."""

from __future__ import annotations

import torch

from dmlrun.distances import Distance
from dmlrun.miners.base import Miner
from dmlrun.tuples import label_masks


class HardMiner(Miner):
    """For each anchor with a positive and a negative in the batch: its closest
    negative and its farthest positive (``positive="hardest"``: batch-hard, Hermans et
    al. 2017) or its closest positive (``positive="easiest"``: easy-positive hard-negative,
    Xuan et al. 2020). Pair losses use each triplet's two pairs.

    Batch-hard with the triplet loss can collapse all embeddings to one point from a
    random start (loss stuck at the margin), notably in 2-D; easy-positive mining avoids it.
    """

    def __init__(self, distance: Distance | None = None, positive: str = "hardest") -> None:
        super().__init__(distance)
        if positive not in ("hardest", "easiest"):
            raise ValueError(f"positive must be 'hardest' or 'easiest', got {positive!r}")
        self.positive = positive

    def mine(self, embeddings, labels):
        dist = self.distance.pairwise(embeddings, embeddings)
        pos, neg = label_masks(labels)
        if self.positive == "hardest":
            pick_pos = dist.masked_fill(~pos, float("-inf")).argmax(1)
        else:
            pick_pos = dist.masked_fill(~pos, float("inf")).argmin(1)
        hardest_neg = dist.masked_fill(~neg, float("inf")).argmin(1)
        a = torch.nonzero(pos.any(1) & neg.any(1)).flatten()
        return a, pick_pos[a], hardest_neg[a]


class SemiHardMiner(Miner):
    """FaceNet's semi-hard triplets: every (a, p, n) with
    D(a, p) < D(a, n) <= D(a, p) + margin (negatives farther than the positive but
    still inside the margin)."""

    max_grid = 2**24  # (a, p, n) cells examined at once

    def __init__(self, distance: Distance | None = None, margin: float = 0.2) -> None:
        super().__init__(distance)
        if margin <= 0:
            raise ValueError(f"semihard margin must be > 0, got {margin}")
        self.margin = margin

    def mine(self, embeddings, labels):
        # gap[a, p, n] = D(a, n) - D(a, p)
        return triplets_where(self.distance.pairwise(embeddings, embeddings), labels,
                              lambda gap: (gap > 0) & (gap <= self.margin), self.max_grid)


class BatchAllMiner(Miner):
    """Batch-all (Hermans et al. 2017): every triplet of the batch that still has a
    non-zero triplet loss, D(a, p) - D(a, n) + margin > 0."""

    max_grid = 2**24

    def __init__(self, distance: Distance | None = None, margin: float = 1.0) -> None:
        super().__init__(distance)
        if margin < 0:
            raise ValueError(f"batch-all margin must be >= 0, got {margin}")
        self.margin = margin

    def mine(self, embeddings, labels):
        return triplets_where(self.distance.pairwise(embeddings, embeddings), labels,
                              lambda gap: gap < self.margin, self.max_grid)


def triplets_where(dist: torch.Tensor, labels: torch.Tensor, keep, max_grid: int = 2**24):
    """Every valid triplet (a, p, n) with ``keep(gap)`` true, gap = D(a, n) - D(a, p).
    The (a, p, n) grid is B^3, so it is walked in blocks of anchors to bound memory."""
    pos, neg = label_masks(labels)
    b = len(labels)
    block = max(1, max_grid // max(b * b, 1))
    found = []
    for s in range(0, b, block):
        d = dist[s : s + block]
        gap = d[:, None, :] - d[:, :, None]
        valid = pos[s : s + block, :, None] & neg[s : s + block, None, :] & keep(gap)
        a, p, n = torch.nonzero(valid, as_tuple=True)
        found.append((a + s, p, n))
    a, p, n = (torch.cat(t) for t in zip(*found, strict=True))
    return a, p, n


class RandomMiner(Miner):
    """For each anchor with a positive and a negative: one of each, uniformly at random."""

    def __init__(
        self, distance: Distance | None = None, generator: torch.Generator | None = None
    ) -> None:
        super().__init__(distance)
        self.generator = generator

    def mine(self, embeddings, labels):
        pos, neg = label_masks(labels)
        b = len(labels)
        scores = torch.rand(b, b, device=labels.device, generator=self.generator)
        p = scores.masked_fill(~pos, -1.0).argmax(1)
        n = scores.masked_fill(~neg, -1.0).argmax(1)
        a = torch.nonzero(pos.any(1) & neg.any(1)).flatten()
        return a, p[a], n[a]
