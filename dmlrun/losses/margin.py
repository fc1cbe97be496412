"""Margin loss with a learnable boundary beta (Wu et al. 2017, "Sampling matters")."""

from __future__ import annotations

import torch
from torch import nn

from dmlrun.distances import Distance
from dmlrun.losses.base import LossOutput, MetricLoss
from dmlrun.tuples import all_triplets


class MarginLoss(MetricLoss):
    """Per triplet (a, p, n):

        max(0, D(a, p) - beta + margin) + max(0, beta - D(a, n) + margin)

    summed and divided by the number of non-zero pair terms. ``beta`` is one boundary,
    or one per class with ``num_classes``; with ``learn_beta`` it is trained (with its own
    ``param_lr``) and ``nu * beta`` is added as a regulariser. Without indices every
    triplet of the batch is used.
    """

    accepts = ("triplets",)
    distance_params = ("margin", "beta_init")

    def __init__(
        self,
        distance: Distance | None = None,
        margin: float = 0.2,
        beta: float = 1.2,
        nu: float = 0.0,
        learn_beta: bool = False,
        num_classes: int | None = None,
        param_lr: float | None = None,
    ) -> None:
        super().__init__(distance, "mean_active")
        if margin < 0:
            raise ValueError(f"margin must be >= 0, got {margin}")
        self.margin, self.nu, self.learn_beta = margin, nu, learn_beta
        self.beta_init = beta
        self.param_lr = param_lr
        init = torch.full((num_classes or 1,), float(beta))
        if learn_beta:
            self.beta = nn.Parameter(init)
        else:
            self.register_buffer("beta", init)

    def plot_margin(self) -> None:
        """None: pairs are pushed around the learned boundary beta, not past one margin."""
        return None

    def _compute(self, embeddings, labels, indices) -> LossOutput:
        a, p, n = all_triplets(labels) if indices is None else indices
        if len(a) == 0:
            zero = embeddings.sum() * 0.0 + self.beta.sum() * 0.0
            return LossOutput(zero, torch.tensor(0, device=labels.device),
                              torch.tensor(0, device=labels.device))
        beta = self.beta if len(self.beta) == 1 else self.beta[labels[a]]
        dist = self.distance.pairwise(embeddings, embeddings)
        pos = (dist[a, p] - beta + self.margin).clamp_min(0.0)
        neg = (beta - dist[a, n] + self.margin).clamp_min(0.0)
        divisor = (pos > 0).sum() + (neg > 0).sum()
        loss = (pos + neg).sum() / divisor.clamp_min(1)
        if self.learn_beta:
            reg = beta * self.nu
            loss = loss + (reg.sum() if len(self.beta) == 1 else reg.sum() / divisor.clamp_min(1))
        active = ((pos + neg) > 0).sum()
        return LossOutput(loss, torch.tensor(len(a), device=labels.device), active)
