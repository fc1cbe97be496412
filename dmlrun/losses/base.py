"""The loss contract and the shared checks; subclasses write only the math."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from dmlrun.distances import Distance, EuclideanDistance
from dmlrun.tuples import all_pairs, is_pairs, label_masks, triplets_to_pairs

REDUCTIONS = ("sum", "mean", "mean_active")


class LossOutput(NamedTuple):
    """``loss`` scalar; ``tuples`` and ``active`` (non-zero loss) counts as 0-d tensors;
    ``per_tuple``: the mean loss over all tuples whatever the reduction (None: the loss
    has no per-tuple terms), so runs with other reductions or batch sizes compare."""

    loss: torch.Tensor
    tuples: torch.Tensor
    active: torch.Tensor
    per_tuple: torch.Tensor | None = None


class MetricLoss(nn.Module):
    """Base class. ``accepts`` names the index tuples a loss can take from a miner or
    sampler: ``"pairs"`` ``(a1, p, a2, n)`` and/or ``"triplets"`` ``(a, p, n)``."""

    accepts: tuple[str, ...] = ("pairs", "triplets")
    # Names of the distances the loss's formula is meant for; empty = any.
    distances: tuple[str, ...] = ()
    # Hyper-parameters measured in distance units; a value past the distance's range
    # (cosine: 2) can never be met and is refused.
    distance_params: tuple[str, ...] = ()
    # Learning rate for the loss's own parameters (proxies, beta); None = the optimizer's.
    param_lr: float | None = None

    def __init__(self, distance: Distance | None = None, reduction: str = "mean") -> None:
        super().__init__()
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        self.distance = distance if distance is not None else EuclideanDistance()
        self.reduction = reduction

    def forward(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        indices: tuple[torch.Tensor, ...] | None = None,
    ) -> torch.Tensor:
        return self.compute(embeddings, labels, indices).loss

    def compute(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        indices: tuple[torch.Tensor, ...] | None = None,
    ) -> LossOutput:
        """Loss and tuple counts for (B, D) embeddings and (B,) labels."""
        self._check(embeddings, labels, indices)
        return self._compute(embeddings, labels, indices)

    def _compute(self, embeddings, labels, indices) -> LossOutput:
        raise NotImplementedError

    def epoch_warnings(self, record: dict, first_neg_distance: float) -> list[str]:
        """Warnings this loss reads from an epoch's record (``metrics.jsonl`` fields);
        ``first_neg_distance`` is the mean different-class distance of the run's first
        step. The run logs each one."""
        return []

    def plot_margin(self) -> float | None:
        """The distance different-class pairs are pushed beyond, for the distance histograms:
        the ``margin`` (or ``neg_margin``) this loss declares, else None."""
        for name in ("margin", "neg_margin"):
            if name in self.distance_params:
                return float(getattr(self, name))
        return None

    def _check(self, embeddings, labels, indices) -> None:
        if embeddings.ndim != 2 or labels.ndim != 1 or len(embeddings) != len(labels):
            raise ValueError(
                f"expected embeddings (B, D) and labels (B,), got {tuple(embeddings.shape)} "
                f"and {tuple(labels.shape)}"
            )
        if indices is not None:
            kind = "pairs" if is_pairs(indices) else "triplets"
            if kind not in self.accepts:
                if not self.accepts:
                    raise ValueError(f"{type(self).__name__} uses the whole batch and takes "
                                     "no mined tuples")
                raise ValueError(f"{type(self).__name__} accepts {self.accepts}, got {kind}")

    @staticmethod
    def empty(anchor: torch.Tensor) -> LossOutput:
        """A zero loss (still connected to ``anchor``'s graph) with no tuples."""
        zero = torch.tensor(0, device=anchor.device)
        return LossOutput(anchor.sum() * 0.0, zero, zero)

    def reduce(
        self,
        losses: torch.Tensor,
        anchor: torch.Tensor,
        tuples: torch.Tensor | None = None,
        active: torch.Tensor | None = None,
    ) -> LossOutput:
        """Reduce per-tuple losses (T,). ``anchor`` is any tensor of the graph, used to
        return a zero that still connects to it when there are no tuples. ``tuples`` and
        ``active`` default to the count of losses and of non-zero losses."""
        if active is None:
            active = (losses > 0).sum()
        if tuples is None:
            tuples = torch.tensor(losses.numel(), device=losses.device)
        if losses.numel() == 0:
            zero = anchor.sum() * 0.0
            return LossOutput(zero, tuples, active, zero.detach())
        if self.reduction == "sum":
            loss = losses.sum()
        elif self.reduction == "mean":
            loss = losses.mean()
        else:
            loss = losses.sum() / active.clamp_min(1)
        return LossOutput(loss, tuples, active, losses.detach().mean())


class PairLoss(MetricLoss):
    """A loss on positive and negative pairs. Triplets are split into their two pairs;
    with no indices every pair of the batch is used."""

    def pair_losses(
        self, pos_dist: torch.Tensor, neg_dist: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(P,) positive-pair and (N,) negative-pair distances -> per-pair losses."""
        raise NotImplementedError

    def _compute(self, embeddings, labels, indices) -> LossOutput:
        if indices is None:
            indices = all_pairs(labels)
        elif not is_pairs(indices):
            indices = triplets_to_pairs(indices)
        a1, p, a2, n = indices
        dist = self.distance.pairwise(embeddings, embeddings)
        pos_loss, neg_loss = self.pair_losses(dist[a1, p], dist[a2, n])
        return self.reduce(torch.cat([pos_loss, neg_loss]), embeddings)


class TripletFamilyLoss(MetricLoss):
    """A loss that is a function of each triplet's anchor-positive and anchor-negative
    distances. Subclasses write ``triplet_losses``; mined triplets are indexed, and with no
    indices every valid triplet of the batch is used, computed densely on the (B, B, B)
    grid (no index lists)."""

    accepts = ("triplets",)

    def triplet_losses(self, d_ap: torch.Tensor, d_an: torch.Tensor) -> torch.Tensor:
        """Per-triplet losses from anchor-positive and anchor-negative distances (any
        matching shapes)."""
        raise NotImplementedError

    def _compute(self, embeddings, labels, indices) -> LossOutput:
        dist = self.distance.pairwise(embeddings, embeddings)
        if indices is None:
            pos, neg = label_masks(labels)
            valid = pos[:, :, None] & neg[:, None, :]
            grid = self.triplet_losses(dist[:, :, None], dist[:, None, :])
            return self.reduce(grid[valid], embeddings)
        a, p, n = indices
        return self.reduce(self.triplet_losses(dist[a, p], dist[a, n]), embeddings)


def pair_masks(
    labels: torch.Tensor, indices: tuple[torch.Tensor, ...] | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, B) boolean masks of the positive and negative pairs to use: every ordered pair
    of the batch without indices, else the (directed) pairs given, triplets split in two."""
    if indices is None:
        return label_masks(labels)
    a1, p, a2, n = indices if is_pairs(indices) else triplets_to_pairs(indices)
    b = len(labels)
    pos = torch.zeros(b, b, dtype=torch.bool, device=labels.device)
    neg = torch.zeros_like(pos)
    pos[a1, p] = True
    neg[a2, n] = True
    return pos, neg


def masked_logsumexp(
    x: torch.Tensor, mask: torch.Tensor, dim: int = 1, add_one: bool = False
) -> torch.Tensor:
    """log(sum over ``mask`` of exp(x)) along ``dim`` (plus exp(0) = 1 when ``add_one``);
    0 where the mask is empty along ``dim``."""
    x = x.masked_fill(~mask, float("-inf"))
    if add_one:
        x = torch.cat([x, torch.zeros_like(x.narrow(dim, 0, 1))], dim=dim)
    out = torch.logsumexp(x, dim=dim)
    return out.masked_fill(~mask.any(dim), 0.0)
