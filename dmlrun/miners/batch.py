"""Triplet miners that search the whole batch with (B, B) masks, no Python loops."""

from __future__ import annotations

import torch

from dmlrun.distances import Distance
from dmlrun.miners.base import Miner
from dmlrun.tuples import label_masks


class HardMiner(Miner):
    """For each anchor with a positive and a negative in its mining pool: its closest
    negative and its farthest positive (``positive="hardest"``: batch-hard, Hermans et
    al. 2017) or its closest positive (``positive="easiest"``: easy-positive hard-negative,
    Xuan et al. 2020). Pair losses use each triplet's two pairs.

    Mining pools: the first ``pool_k`` images of every class in the batch form one pool,
    the next ``pool_k`` the next, and so on; an anchor's positive and negative come from
    its own pool (``pool_k=None``: the whole batch is one pool). A P x K batch with
    ``pool_k=2`` is K / 2 batch-hard problems of P x 2 images, the small pool Hermans et
    al. start from on hard data, computed in one large batch.

    ``grow=True`` (with ``pool_k`` set) starts each step from pools of ``pool_k`` and
    takes the largest of ``pool_k``, ``2 pool_k``, ``4 pool_k``, ... and the whole batch
    in which at most ``max_inverted`` of the anchors' hardest negatives are closer than
    their hardest positive. Batch-hard from a random start, with nearly every triplet
    inverted, lets the triplet loss fall to its margin by shrinking all embeddings to
    one point; small pools avoid that, and the pools grow as the embedding learns.
    """

    def __init__(
        self,
        distance: Distance | None = None,
        positive: str = "hardest",
        pool_k: int | None = None,
        grow: bool = False,
        max_inverted: float = 0.5,
    ) -> None:
        super().__init__(distance)
        if positive not in ("hardest", "easiest"):
            raise ValueError(f"positive must be 'hardest' or 'easiest', got {positive!r}")
        if pool_k is not None and pool_k < 2:
            raise ValueError(f"pool_k must be >= 2 (a pool needs a positive pair), got {pool_k}")
        if not 0.0 <= max_inverted <= 1.0:
            raise ValueError(f"max_inverted must be in [0, 1], got {max_inverted}")
        self.positive = positive
        self.pool_k = pool_k
        self.grow = grow
        self.max_inverted = max_inverted

    def mine(self, embeddings, labels):
        dist = self.distance.pairwise(embeddings, embeddings)
        pos, neg = label_masks(labels)
        if self.pool_k is None:
            pos, neg = pos[None], neg[None]
        else:  # one (B, B) slice per pool size tried: pool_k, then doubling with grow
            rank = class_rank(labels)
            # every size from the largest class's count up pools the whole batch alike: on
            # the CPU, where reading that count costs nothing, the doubling stops there
            # (same picks); elsewhere it runs to the batch size, without a host sync
            cover = int(rank.max()) + 1 if labels.device.type == "cpu" and len(labels) \
                else len(labels)
            sizes = [self.pool_k]
            while self.grow and sizes[-1] < cover:  # the last one covers the batch
                sizes.append(2 * sizes[-1])
            pool = rank[None] // torch.tensor(sizes, device=labels.device)[:, None]
            same_pool = pool[:, :, None] == pool[:, None, :]
            pos, neg = pos & same_pool, neg & same_pool
        p, n, ok = self._pick(dist, pos, neg)  # (S, B) each
        pick = 0
        if len(p) > 1:
            # the largest size in the unbroken run of sizes at most max_inverted inverted,
            # chosen on the device (no host sync); the first size is always taken
            rows = torch.arange(len(labels), device=labels.device)
            inverted = ((dist[rows, n] < dist[rows, p]) & ok).sum(1) / ok.sum(1).clamp_min(1)
            fits = inverted <= self.max_inverted
            fits[0] = True
            pick = fits.long().cumprod(0).sum() - 1
        p, n, ok = p[pick], n[pick], ok[pick]
        a = torch.nonzero(ok).flatten()
        return a, p[a], n[a]

    def __repr__(self) -> str:
        pools = (f", pool_k={self.pool_k}, grow={self.grow}, max_inverted={self.max_inverted}"
                 if self.pool_k is not None else "")
        return f"HardMiner(positive={self.positive!r}{pools})"

    def _pick(self, dist, pos, neg):
        """(..., B) positive and negative picked for each anchor under (..., B, B) masks,
        and which anchors have both."""
        if self.positive == "hardest":
            pick_pos = dist.masked_fill(~pos, float("-inf")).argmax(-1)
        else:
            pick_pos = dist.masked_fill(~pos, float("inf")).argmin(-1)
        hardest_neg = dist.masked_fill(~neg, float("inf")).argmin(-1)
        return pick_pos, hardest_neg, pos.any(-1) & neg.any(-1)


def class_rank(labels: torch.Tensor) -> torch.Tensor:
    """(B,) position of each item among the batch's items of its class (0, 1, ...)."""
    same = labels[:, None] == labels[None, :]
    return (same & torch.ones_like(same).tril(-1)).sum(1)


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
