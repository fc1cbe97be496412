"""Proxy-based losses: one learned vector per class stands in for the class, so each
sample is compared with C proxies instead of B - 1 batch members. ProxyNCA
(Movshovitz-Attias et al. 2017) and Proxy-Anchor (Kim et al. 2020)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dmlrun.distances import CosineDistance, Distance, SquaredEuclideanDistance
from dmlrun.losses.base import LossOutput, MetricLoss


class ProxyLoss(MetricLoss):
    """Base class: (C, D) proxies as a parameter, trained with ``param_lr`` (their own
    learning rate). Proxy losses use every sample of the batch and take no miner."""

    accepts = ()

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        distance: Distance | None = None,
        param_lr: float | None = None,
        reduction: str = "mean",
    ) -> None:
        super().__init__(distance, reduction)
        if num_classes < 2 or embedding_size < 1:
            raise ValueError(f"need num_classes >= 2 and embedding_size >= 1, got "
                             f"{num_classes}, {embedding_size}")
        self.num_classes = num_classes
        self.param_lr = param_lr
        self.proxies = nn.Parameter(torch.empty(num_classes, embedding_size))
        self.reset_proxies()

    def reset_proxies(self) -> None:
        nn.init.normal_(self.proxies)

    def _check(self, embeddings, labels, indices) -> None:
        super()._check(embeddings, labels, indices)
        if embeddings.shape[1] != self.proxies.shape[1]:
            raise ValueError(f"embeddings have {embeddings.shape[1]} dimensions, proxies "
                             f"{self.proxies.shape[1]}")

    def one_hot(self, labels: torch.Tensor) -> torch.Tensor:
        """(B,) labels -> (B, C) boolean; labels must lie in [0, num_classes)."""
        return F.one_hot(labels, self.num_classes).bool()


class ProxyNCALoss(ProxyLoss):
    """Per sample x with class c: -log softmax_c(-scale * D(x, proxies)), the NCA loss
    against proxies. The default distance is squared Euclidean on L2-normalised
    embeddings and proxies."""

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        distance: Distance | None = None,
        softmax_scale: float = 1.0,
        param_lr: float | None = None,
    ) -> None:
        distance = distance if distance is not None else SquaredEuclideanDistance(True)
        super().__init__(num_classes, embedding_size, distance, param_lr)
        self.softmax_scale = softmax_scale

    def _compute(self, embeddings, labels, indices) -> LossOutput:
        logits = -self.softmax_scale * self.distance.pairwise(embeddings, self.proxies)
        losses = F.cross_entropy(logits, labels, reduction="none")
        return self.reduce(losses, embeddings)


class ProxyAnchorLoss(ProxyLoss):
    """With cosine similarities S(x, proxy_c), margin m and scale alpha:

        1/|C+| sum_{c in C+} log(1 + sum_{x in class c} exp(-alpha (S(x, c) - m)))
      + 1/C    sum_c        log(1 + sum_{x not in c}  exp( alpha (S(x, c) + m)))

    where C+ are the classes present in the batch. Proxies start Kaiming-normal."""

    distances = ("cosine",)

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        distance: Distance | None = None,
        margin: float = 0.1,
        alpha: float = 32.0,
        param_lr: float | None = None,
    ) -> None:
        distance = distance if distance is not None else CosineDistance()
        super().__init__(num_classes, embedding_size, distance, param_lr)
        self.margin, self.alpha = margin, alpha

    def reset_proxies(self) -> None:
        nn.init.kaiming_normal_(self.proxies, mode="fan_out")

    def _compute(self, embeddings, labels, indices) -> LossOutput:
        sim = self.distance.similarity(embeddings, self.proxies)  # (B, C)
        pos = self.one_hot(labels)
        zeros = torch.zeros_like(sim[:1])

        def log1p_sum_exp(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            x = torch.cat([x.masked_fill(~mask, float("-inf")), zeros])
            return torch.logsumexp(x, dim=0).masked_fill(~mask.any(0), 0.0)

        pos_term = log1p_sum_exp(self.alpha * (self.margin - sim), pos)
        neg_term = log1p_sum_exp(self.alpha * (sim + self.margin), ~pos)
        with_pos = pos.any(0).sum()
        loss = pos_term.sum() / with_pos.clamp_min(1) + neg_term.sum() / self.num_classes
        n = torch.tensor(sim.numel(), device=sim.device)
        return LossOutput(loss, n, n)
