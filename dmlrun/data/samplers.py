"""Batch samplers. Each draws a whole epoch of batch indices at once, vectorised.

- ``PKSampler``: class-balanced batches (P classes x K samples) for online mining.
- ``PairSampler`` / ``TripletSampler``: the classic offline modes, where each batch
  carries fixed pairs or triplets (the same within-batch layout every step).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from dmlrun.errors import ConfigError

Tuples = tuple[torch.Tensor, ...]


@dataclass
class Epoch:
    """``indices`` (num_batches, batch_size) into the split; ``tuples`` the fixed
    within-batch pairs ``(a1, p, a2, n)`` or triplets ``(a, p, n)``, or None for
    online mining. ``extra`` (num_batches, batch_size2): an optional second batch per step,
    a task's (e.g. images it labelled itself), its loss weighted by
    ``StepConfig.extra_weight``. ``views`` (num_batches, batch_size3): optional images per
    step seen in two augmented views, each other's only positive (no labels needed;
    ``StepConfig.views``)."""

    indices: torch.Tensor
    tuples: Tuples | None = None
    extra: torch.Tensor | None = None
    views: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.indices.shape[0]


class _ClassIndex:
    """Indices of a label vector grouped by class, for vectorised class-wise draws."""

    def __init__(self, labels: torch.Tensor) -> None:
        labels = labels.cpu()
        self.classes, self.inverse, self.counts = torch.unique(
            labels, return_inverse=True, return_counts=True
        )
        self.order = torch.argsort(self.inverse, stable=True)  # indices sorted by class
        self.starts = torch.cumsum(self.counts, 0) - self.counts

    def random_member(
        self, cls: torch.Tensor, g: torch.Generator, avoid: torch.Tensor | None = None
    ) -> torch.Tensor:
        """One random index of each class position in ``cls``; not equal to ``avoid``
        where the class has another member."""
        count = self.counts[cls]
        offset = (torch.rand(len(cls), generator=g) * count).long().clamp_max(count - 1)
        pick = self.order[self.starts[cls] + offset]
        if avoid is not None:
            clash = (pick == avoid) & (count > 1)
            shifted = (offset + 1) % count
            pick = torch.where(clash, self.order[self.starts[cls] + shifted], pick)
        return pick


def _num_batches(n_items: int, batch_size: int, batches_per_epoch: int | None) -> int:
    nb = batches_per_epoch if batches_per_epoch is not None else n_items // batch_size
    return max(1, int(nb))


class PKSampler:
    """P classes x K samples per batch. Within a class, items are drawn without
    replacement until the class is used up, then from a fresh permutation."""

    yields: str | None = None  # online: a miner or the loss forms the tuples

    def __init__(self, p: int, k: int, batches_per_epoch: int | None = None) -> None:
        if p < 2 or k < 2:
            raise ConfigError(
                f"sampler needs p >= 2 classes and k >= 2 samples per class to form "
                f"positives and negatives; got p={p}, k={k}"
            )
        self.p, self.k, self.batches_per_epoch = int(p), int(k), batches_per_epoch

    @property
    def batch_size(self) -> int:
        return self.p * self.k

    def check(self, num_classes: int) -> None:
        if self.p > num_classes:
            raise ConfigError(
                f"sampler.p={self.p} asks for more classes per batch than the dataset "
                f"has ({num_classes}); use sampler.p<={num_classes}"
            )

    def epoch(self, labels: torch.Tensor, g: torch.Generator) -> Epoch:
        ci = _ClassIndex(labels)
        n_cls = len(ci.classes)
        self.check(n_cls)
        nb = _num_batches(len(labels), self.batch_size, self.batches_per_epoch)
        slots = torch.rand(nb, n_cls, generator=g).argsort(dim=1)[:, : self.p].flatten()
        # rank of each slot among the slots of the same class, in draw order
        order = torch.argsort(slots, stable=True)
        uses = torch.bincount(slots, minlength=n_cls)
        rank = torch.empty_like(slots)
        rank[order] = torch.arange(len(slots)) - (torch.cumsum(uses, 0) - uses)[slots[order]]
        # per class, uses*K indices cut from fresh random permutations; a batch's K items
        # never straddle two permutations, so they repeat only if the class has < K items
        pools = []
        for c in range(n_cls):
            members = ci.order[ci.starts[c] : ci.starts[c] + ci.counts[c]]
            per_perm = max(len(members) // self.k, 1)
            need = int(uses[c])
            chunks = []
            while need > 0:
                perm = members[torch.randperm(len(members), generator=g)]
                if len(perm) < self.k:
                    perm = perm.repeat(math.ceil(self.k / len(perm)))
                take = min(per_perm, need)
                chunks.append(perm[: take * self.k])
                need -= take
            pools.append(torch.cat(chunks) if chunks else members[:0])
        pool = torch.cat(pools)
        pool_start = torch.cumsum(uses * self.k, 0) - uses * self.k
        first = pool_start[slots] + rank * self.k
        idx = pool[first[:, None] + torch.arange(self.k)]
        return Epoch(idx.view(nb, self.batch_size).to(labels.device))


class _OfflineSampler:
    """Shared part of the offline samplers: ``n`` anchors per batch, each with partners
    drawn per class. Subclasses set ``yields``, ``members`` (images per anchor) and
    write ``layout``."""

    yields = ""
    members = 1

    def __init__(self, n: int, batches_per_epoch: int | None) -> None:
        if n < 1:
            raise ConfigError(f"sampler={self.yields} needs >= 1 {self.yields} per batch, got {n}")
        self.n = int(n)
        self.batches_per_epoch = batches_per_epoch

    @property
    def batch_size(self) -> int:
        return self.members * self.n

    def check(self, num_classes: int) -> None:
        if num_classes < 2:
            raise ConfigError(f"sampler={self.yields} needs at least 2 classes")

    def epoch(self, labels: torch.Tensor, g: torch.Generator) -> Epoch:
        ci = _ClassIndex(labels)
        self.check(len(ci.classes))
        nb = _num_batches(len(labels), self.batch_size, self.batches_per_epoch)
        anchors = _draw_anchors(len(labels), nb * self.n, g)
        columns, tuples = self.layout(ci, anchors, g)
        idx = torch.stack([c.view(nb, self.n) for c in columns], 1).view(nb, -1)
        return Epoch(idx.to(labels.device), tuple(t.to(labels.device) for t in tuples))

    def layout(
        self, ci: _ClassIndex, anchors: torch.Tensor, g: torch.Generator
    ) -> tuple[list[torch.Tensor], Tuples]:
        """(columns of the batch, each like ``anchors``; within-batch tuples)."""
        raise NotImplementedError

    @staticmethod
    def other_class(ci: _ClassIndex, cls: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """A uniformly random class other than each of ``cls``."""
        n_cls = len(ci.classes)
        return (cls + torch.randint(1, n_cls, cls.shape, generator=g)) % n_cls


class PairSampler(_OfflineSampler):
    """Offline Siamese pairs: each batch holds ``pairs_per_batch`` anchors and one
    partner each, a ``positive_fraction`` of them from the anchor's class.

    Batch layout: ``[anchors (n) | partners (n)]``; tuples ``(a1, p, a2, n)``.
    """

    yields = "pairs"
    members = 2

    def __init__(
        self, pairs_per_batch: int, positive_fraction: float = 0.5,
        batches_per_epoch: int | None = None,
    ) -> None:
        super().__init__(pairs_per_batch, batches_per_epoch)
        if not 0.0 <= positive_fraction <= 1.0:
            raise ConfigError(f"positive_fraction must be in [0, 1], got {positive_fraction}")
        self.n_pos = round(self.n * positive_fraction)

    def layout(self, ci, anchors, g):
        a_cls = ci.inverse[anchors]
        positive = (torch.arange(len(anchors)) % self.n) < self.n_pos
        p_cls = torch.where(positive, a_cls, self.other_class(ci, a_cls, g))
        partners = ci.random_member(p_cls, g, avoid=anchors)
        n, n_pos, r = self.n, self.n_pos, torch.arange(self.n)
        return [anchors, partners], (r[:n_pos], n + r[:n_pos], r[n_pos:], n + r[n_pos:])


class TripletSampler(_OfflineSampler):
    """Offline random triplets: anchor, a positive of its class, a negative of another.

    Batch layout: ``[anchors (n) | positives (n) | negatives (n)]``; tuples ``(a, p, n)``.
    """

    yields = "triplets"
    members = 3

    def __init__(self, triplets_per_batch: int, batches_per_epoch: int | None = None) -> None:
        super().__init__(triplets_per_batch, batches_per_epoch)

    def layout(self, ci, anchors, g):
        a_cls = ci.inverse[anchors]
        pos = ci.random_member(a_cls, g, avoid=anchors)
        neg = ci.random_member(self.other_class(ci, a_cls, g), g)
        r = torch.arange(self.n)
        return [anchors, pos, neg], (r, self.n + r, 2 * self.n + r)


def _draw_anchors(n_items: int, count: int, g: torch.Generator) -> torch.Tensor:
    """``count`` indices in [0, n_items): a random permutation, repeated if needed."""
    reps = math.ceil(count / n_items)
    return torch.cat([torch.randperm(n_items, generator=g) for _ in range(reps)])[:count]
