"""Multi-similarity loss (Wang et al. 2019)."""

from __future__ import annotations

from dmlrun.distances import Distance
from dmlrun.losses.base import LossOutput, MetricLoss, masked_logsumexp, pair_masks


class MultiSimilarityLoss(MetricLoss):
    """Per anchor i, with similarities S (cosine for ``distance=cosine``):

        1/alpha * log(1 + sum_p exp(-alpha (S_ip - base)))
      + 1/beta  * log(1 + sum_n exp( beta (S_in - base)))

    averaged over the batch. Pairs come from a miner (triplets are split) or are all
    pairs of the batch. Meant for cosine similarity (``base`` is a cosine).
    """

    distances = ("cosine",)

    def __init__(
        self,
        distance: Distance | None = None,
        alpha: float = 2.0,
        beta: float = 50.0,
        base: float = 0.5,
        reduction: str = "mean",
    ) -> None:
        super().__init__(distance, reduction)
        if alpha <= 0 or beta <= 0:
            raise ValueError(f"alpha and beta must be > 0, got {alpha}, {beta}")
        self.alpha, self.beta, self.base = alpha, beta, base

    def _compute(self, embeddings, labels, indices) -> LossOutput:
        sim = self.distance.similarity(embeddings, embeddings)
        pos, neg = pair_masks(labels, indices)
        pos_loss = masked_logsumexp(self.alpha * (self.base - sim), pos, add_one=True)
        neg_loss = masked_logsumexp(self.beta * (sim - self.base), neg, add_one=True)
        losses = pos_loss / self.alpha + neg_loss / self.beta
        return self.reduce(losses, embeddings, tuples=pos.sum() + neg.sum())
