"""Softmax losses over pairs of the batch: supervised contrastive (Khosla et al. 2020) and
NT-Xent (Chen et al. 2020, "SimCLR"), with class labels defining the positives."""

from __future__ import annotations

import torch

from dmlrun.distances import Distance
from dmlrun.losses.base import LossOutput, MetricLoss, masked_logsumexp, pair_masks


class _SoftmaxPairLoss(MetricLoss):
    """Shared part: similarities divided by a temperature, on cosine or dot product."""

    distances = ("cosine", "dot")

    def __init__(self, distance: Distance | None, temperature: float, reduction: str) -> None:
        super().__init__(distance, reduction)
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = temperature

    def logits(self, embeddings: torch.Tensor) -> torch.Tensor:
        """(B, D) -> (B, B) similarities / temperature."""
        return self.distance.similarity(embeddings, embeddings) / self.temperature


class SupConLoss(_SoftmaxPairLoss):
    """Per anchor i with positives P(i) and negatives N(i), similarities S / temperature:

        -1/|P(i)| * sum_{p in P(i)} log( exp(S_ip) / sum_{a in P(i) u N(i)} exp(S_ia) )

    averaged over anchors with non-zero loss."""

    def __init__(self, distance: Distance | None = None, temperature: float = 0.1) -> None:
        super().__init__(distance, temperature, "mean_active")

    def _compute(self, embeddings, labels, indices) -> LossOutput:
        logits = self.logits(embeddings)
        pos, neg = pair_masks(labels, indices)
        if not (pos.any() and neg.any()):
            return self.empty(embeddings)
        log_prob = logits - masked_logsumexp(logits, pos | neg)[:, None]
        n_pos = pos.sum(1)
        losses = -(log_prob * pos).sum(1) / n_pos.clamp_min(1)
        return self.reduce(losses, embeddings, tuples=pos.sum() + neg.sum())


class NTXentLoss(_SoftmaxPairLoss):
    """Per positive pair (i, p), against the negatives of i, similarities S / temperature:

        -log( exp(S_ip) / (exp(S_ip) + sum_{n in N(i)} exp(S_in)) )

    averaged over positive pairs."""

    def __init__(self, distance: Distance | None = None, temperature: float = 0.07) -> None:
        super().__init__(distance, temperature, "mean")

    def _compute(self, embeddings, labels, indices) -> LossOutput:
        logits = self.logits(embeddings)
        pos, neg = pair_masks(labels, indices)
        a, p = torch.nonzero(pos, as_tuple=True)
        if len(a) == 0 or not neg.any():
            return self.empty(embeddings)
        neg_lse = masked_logsumexp(logits, neg).masked_fill(~neg.any(1), float("-inf"))
        pos_logit = logits[a, p]
        losses = torch.logaddexp(pos_logit, neg_lse[a]) - pos_logit
        return self.reduce(losses, embeddings, tuples=pos.sum() + neg.sum())
