"""Metric losses. All share one contract: ``loss(embeddings (B, D), labels (B,),
indices=None) -> scalar``; ``loss.compute(...)`` also returns tuple counts.

Adding a loss: subclass ``PairLoss`` or ``TripletLoss``-style ``MetricLoss``, write the
math, add ``configs/loss/<name>.yaml`` with its ``_target_``.
"""

from dmlrun.losses.base import LossOutput, MetricLoss, PairLoss
from dmlrun.losses.contrastive import ContrastiveLoss
from dmlrun.losses.triplet import TripletLoss

__all__ = ["ContrastiveLoss", "LossOutput", "MetricLoss", "PairLoss", "TripletLoss"]
