"""Contrastive loss (Hadsell, Chopra & LeCun 2006, "DrLIM")."""

from __future__ import annotations

import torch

from dmlrun.distances import Distance
from dmlrun.losses.base import PairLoss


class ContrastiveLoss(PairLoss):
    """Per pair with distance D and same-class indicator s:

        w * s * D^2 + (1 - w) * (1 - s) * max(0, m - D)^2

    with margin ``m`` and positive weight ``w`` (0.5 gives DrLIM's 1/2 factors).
    Note: the DrLIM paper labels *similar* pairs Y = 0 and dissimilar Y = 1; here
    s = 1 means similar. ``reduction="sum"`` (the paper's total over pairs) or
    ``"mean"`` over all pairs, or ``"mean_active"`` over pairs with non-zero loss.
    """

    distance_params = ("margin",)

    def __init__(
        self,
        distance: Distance | None = None,
        margin: float = 1.0,
        pos_weight: float = 0.5,
        reduction: str = "sum",
    ) -> None:
        super().__init__(distance, reduction)
        if margin < 0 or not 0.0 <= pos_weight <= 1.0:
            raise ValueError(
                f"need margin >= 0 and pos_weight in [0, 1], got {margin}, {pos_weight}"
            )
        self.margin = margin
        self.pos_weight = pos_weight

    def pair_losses(
        self, pos_dist: torch.Tensor, neg_dist: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        w = self.pos_weight
        pos = w * pos_dist.pow(2)
        neg = (1.0 - w) * (self.margin - neg_dist).clamp_min(0.0).pow(2)
        return pos, neg
