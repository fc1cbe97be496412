"""Softmax losses over pairs of the batch: supervised contrastive (Khosla et al. 2020) and
NT-Xent (Chen et al. 2020, "SimCLR"), with class labels defining the positives."""

from __future__ import annotations

import torch

from dmlrun.distances import Distance
from dmlrun.losses.base import LossOutput, MetricLoss, masked_logsumexp, pair_masks


class SupConLoss(MetricLoss):
    """Per anchor i with positives P(i) and negatives N(i), similarities S / temperature:

        -1/|P(i)| * sum_{p in P(i)} log( exp(S_ip) / sum_{a in P(i) u N(i)} exp(S_ia) )

    averaged over anchors with non-zero loss."""

    distances = ("cosine", "dot")

    def __init__(self, distance: Distance | None = None, temperature: float = 0.1) -> None:
        super().__init__(distance, "mean_active")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = temperature

    def _compute(self, embeddings, labels, indices) -> LossOutput:
        logits = self.distance.similarity(embeddings, embeddings) / self.temperature
        pos, neg = pair_masks(labels, indices)
        if not (pos.any() and neg.any()):
            zero = torch.tensor(0, device=labels.device)
            return LossOutput(embeddings.sum() * 0.0, zero, zero)
        log_prob = logits - masked_logsumexp(logits, pos | neg)[:, None]
        n_pos = pos.sum(1)
        losses = -(log_prob * pos).sum(1) / n_pos.clamp_min(1)
        return self.reduce(losses, embeddings, tuples=pos.sum() + neg.sum())


class NTXentLoss(MetricLoss):
    """Per positive pair (i, p), against the negatives of i, similarities S / temperature:

        -log( exp(S_ip) / (exp(S_ip) + sum_{n in N(i)} exp(S_in)) )

    averaged over positive pairs."""

    distances = ("cosine", "dot")

    def __init__(self, distance: Distance | None = None, temperature: float = 0.07) -> None:
        super().__init__(distance, "mean")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = temperature

    def _compute(self, embeddings, labels, indices) -> LossOutput:
        logits = self.distance.similarity(embeddings, embeddings) / self.temperature
        pos, neg = pair_masks(labels, indices)
        a, p = torch.nonzero(pos, as_tuple=True)
        if len(a) == 0 or not neg.any():
            zero = torch.tensor(0, device=labels.device)
            return LossOutput(embeddings.sum() * 0.0, zero, zero)
        neg_lse = masked_logsumexp(logits, neg).masked_fill(~neg.any(1), float("-inf"))
        pos_logit = logits[a, p]
        losses = torch.logaddexp(pos_logit, neg_lse[a]) - pos_logit
        return self.reduce(losses, embeddings, tuples=pos.sum() + neg.sum())
