"""Embeddings -> retrieval metrics, computed in query chunks so memory stays bounded.

Leave-one-out mode: every item queries all others. Query-vs-reference mode: queries
search a separate reference set.
"""

from __future__ import annotations

import torch
from torch import nn

from dmlrun.clustering import adjusted_mutual_info, kmeans, normalized_mutual_info
from dmlrun.data.dataset import chunks, images_to_float
from dmlrun.distances import CosineDistance, Distance, EuclideanDistance

RECALL_KS = (1, 2, 4, 8)
RETRIEVAL_NAMES = ("precision_at_1", *(f"recall_at_{k}" for k in RECALL_KS), "r_precision",
                   "map_at_r", "knn_accuracy")
METRIC_NAMES = (*RETRIEVAL_NAMES, "nmi", "ami")


@torch.no_grad()
def embed(
    model: nn.Module,
    images: torch.Tensor,
    batch_size: int = 2048,
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
    model: nn.Module, split, batch_size: int = 2048, amp_dtype: torch.dtype | None = None,
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
    ``chunk_size`` queries are searched at once (default: about 16M distances per chunk).
    """
    distance = distance if distance is not None else EuclideanDistance()
    leave_one_out = reference is None
    if leave_one_out:
        reference, reference_labels = queries, query_labels
    assert reference is not None and reference_labels is not None
    if chunk_size is None:
        chunk_size = min(1024, max(16, 2**24 // len(reference)))
    classes, ref_counts = torch.unique(reference_labels, return_counts=True)
    count_of = torch.zeros(int(classes.max()) + 1, dtype=torch.long, device=queries.device)
    count_of[classes] = ref_counts
    q_in_ref = (query_labels >= 0) & (query_labels < len(count_of))
    r_all = torch.where(q_in_ref, count_of[query_labels.clamp(0, len(count_of) - 1)], 0)
    if leave_one_out:
        r_all = r_all - 1
    k_max = max(int(r_all.max()), max(recall_ks), knn_k)
    k_max = min(k_max, len(reference) - (1 if leave_one_out else 0))

    totals = {"precision_at_1": 0.0, "r_precision": 0.0, "map_at_r": 0.0}
    totals.update({f"recall_at_{k}": 0.0 for k in recall_ks})
    totals["knn_accuracy"] = 0.0
    ref_classes, ref_ids = torch.unique(reference_labels, return_inverse=True)
    n_with_r = 0
    ranks = torch.arange(1, k_max + 1, device=queries.device)
    for start in range(0, len(queries), chunk_size):
        q = queries[start : start + chunk_size]
        dist = distance.pairwise(q, reference)
        if leave_one_out:
            rows = torch.arange(len(q), device=q.device)
            dist[rows, rows + start] = float("inf")
        nn_idx = dist.topk(k_max, dim=1, largest=False).indices
        hits = reference_labels[nn_idx] == query_labels[start : start + chunk_size, None]
        r = r_all[start : start + chunk_size]
        totals["precision_at_1"] += hits[:, 0].sum().item()
        votes = torch.zeros(len(q), len(ref_classes), device=q.device)
        votes.scatter_add_(1, ref_ids[nn_idx[:, :knn_k]], torch.ones_like(nn_idx[:, :knn_k],
                                                                         dtype=votes.dtype))
        predicted = ref_classes[votes.argmax(1)]  # argmax takes the first (smallest) on ties
        totals["knn_accuracy"] += (predicted == query_labels[start : start + len(q)]).sum().item()
        for k in recall_ks:
            totals[f"recall_at_{k}"] += hits[:, :k].any(1).sum().item()
        within_r = ranks[None, :] <= r[:, None]
        rel = hits & within_r
        has_r = r > 0
        r_safe = r.clamp_min(1).double()
        totals["r_precision"] += (rel.sum(1).double() / r_safe)[has_r].sum().item()
        prec_at_i = rel.cumsum(1).double() / ranks[None, :]
        ap = (prec_at_i * rel).sum(1) / r_safe
        totals["map_at_r"] += ap[has_r].sum().item()
        n_with_r += int(has_r.sum())
    n = len(queries)
    out = {"precision_at_1": totals["precision_at_1"] / n}
    for k in recall_ks:
        out[f"recall_at_{k}"] = totals[f"recall_at_{k}"] / n
    out["r_precision"] = totals["r_precision"] / max(n_with_r, 1)
    out["map_at_r"] = totals["map_at_r"] / max(n_with_r, 1)
    out["knn_accuracy"] = totals["knn_accuracy"] / n
    return out


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


def evaluate_embeddings(
    embeddings: torch.Tensor, labels: torch.Tensor, distance: Distance | None = None,
    knn_k: int = 5, seed: int = 0,
) -> dict[str, float]:
    """Every metric of METRIC_NAMES, leave-one-out, for (N, D) embeddings. Non-finite
    embeddings (a diverged model) give NaN for every metric."""
    if not torch.isfinite(embeddings).all():
        return dict.fromkeys(METRIC_NAMES, float("nan"))
    out = retrieval_metrics(embeddings, labels, distance=distance, knn_k=knn_k)
    out.update(clustering_metrics(embeddings, labels, distance, seed))
    return out
