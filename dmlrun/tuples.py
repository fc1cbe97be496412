"""Index tuples within a batch: pairs ``(a1, p, a2, n)`` and triplets ``(a, p, n)``.

All are LongTensors on the batch device. ``(a1[i], p[i])`` is a positive pair,
``(a2[j], n[j])`` a negative pair; ``(a[i], p[i], n[i])`` a triplet.
"""

from __future__ import annotations

import torch

Pairs = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
Triplets = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def label_masks(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B,) labels -> (B, B) boolean masks of positives (same label, not self) and negatives."""
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    return same & ~eye, ~same


def all_pairs(labels: torch.Tensor) -> Pairs:
    """Every positive and negative pair of the batch, each unordered pair once (i < j)."""
    pos, neg = label_masks(labels)
    upper = torch.ones_like(pos).triu(1)
    a1, p = torch.nonzero(pos & upper, as_tuple=True)
    a2, n = torch.nonzero(neg & upper, as_tuple=True)
    return a1, p, a2, n


def all_triplets(labels: torch.Tensor) -> Triplets:
    """Every (a, p, n) with label[a] == label[p] != label[n] and a != p."""
    pos, neg = label_masks(labels)
    valid = pos[:, :, None] & neg[:, None, :]
    a, p, n = torch.nonzero(valid, as_tuple=True)
    return a, p, n


def is_pairs(indices: tuple[torch.Tensor, ...]) -> bool:
    return len(indices) == 4


def triplets_to_pairs(triplets: Triplets) -> Pairs:
    """Split each triplet into its positive pair (a, p) and negative pair (a, n);
    pairs shared by several triplets are kept once."""
    a, p, n = triplets
    a1, p = _unique_pairs(a, p)
    a2, n = _unique_pairs(a, n)
    return a1, p, a2, n


def _unique_pairs(i: torch.Tensor, j: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if len(i) == 0:
        return i, j
    width = int(torch.maximum(i.max(), j.max())) + 1
    key = torch.unique(i * width + j)
    return key // width, key % width


def num_tuples(indices: tuple[torch.Tensor, ...]) -> int:
    """Pairs count both halves; triplets count once."""
    if is_pairs(indices):
        return len(indices[0]) + len(indices[2])
    return len(indices[0])
