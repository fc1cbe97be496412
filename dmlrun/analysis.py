"""What a trained embedding gets right and wrong, as numbers the report plots draw:
nearest neighbours of chosen queries, nearest-neighbour class confusion, same- and
different-class distance samples and their overlap. Leave-one-out, in query chunks."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dmlrun.distances import Distance, EuclideanDistance
from dmlrun.search import nearest_neighbours


def nearest(emb: torch.Tensor, queries: torch.Tensor, k: int,
            distance: Distance | None = None, gallery_start: int | None = None
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` nearest other items of each query (indices into ``emb`` (N, D)), leave-one-
    out, or with ``gallery_start`` among the rows from there on (a query/gallery set's
    gallery): (Q, k) indices and (Q, k) distances, nearest first, ties by index (the
    metrics' own search)."""
    if gallery_start is not None:
        idx, dist = nearest_neighbours(emb[queries], emb[gallery_start:], k, distance)
        return idx + gallery_start, dist
    return nearest_neighbours(emb[queries], emb, k, distance, exclude=queries)


def confused_classes(labels: torch.Tensor, nn_labels: torch.Tensor, k: int) -> torch.Tensor:
    """Up to ``k`` class ids (sorted) for a confusion plot of many classes: the classes of
    the most frequent mix-ups (query class, class of its nearest other item), most frequent
    pair first, then the other classes in id order. All classes when there are at most
    ``k``."""
    classes = torch.unique(torch.cat([labels, nn_labels]).long().cpu())
    if len(classes) <= k:
        return classes
    labels, nn_labels = labels.long().cpu(), nn_labels.long().cpu()
    wrong = labels != nn_labels
    base = int(classes[-1]) + 1
    pairs, counts = torch.unique(labels[wrong] * base + nn_labels[wrong], return_counts=True)
    pairs = pairs[torch.argsort(counts, descending=True, stable=True)]  # ties: by pair
    order = torch.cat([torch.stack([pairs // base, pairs % base], 1).flatten(), classes])
    seen = torch.zeros(base, dtype=torch.bool)
    picked = []
    for c in order.tolist():  # stops after k new classes
        if not seen[c]:
            seen[c] = True
            picked.append(c)
            if len(picked) == k:
                break
    return torch.tensor(sorted(picked))


def nn_confusion(labels: torch.Tensor, nn_labels: torch.Tensor, classes: torch.Tensor
                 ) -> torch.Tensor:
    """(K, K + 1) counts over ``classes`` (K class ids): row = class of the query, column =
    class of its nearest other item (``nn_labels``, e.g. ``labels[metrics.per_query(...)
    .nearest]``), the last column every class not in ``classes``. Queries of other classes
    are left out. Never builds a (C, C) table, so any number of classes C is fine."""
    labels, nn_labels, classes = labels.long().cpu(), nn_labels.long().cpu(), classes.long()
    k = len(classes)
    base = max(int(labels.max()), int(nn_labels.max()), int(classes.max())) + 1
    position = torch.full((base,), k, dtype=torch.long)
    position[classes] = torch.arange(k)
    rows = position[labels]
    kept = rows < k
    flat = rows[kept] * (k + 1) + position[nn_labels[kept]]
    return torch.bincount(flat, minlength=k * (k + 1)).view(k, k + 1)


@dataclass
class DistanceSample:
    """Distances of random same-class and different-class pairs, and how much their
    histograms overlap (0: separable by a threshold, 1: indistinguishable)."""

    same: torch.Tensor
    different: torch.Tensor
    overlap: float


@torch.no_grad()
def distance_sample(emb: torch.Tensor, labels: torch.Tensor, distance: Distance | None = None,
                    pairs: int = 20000, seed: int = 0, bins: int = 100) -> DistanceSample:
    """Up to ``pairs`` random pairs of each kind (seeded). The overlap is the sum over
    ``bins`` shared bins of the smaller of the two normalised histograms."""
    distance = distance or EuclideanDistance()
    g = torch.Generator().manual_seed(seed)
    n = len(emb)
    i = torch.randint(n, (8 * pairs,), generator=g).to(emb.device)
    j = torch.randint(n, (8 * pairs,), generator=g).to(emb.device)
    keep = i != j
    i, j = i[keep], j[keep]
    same = labels[i] == labels[j]
    d = distance.paired(emb[i], emb[j])
    d_same, d_diff = d[same][:pairs].cpu(), d[~same][:pairs].cpu()
    return DistanceSample(d_same, d_diff, histogram_overlap(d_same, d_diff, bins))


def histogram_overlap(a: torch.Tensor, b: torch.Tensor, bins: int = 100) -> float:
    """Overlap coefficient of two samples' histograms on shared bins, in [0, 1]."""
    if len(a) == 0 or len(b) == 0:
        return float("nan")
    lo, hi = float(torch.minimum(a.min(), b.min())), float(torch.maximum(a.max(), b.max()))
    if hi <= lo:
        return 1.0
    ha = torch.histc(a.float(), bins, lo, hi) / len(a)
    hb = torch.histc(b.float(), bins, lo, hi) / len(b)
    return float(torch.minimum(ha, hb).sum())


def pick_queries(hits: torch.Tensor, n_right: int, n_wrong: int, seed: int = 0,
                 wrong_first: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Gallery queries: ``n_right`` seeded picks among queries whose nearest neighbour has
    their class (``hits`` (N,) bool), and the ``n_wrong`` worst failures (largest
    ``wrong_first`` score, e.g. how far the first right neighbour is; else seeded)."""
    g = torch.Generator().manual_seed(seed)
    right = torch.nonzero(hits.cpu()).flatten()
    wrong = torch.nonzero(~hits.cpu()).flatten()
    right = right[torch.randperm(len(right), generator=g)[:n_right]]
    if wrong_first is not None:
        wrong = wrong[torch.argsort(wrong_first.cpu()[wrong], descending=True, stable=True)]
    else:
        wrong = wrong[torch.randperm(len(wrong), generator=g)]
    return right, wrong[:n_wrong]


def per_class_metrics(labels: torch.Tensor, hit1: torch.Tensor, ap: torch.Tensor,
                      class_names: list[str] | None = None) -> dict[str, dict[str, float]]:
    """Class name -> P@1, MAP@R and image count, from ``metrics.per_query``'s results."""
    out = {}
    for c in torch.unique(labels).tolist():
        sel = labels == c
        aps = ap[sel]
        name = class_names[c] if class_names is not None and c < len(class_names) else str(c)
        out[str(name)] = {"precision_at_1": float(hit1[sel].double().mean()),
                          "map_at_r": float(aps[~aps.isnan()].mean()) if (~aps.isnan()).any()
                          else float("nan"), "n": int(sel.sum())}
    return out


def worst_classes_first(per_class: dict[str, dict[str, float]]) -> list[str]:
    """The class names of ``per_class_metrics``'s result, lowest P@1 first, then lowest
    MAP@R (classes without one, of a single image, first among equals)."""
    def key(name: str) -> tuple[float, float]:
        m = per_class[name]
        return m["precision_at_1"], m["map_at_r"] if m["map_at_r"] == m["map_at_r"] else -1.0

    return sorted(per_class, key=key)
