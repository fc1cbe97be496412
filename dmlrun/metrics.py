"""Embeddings -> retrieval metrics, computed in query chunks so memory stays bounded.

Leave-one-out mode: every item queries all others. Query-vs-reference mode: queries
search a separate reference set.

Each query needs its first max(R, k) neighbours in order (R for R-precision and MAP@R,
k for P@1, Recall@K and kNN). Per chunk of queries, a threshold read off a sorted sample
of each distance row keeps about 1.1 times that many candidates, and only those are
sorted, by (distance, reference index): the cost of a top-k of the largest class over
every row, without it.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from dmlrun.clustering import adjusted_mutual_info, kmeans, normalized_mutual_info
from dmlrun.data.dataset import chunks, images_to_float
from dmlrun.distances import CosineDistance, Distance, EuclideanDistance
from dmlrun.search import _search, nearest_neighbours  # noqa: F401  (public here too)

RECALL_KS = (1, 2, 4, 8)
RETRIEVAL_NAMES = ("precision_at_1", *(f"recall_at_{k}" for k in RECALL_KS), "r_precision",
                   "map_at_r", "knn_accuracy")
METRIC_NAMES = (*RETRIEVAL_NAMES, "nmi", "ami")
# Images per forward pass when embedding (trainer.eval_batch_size's default): on a CPU
# larger batches are slower, their activations outgrowing the caches.
EVAL_BATCH_SIZE = 256


@torch.no_grad()
def embed(
    model: nn.Module,
    images: torch.Tensor,
    batch_size: int = EVAL_BATCH_SIZE,
    amp_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """(N, C, H, W) uint8 images -> (N, D) float32 embeddings, model in eval mode."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(images), batch_size):
        x = images_to_float(images[start : start + batch_size].to(device, non_blocking=True))
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            out.append(model(x).float())
    model.train(was_training)
    return torch.cat(out)


