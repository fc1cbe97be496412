"""Distance-weighted sampling (Wu et al. 2017, "Sampling matters in deep embedding
learning")."""

from __future__ import annotations

import math

import torch

from dmlrun.distances import Distance, EuclideanDistance
from dmlrun.miners.base import Miner
from dmlrun.tuples import label_masks


class DistanceWeightedMiner(Miner):
    """For every (anchor, positive) pair, one negative drawn with probability proportional
    to the inverse of the density of distances between points on the unit sphere in
    D dimensions, q(d) ~ d^(D-2) (1 - d^2/4)^((D-3)/2): negatives are spread over all
    distances instead of crowding at sqrt(2). Distances are clipped below at ``cutoff``
    (variance), and negatives at or beyond ``nonzero_loss_cutoff`` get weight 0 (they
    would give no loss). Needs Euclidean distance on L2-normalised embeddings."""

    def __init__(
        self,
        distance: Distance | None = None,
        cutoff: float = 0.5,
        nonzero_loss_cutoff: float = 1.4,
        generator: torch.Generator | None = None,
    ) -> None:
        distance = distance if distance is not None else EuclideanDistance(normalize=True)
        if type(distance) is not EuclideanDistance or not distance.normalize:
            raise ValueError("distance-weighted sampling needs Euclidean distance on "
                             "L2-normalised embeddings (distance=euclidean "
                             "distance.normalize=true)")
        super().__init__(distance)
        if not 0 < cutoff < nonzero_loss_cutoff:
            raise ValueError(f"need 0 < cutoff < nonzero_loss_cutoff, got {cutoff}, "
                             f"{nonzero_loss_cutoff}")
        self.cutoff, self.nonzero_loss_cutoff = cutoff, nonzero_loss_cutoff
        self.generator = generator

    def weights(self, dist: torch.Tensor, labels: torch.Tensor, dim: int) -> torch.Tensor:
        """(B, B) distances of ``dim``-dimensional embeddings -> (B, B) sampling weights
        of negatives per anchor row (rows sum to 1, or are 0 where no negative qualifies)."""
        d = dist.clamp_min(self.cutoff)
        log_w = (2.0 - dim) * torch.log(d) - ((dim - 3.0) / 2.0) * torch.log(1.0 - 0.25 * d * d)
        _, neg = label_masks(labels)
        bad = ~torch.isfinite(log_w)
        log_w = log_w.masked_fill(~neg, 0.0)
        finite = log_w[~bad]
        top = finite.max() if finite.numel() else torch.zeros((), device=dist.device)
        w = torch.exp(log_w - top) * neg * (dist < self.nonzero_loss_cutoff)
        w = w.masked_fill(bad, 0.0)
        total = w.sum(1, keepdim=True)
        return torch.where(total > 0, w / total.clamp_min(math.ulp(0.0)), w)

    def mine(self, embeddings, labels):
        dist = self.distance.pairwise(embeddings, embeddings)
        w = self.weights(dist, labels, embeddings.shape[1])
        pos, _ = label_masks(labels)
        a, p = torch.nonzero(pos & (w.sum(1) > 0)[:, None], as_tuple=True)
        if len(a) == 0:
            return a, p, p.clone()
        n = torch.multinomial(w[a], 1, replacement=True, generator=self.generator).flatten()
        return a, p, n
