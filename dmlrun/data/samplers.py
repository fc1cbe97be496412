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
    online mining."""

    indices: torch.Tensor
    tuples: Tuples | None = None

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


class PairSampler:
    """Offline Siamese pairs: each batch holds ``pairs_per_batch`` anchors and one
    partner each, a ``positive_fraction`` of them from the anchor's class.

    Batch layout: ``[anchors (n) | partners (n)]``; tuples ``(a1, p, a2, n)``.
    """

    yields = "pairs"

    def __init__(
        self, pairs_per_batch: int, positive_fraction: float = 0.5,
        batches_per_epoch: int | None = None,
    ) -> None:
        if pairs_per_batch < 1 or not 0.0 <= positive_fraction <= 1.0:
            raise ConfigError(
                "sampler=pairs needs pairs_per_batch >= 1 and positive_fraction in [0, 1]; "
                f"got {pairs_per_batch}, {positive_fraction}"
            )
        self.n = int(pairs_per_batch)
        self.n_pos = round(self.n * positive_fraction)
        self.batches_per_epoch = batches_per_epoch

    @property
    def batch_size(self) -> int:
        return 2 * self.n

    def check(self, num_classes: int) -> None:
        if num_classes < 2:
            raise ConfigError("sampler=pairs needs at least 2 classes")

    def epoch(self, labels: torch.Tensor, g: torch.Generator) -> Epoch:
        ci = _ClassIndex(labels)
        n_cls = len(ci.classes)
        self.check(n_cls)
        nb = _num_batches(len(labels), self.batch_size, self.batches_per_epoch)
        anchors = _draw_anchors(len(labels), nb * self.n, g).view(nb, self.n)
        a_cls = ci.inverse[anchors]
        positive = torch.zeros(nb, self.n, dtype=torch.bool)
        positive[:, : self.n_pos] = True
        other = (a_cls + torch.randint(1, n_cls, a_cls.shape, generator=g)) % n_cls
        p_cls = torch.where(positive, a_cls, other)
        partners = ci.random_member(p_cls.flatten(), g, avoid=anchors.flatten()).view(nb, -1)
        n, n_pos = self.n, self.n_pos
        r = torch.arange(n)
        tuples = (r[:n_pos], n + r[:n_pos], r[n_pos:], n + r[n_pos:])
        dev = labels.device
        return Epoch(
            torch.cat([anchors, partners], 1).to(dev), tuple(t.to(dev) for t in tuples)
        )


class TripletSampler:
    """Offline random triplets: anchor, a positive of its class, a negative of another.

    Batch layout: ``[anchors (n) | positives (n) | negatives (n)]``; tuples ``(a, p, n)``.
    """

    yields = "triplets"

    def __init__(self, triplets_per_batch: int, batches_per_epoch: int | None = None) -> None:
        if triplets_per_batch < 1:
            raise ConfigError(f"triplets_per_batch must be >= 1, got {triplets_per_batch}")
        self.n = int(triplets_per_batch)
        self.batches_per_epoch = batches_per_epoch

    @property
    def batch_size(self) -> int:
        return 3 * self.n

    def check(self, num_classes: int) -> None:
        if num_classes < 2:
            raise ConfigError("sampler=triplets needs at least 2 classes")

    def epoch(self, labels: torch.Tensor, g: torch.Generator) -> Epoch:
        ci = _ClassIndex(labels)
        n_cls = len(ci.classes)
        self.check(n_cls)
        nb = _num_batches(len(labels), self.batch_size, self.batches_per_epoch)
        anchors = _draw_anchors(len(labels), nb * self.n, g)
        a_cls = ci.inverse[anchors]
        pos = ci.random_member(a_cls, g, avoid=anchors)
        neg_cls = (a_cls + torch.randint(1, n_cls, a_cls.shape, generator=g)) % n_cls
        neg = ci.random_member(neg_cls, g)
        idx = torch.stack([x.view(nb, self.n) for x in (anchors, pos, neg)], 1).view(nb, -1)
        r = torch.arange(self.n, device=labels.device)
        return Epoch(idx.to(labels.device), (r, self.n + r, 2 * self.n + r))


def _draw_anchors(n_items: int, count: int, g: torch.Generator) -> torch.Tensor:
    """``count`` indices in [0, n_items): a random permutation, repeated if needed."""
    reps = math.ceil(count / n_items)
    return torch.cat([torch.randperm(n_items, generator=g) for _ in range(reps)])[:count]
