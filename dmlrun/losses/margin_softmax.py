"""Additive-margin softmax losses on the cosine between embeddings and class weights:
CosFace (Wang et al. 2018) and ArcFace (Deng et al. 2019)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from dmlrun.distances import CosineDistance, Distance
from dmlrun.losses.base import LossOutput
from dmlrun.losses.proxy import ProxyLoss


class MarginSoftmaxLoss(ProxyLoss):
    """Cross-entropy over ``scale * cos(x, w_c)``, with the target class's cosine
    replaced by ``target_logit``. Class weights are the proxies."""

    distances = ("cosine",)

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        distance: Distance | None = None,
        margin: float = 0.35,
        scale: float = 64.0,
        param_lr: float | None = None,
    ) -> None:
        super().__init__(num_classes, embedding_size, distance or CosineDistance(), param_lr)
        self.margin, self.scale = margin, scale

    def target_logit(self, cos: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _compute(self, embeddings, labels, indices) -> LossOutput:
        cos = F.normalize(embeddings, dim=1) @ F.normalize(self.proxies, dim=1).T  # (B, C)
        target = self.one_hot(labels)
        cos_target = cos[target]
        logits = cos + target * (self.target_logit(cos_target) - cos_target)[:, None]
        losses = F.cross_entropy(self.scale * logits, labels, reduction="none")
        return self.reduce(losses, embeddings)


class CosFaceLoss(MarginSoftmaxLoss):
    """Target logit cos(theta) - margin."""

    def target_logit(self, cos: torch.Tensor) -> torch.Tensor:
        return cos - self.margin


class ArcFaceLoss(MarginSoftmaxLoss):
    """Target logit cos(theta + margin), ``margin`` in degrees (28.6 deg = 0.5 rad); past
    theta = 180 deg - margin it continues as cos(theta) - margin * sin(margin) so that it
    keeps decreasing."""

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        distance: Distance | None = None,
        margin: float = 28.6,
        scale: float = 64.0,
        param_lr: float | None = None,
    ) -> None:
        super().__init__(num_classes, embedding_size, distance, margin, scale, param_lr)
        self.margin_rad = math.radians(margin)

    def target_logit(self, cos: torch.Tensor) -> torch.Tensor:
        m = self.margin_rad
        theta = torch.acos(cos.clamp(-1.0 + 1e-7, 1.0 - 1e-7))  # finite gradient at +-1
        return torch.where(theta <= math.pi - m, torch.cos(theta + m),
                           cos - m * math.sin(m))