def embed_split(
    model: nn.Module, split, batch_size: int = EVAL_BATCH_SIZE,
    amp_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """(N, D) float32 embeddings of a split's images (a ``Split`` in memory or a
    ``FileSplit`` read from files), ``batch_size`` at a time, model in eval mode."""
    parts = [embed(model, images, batch_size, amp_dtype)
             for images in split.batches(chunks(len(split), batch_size))]
    return torch.cat(parts) if parts else torch.zeros(0, 0)


@torch.no_grad()
def retrieval_metrics(
    queries: torch.Tensor,
    query_labels: torch.Tensor,
    reference: torch.Tensor | None = None,
    reference_labels: torch.Tensor | None = None,
    distance: Distance | None = None,
    recall_ks: tuple[int, ...] = RECALL_KS,
    knn_k: int = 5,
    chunk_size: int | None = None,
) -> dict[str, float]:
    """Precision@1, Recall@K, R-precision, MAP@R and kNN accuracy for (N, D) queries.

    With no reference, leave-one-out: each query searches all other queries.
    R for a query is the number of references of its class (itself excluded);
    queries with R = 0 are left out of the R-based metrics. kNN accuracy is the
    majority label of the ``knn_k`` nearest references (ties: the smallest label).
    Neighbours are ranked by distance, equal distances by reference index.
    ``chunk_size`` queries are searched at once (default: about 16M distances per chunk).
    """
    distance = distance if distance is not None else EuclideanDistance()
    leave_one_out = reference is None
    if leave_one_out:
        reference, reference_labels = queries, query_labels
    assert reference is not None and reference_labels is not None
    if chunk_size is None:
        chunk_size = min(1024, max(16, 2**24 // len(reference)))
    ref_classes, ref_ids = torch.unique(reference_labels, return_inverse=True)
    query_ids, r_all = _query_classes(query_labels, ref_classes, ref_ids, leave_one_out)
    ref_ids, query_ids = ref_ids.int(), query_ids.int()  # int32: faster lookups
    k_small = min(max(*recall_ks, knn_k), len(reference) - int(leave_one_out))
    k_all = r_all.clamp_min(k_small)  # how many leading neighbours each query needs, in order
    sums = dict.fromkeys((*RETRIEVAL_NAMES, *(f"recall_at_{k}" for k in recall_ks)), 0.0)
    for start, stop, nn_idx, _ in _search(queries, reference, distance, k_all,
                                          leave_one_out, chunk_size):
        _accumulate(sums, nn_idx, ref_ids, query_ids[start:stop], r_all[start:stop], k_small,
                    len(ref_classes), recall_ks, knn_k)
    n, n_with_r = len(queries), max(int((r_all > 0).sum()), 1)
    out = {"precision_at_1": sums["precision_at_1"] / n}
    out.update({f"recall_at_{k}": sums[f"recall_at_{k}"] / n for k in recall_ks})
    out["r_precision"] = sums["r_precision"] / n_with_r
    out["map_at_r"] = sums["map_at_r"] / n_with_r
    out["knn_accuracy"] = sums["knn_accuracy"] / n
    return out


class PerQuery(NamedTuple):
    """Results of each of N queries: ``hit1`` (N,) bool, the nearest other item has its
    class; ``ap`` (N,) float64 AP@R (NaN where the class has no other item); ``nearest``
    (N,) its nearest other item (a row of the whole split). The means of hit1 and of ap
    (NaN left out) are exactly ``retrieval_metrics``' P@1 and MAP@R: the same search, the
    same order."""

    hit1: torch.Tensor
    ap: torch.Tensor
    nearest: torch.Tensor


@torch.no_grad()
def per_query(embeddings: torch.Tensor, labels: torch.Tensor,
              distance: Distance | None = None, query_count: int | None = None) -> PerQuery:
    """``PerQuery`` of every item of (N, D) embeddings, leave-one-out; with
    ``query_count`` (a query/gallery test set, as In-Shop's), of the first
    ``query_count`` rows only, each searching the rows after them (the gallery), as
    ``evaluate_embeddings`` grades them."""
    distance = distance if distance is not None else EuclideanDistance()
    q = len(embeddings) if query_count is None else int(query_count)
    loo = query_count is None
    reference, reference_labels = (embeddings, labels) if loo else (embeddings[q:], labels[q:])
    classes, ref_ids = torch.unique(reference_labels, return_inverse=True)
    query_ids, r = _query_classes(labels[:q], classes, ref_ids, leave_one_out=loo)
    chunk_size = min(1024, max(16, 2**24 // len(reference)))
    hit1, ap, nearest = [], [], []
    for start, stop, nn_idx, _ in _search(embeddings[:q], reference, distance,
                                          r.clamp_min(1), loo, chunk_size):
        rq = r[start:stop]
        width = max(int(rq.max()), 1)
        ranks = torch.arange(1, width + 1, device=nn_idx.device)
        hits = ref_ids[nn_idx[:, :width]] == query_ids[start:stop, None]
        rel = hits & (ranks[None, :] <= rq[:, None])
        precision = rel.cumsum(1, dtype=torch.int32) / ranks.double()[None, :]
        ap.append(torch.where(rq > 0, torch.where(rel, precision, 0.0).sum(1)
                              / rq.clamp_min(1).double(), float("nan")))
        hit1.append(hits[:, 0])
        nearest.append(nn_idx[:, 0] + (0 if loo else q))
    return PerQuery(torch.cat(hit1), torch.cat(ap), torch.cat(nearest))


def _query_classes(
    query_labels: torch.Tensor, ref_classes: torch.Tensor, ref_ids: torch.Tensor,
    leave_one_out: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(Q,) labels -> (Q,) index into ref_classes (-1 where absent) and (Q,) R."""
    counts = torch.bincount(ref_ids, minlength=len(ref_classes))
    pos = torch.searchsorted(ref_classes, query_labels).clamp_max(len(ref_classes) - 1)
    present = ref_classes[pos] == query_labels
    r = torch.where(present, counts[pos] - int(leave_one_out), 0)
    return torch.where(present, pos, -1), r


def _accumulate(
    sums: dict[str, float], nn_idx: torch.Tensor, ref_ids: torch.Tensor,
    query_ids: torch.Tensor, r: torch.Tensor, k_small: int, n_classes: int,
    recall_ks: tuple[int, ...], knn_k: int,
) -> None:
    """Adds one chunk's metric sums. nn_idx (B, K): reference columns, nearest first, valid
    up to max(r[b], k_small) in row b; r (B,) the R of each query."""
    nn_ids = ref_ids.index_select(0, nn_idx.view(-1)).view(nn_idx.shape)
    hits = nn_ids == query_ids[:, None]
    sums["precision_at_1"] += hits[:, 0].sum().item()
    for kr in recall_ks:
        sums[f"recall_at_{kr}"] += hits[:, : min(kr, k_small)].any(1).sum().item()
    knn_ids = nn_ids[:, : min(knn_k, k_small)].long()
    votes = torch.zeros(len(nn_idx), n_classes, device=nn_idx.device)
    votes.scatter_add_(1, knn_ids, torch.ones_like(knn_ids, dtype=votes.dtype))
    predicted = votes.argmax(1)  # argmax takes the first (smallest) on ties
    sums["knn_accuracy"] += (predicted == query_ids).sum().item()
    r_max = int(r.max())
    if r_max == 0:
        return
    ranks = torch.arange(1, r_max + 1, device=nn_idx.device)
    rel = hits[:, :r_max] & (ranks[None, :] <= r[:, None])
    n_rel = rel.cumsum(1, dtype=torch.int32)
    has_r = r > 0
    r_safe = r.clamp_min(1).double()
    sums["r_precision"] += (n_rel[:, -1].double() / r_safe)[has_r].sum().item()
    # AP@R: the precision at each relevant rank, summed, over R
    ap = torch.where(rel, n_rel / ranks.double()[None, :], 0.0).sum(1) / r_safe
    sums["map_at_r"] += ap[has_r].sum().item()


@torch.no_grad()
def clustering_metrics(
    embeddings: torch.Tensor, labels: torch.Tensor, distance: Distance | None = None,
    seed: int = 0,
) -> dict[str, float]:
    """NMI and AMI between the labels and k-means (k = number of classes present).
    For cosine distance the points are L2-normalised first."""
    x = embeddings.float()
    if isinstance(distance, CosineDistance) or getattr(distance, "normalize", False):
        x = torch.nn.functional.normalize(x, dim=1)
    k = len(torch.unique(labels))
    clusters = kmeans(x, k, seed=seed)
    return {"nmi": normalized_mutual_info(clusters, labels),
            "ami": adjusted_mutual_info(clusters, labels)}


def metric_names(recall_ks: tuple[int, ...] = RECALL_KS) -> tuple[str, ...]:
    """The metrics ``evaluate_embeddings`` gives with these Recall@K, in display order."""
    return ("precision_at_1", *(f"recall_at_{k}" for k in recall_ks), "r_precision",
            "map_at_r", "knn_accuracy", "nmi", "ami")


def display_order(names: set[str] | list[str]) -> list[str]:
    """Metric names in display order (Recall@K by K), unknown names last."""
    def rank(name: str) -> tuple[int, int]:
        if name.startswith("recall_at_") and name[10:].isdigit():
            return 1, int(name[10:])
        known = metric_names(())
        return (0 if name == "precision_at_1" else 2 + known.index(name)
                if name in known else 99), 0
    return sorted(names, key=rank)


def evaluate_embeddings(
    embeddings: torch.Tensor, labels: torch.Tensor, distance: Distance | None = None,
    knn_k: int = 5, seed: int = 0, query_count: int | None = None,
    recall_ks: tuple[int, ...] = RECALL_KS, clustering: bool = True,
) -> dict[str, float]:
    """Every metric of ``metric_names(recall_ks)`` for (N, D) embeddings: leave-one-out,
    or with ``query_count`` the first ``query_count`` rows as queries against the rest (a
    gallery); clustering (NMI, AMI; without ``clustering``, none) on all rows. Non-finite
    embeddings (a diverged model) give NaN for every metric."""
    if not torch.isfinite(embeddings).all():
        names = metric_names(recall_ks)
        return dict.fromkeys(names if clustering else names[:-2], float("nan"))
    if query_count is None:
        out = retrieval_metrics(embeddings, labels, distance=distance, knn_k=knn_k,
                                recall_ks=recall_ks)
    else:
        q = int(query_count)
        out = retrieval_metrics(embeddings[:q], labels[:q], embeddings[q:], labels[q:],
                                distance=distance, knn_k=knn_k, recall_ks=recall_ks)
    if clustering:
        out.update(clustering_metrics(embeddings, labels, distance, seed))
    return out


DISTANCES = {"euclidean": EuclideanDistance, "cosine": CosineDistance}


def evaluate(
    query: torch.Tensor, query_labels: torch.Tensor, reference: torch.Tensor | None = None,
    reference_labels: torch.Tensor | None = None, distance: Distance | str = "euclidean",
    knn_k: int = 5, clustering: bool = True, seed: int = 0,
) -> dict[str, float]:
    """Retrieval metrics of (Q, D) ``query`` embeddings against (N, D) ``reference``
    embeddings (as pytorch-metric-learning's ``AccuracyCalculator.get_accuracy``), exact:
    P@1, Recall@1/2/4/8, R-precision, MAP@R, kNN accuracy; R counts a query's class in the
    reference. Without a reference, leave-one-out on the queries. With ``clustering``, NMI
    and AMI of k-means on the queries. ``distance``: a ``Distance`` (e.g. a trained run's,
    ``load_embedder(run).distance``), "euclidean" or "cosine"."""
    if isinstance(distance, str):
        if distance not in DISTANCES:
            raise ValueError(f"distance must be a Distance or one of {sorted(DISTANCES)}, "
                             f"got {distance!r}")
        distance = DISTANCES[distance]()
    if (reference is None) != (reference_labels is None):
        raise ValueError("give reference and reference_labels together, or neither")
    if query.ndim != 2 or len(query) != len(query_labels):
        raise ValueError(f"expected query (Q, D) and query_labels (Q,), got "
                         f"{tuple(query.shape)} and {tuple(query_labels.shape)}")
    out = retrieval_metrics(query.float(), query_labels, None if reference is None else
                            reference.float(), reference_labels, distance, knn_k=knn_k)
    if clustering:
        out.update(clustering_metrics(query.float(), query_labels, distance, seed))
    return out
