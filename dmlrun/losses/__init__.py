"""Metric losses. All share one contract: ``loss(embeddings (B, D), labels (B,),
indices=None) -> scalar``; ``loss.compute(...)`` also returns tuple counts.

Adding a loss: subclass ``MetricLoss`` (or ``PairLoss`` for a per-pair formula,
``TripletFamilyLoss`` for a per-triplet formula, ``ProxyLoss`` for class proxies), write
``_compute`` (or ``pair_losses`` / ``triplet_losses``), set ``accepts`` (the tuples it can
take from a miner) and ``distances`` (the distances its formula is meant for), then add
``configs/loss/<name>.yaml`` with its ``_target_`` and an experiment recipe.
"""

from dmlrun.losses.base import LossOutput, MetricLoss, PairLoss, TripletFamilyLoss
from dmlrun.losses.combined import WithAuxiliaryLoss
from dmlrun.losses.contrastive import ContrastiveLoss
from dmlrun.losses.lifted import LiftedStructureLoss
from dmlrun.losses.lmnn import LMNNLoss
from dmlrun.losses.margin import MarginLoss
from dmlrun.losses.margin_softmax import ArcFaceLoss, CosFaceLoss
from dmlrun.losses.multi_similarity import MultiSimilarityLoss
from dmlrun.losses.npairs import NPairsLoss
from dmlrun.losses.proxy import ProxyAnchorLoss, ProxyLoss, ProxyNCALoss
from dmlrun.losses.supcon import NTXentLoss, SupConLoss
from dmlrun.losses.triplet import TripletLoss

__all__ = [
    "ArcFaceLoss", "ContrastiveLoss", "CosFaceLoss", "LMNNLoss", "LiftedStructureLoss",
    "LossOutput", "MarginLoss", "MetricLoss", "MultiSimilarityLoss", "NPairsLoss",
    "NTXentLoss", "PairLoss", "ProxyAnchorLoss", "ProxyLoss", "ProxyNCALoss", "SupConLoss",
    "TripletFamilyLoss", "TripletLoss", "WithAuxiliaryLoss",
]
