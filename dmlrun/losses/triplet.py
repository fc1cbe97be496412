"""Triplet margin loss (Schroff, Kalenichenko & Philbin 2015, "FaceNet")."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dmlrun.distances import Distance
from dmlrun.losses.base import TripletFamilyLoss

INVERTED = ("hinge", "push")
# A triplet loss at its margin is collapsing (not merely early in training) when the
# class distances have also shrunk below this fraction of the first step's.
SHRINK_RATIO = 0.5


class TripletLoss(TripletFamilyLoss):
    """Per triplet ``max(0, D(a, p) - D(a, n) + margin)``.

    ``inverted`` says what a triplet whose negative is closer than its positive
    (D(a, n) < D(a, p)) trains: ``"hinge"``, the plain FaceNet hinge, pulls the positive
    in and pushes the negative away; ``"push"`` only pushes the negative out to the
    margin, ``max(0, margin - D(a, n))``. On inverted triplets the pull is what lets the
    hinge fall by shrinking every embedding towards one point; dropping it follows Xuan
    et al., ECCV 2020 ("Hard negative examples are hard, but useful"), whose push on
    normalised features is bounded by the sphere; here the margin bounds it.

    ``soft=True`` replaces the hinge max(0, x) by softplus(x) = log(1 + exp(x)), the soft
    margin of Hermans et al. 2017 ("In Defense of the Triplet Loss"; margin=0 there): it
    never reaches zero, so every triplet keeps a (shrinking) gradient.

    ``reduction="mean"`` averages over all triplets, ``"mean_active"`` over triplets
    with non-zero loss, ``"sum"`` adds them. With no indices every valid triplet of
    the batch is used (computed densely on the (B, B, B) grid, no index lists).
    """

    distance_params = ("margin",)

    def __init__(
        self,
        distance: Distance | None = None,
        margin: float = 1.0,
        reduction: str = "mean",
        inverted: str = "hinge",
        soft: bool = False,
    ) -> None:
        super().__init__(distance, reduction)
        if margin < 0:
            raise ValueError(f"margin must be >= 0, got {margin}")
        if inverted not in INVERTED:
            raise ValueError(f"inverted must be one of {INVERTED}, got {inverted!r}")
        self.margin = margin
        self.inverted = inverted
        self.soft = soft

    def triplet_losses(self, d_ap: torch.Tensor, d_an: torch.Tensor) -> torch.Tensor:
        hinge = F.softplus if self.soft else torch.relu
        losses = hinge(d_ap - d_an + self.margin)
        if self.inverted == "push":
            return torch.where(d_an < d_ap, hinge(self.margin - d_an), losses)
        return losses

    def epoch_warnings(self, record: dict, first_neg_distance: float) -> list[str]:
        """The collapse of batch-hard (the loss at its margin with every triplet active
        while the distances shrink), and its opposite under ``inverted="push"`` (the loss
        at zero while most triplets are still inverted)."""
        m = self.margin
        inverted = record.get("inverted_fraction", 0.0)
        if m and inverted > 0.5 and record["train_loss"] < 0.01 * m:
            return [f"the loss is near zero while {100 * inverted:.0f}% of the mined triplets "
                    "have their negative closer than their positive: the distances have "
                    "outgrown the margin without ordering the classes (inverted=push does "
                    "this in an unnormalised space); use inverted=hinge"]
        if not (m and record["active_fraction"] > 0.99
                and abs(record["train_loss"] - m) < 0.01 * m
                and record["neg_distance"] < SHRINK_RATIO * first_neg_distance):
            return []
        return [f"the loss is stuck at the margin ({m:.4g}) with every tuple active and the "
                "distances shrinking: the embeddings are collapsing to one point "
                f"({100 * record.get('inverted_fraction', float('nan')):.0f}% of the mined "
                "triplets have their negative closer than their positive). Batch-hard mining "
                "over a whole batch does this from a random start; mine in small, growing "
                "pools (miner.pool_k=2 miner.grow=true, the default of loss=triplet "
                "miner=hard), or use miner=semihard."]
