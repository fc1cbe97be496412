"""Semi-supervised DML: pseudo-labels for unlabeled training images from the embedding.

Two methods behind one contract, ``method(emb (N, D), labeled (L,) indices, labels (L,),
num_classes) -> PseudoLabels``:

- ``KMeansPseudoLabeler``: k-means on all embeddings (k = ``clusters_per_class`` x classes);
  each cluster takes the majority label of the labeled points in it (or, with none, the
  label of the labeled point nearest its centre). Confidence is closeness to the centre;
  optionally only points whose labeled-kNN vote agrees are kept.
- ``LabelPropagation``: labels spread over the symmetric kNN graph of the embedding
  (Zhou et al. 2004, "Learning with local and global consistency"): F <- a S F + (1 - a) Y
  with S = D^-1/2 W D^-1/2. Confidence is the normalised score of the winning class.

Each keeps the ``keep_fraction`` most confident unlabeled points per pseudo-class.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from dmlrun.clustering import kmeans
from dmlrun.data.samplers import Epoch, PKSampler
from dmlrun.distances import EuclideanDistance

GRAPH_SPACES = ("embedding", "pixels", "auto")


class PseudoLabels(NamedTuple):
    """``labels`` (N,) pseudo-label of every point (labeled points keep their own);
    ``keep`` (N,) bool: unlabeled points confident enough to train on."""

    labels: torch.Tensor
    keep: torch.Tensor


def pick_labeled(labels: torch.Tensor, per_class: int, seed: int) -> torch.Tensor:
    """Sorted indices of ``per_class`` random items of every class (seeded)."""
    g = torch.Generator().manual_seed(seed)
    labels = labels.cpu()
    picked = []
    for c in torch.unique(labels).tolist():
        members = torch.nonzero(labels == c).flatten()
        if len(members) < per_class:
            raise ValueError(f"class {c} has {len(members)} images, fewer than "
                             f"labeled_per_class={per_class}")
        picked.append(members[torch.randperm(len(members), generator=g)[:per_class]])
    return torch.cat(picked).sort().values


def knn_indices(x: torch.Tensor, ref: torch.Tensor, k: int, exclude_self: bool,
                chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, k) distances and indices of each row's k nearest rows of ``ref`` (Euclidean)."""
    dist = EuclideanDistance()
    ds, ids = [], []
    for s in range(0, len(x), chunk):
        d = dist.pairwise(x[s : s + chunk], ref)
        if exclude_self:
            rows = torch.arange(s, min(s + chunk, len(x)), device=x.device)
            d[rows - s, rows] = float("inf")
        top = d.topk(k, dim=1, largest=False)
        ds.append(top.values)
        ids.append(top.indices)
    return torch.cat(ds), torch.cat(ids)


def keep_most_confident(pseudo: torch.Tensor, confidence: torch.Tensor,
                        candidates: torch.Tensor, fraction: float) -> torch.Tensor:
    """(N,) bool: among ``candidates``, the top ``fraction`` by confidence within each
    pseudo-class."""
    keep = torch.zeros_like(candidates)
    for c in torch.unique(pseudo[candidates]).tolist():
        members = torch.nonzero(candidates & (pseudo == c)).flatten()
        n = int(round(fraction * len(members)))
        if n:
            keep[members[confidence[members].topk(n).indices]] = True
    return keep


class KMeansPseudoLabeler:
    """Pseudo-labels from k-means clusters of the embedding, named via labeled points."""

    def __init__(self, clusters_per_class: int = 1, keep_fraction: float = 0.5,
                 knn_agreement: int = 0, seed: int = 0) -> None:
        if clusters_per_class < 1 or not 0 < keep_fraction <= 1 or knn_agreement < 0:
            raise ValueError("need clusters_per_class >= 1, 0 < keep_fraction <= 1, "
                             "knn_agreement >= 0")
        self.clusters_per_class, self.keep_fraction = clusters_per_class, keep_fraction
        self.knn_agreement, self.seed = knn_agreement, seed

    def __call__(self, emb: torch.Tensor, labeled: torch.Tensor, labels: torch.Tensor,
                 num_classes: int) -> PseudoLabels:
        n = len(emb)
        k = self.clusters_per_class * num_classes
        cluster = kmeans(emb, k, seed=self.seed)
        centres = torch.zeros(k, emb.shape[1], device=emb.device).index_add_(0, cluster, emb)
        centres /= torch.bincount(cluster, minlength=k).clamp_min(1)[:, None].float()
        # majority label of the labeled points in each cluster
        votes = torch.zeros(k, num_classes, device=emb.device)
        votes.index_put_((cluster[labeled], labels), torch.ones(len(labeled),
                                                              device=emb.device),
                         accumulate=True)
        _, nearest = knn_indices(centres, emb[labeled], 1, exclude_self=False)
        name = torch.where(votes.sum(1) > 0, votes.argmax(1), labels[nearest[:, 0]])
        pseudo = name[cluster]
        confidence = -(emb - centres[cluster]).norm(dim=1)
        candidates = torch.ones(n, dtype=torch.bool, device=emb.device)
        candidates[labeled] = False
        if self.knn_agreement:
            _, nn_idx = knn_indices(emb, emb[labeled], min(self.knn_agreement, len(labeled)),
                                    exclude_self=False)
            vote = torch.zeros(n, num_classes, device=emb.device).scatter_add_(
                1, labels[nn_idx], torch.ones_like(nn_idx, dtype=torch.float))
            candidates &= vote.argmax(1) == pseudo
        pseudo[labeled] = labels
        return PseudoLabels(pseudo, keep_most_confident(pseudo, confidence, candidates,
                                                        self.keep_fraction))


class LabelPropagation:
    """Labels spread over the kNN graph of the embedding (manifold assumption)."""

    def __init__(self, k: int = 10, alpha: float = 0.99, iterations: int = 20,
                 keep_fraction: float = 0.5) -> None:
        if k < 1 or not 0 < alpha < 1 or iterations < 1 or not 0 < keep_fraction <= 1:
            raise ValueError("need k >= 1, 0 < alpha < 1, iterations >= 1, "
                             "0 < keep_fraction <= 1")
        self.k, self.alpha, self.iterations, self.keep_fraction = k, alpha, iterations, \
            keep_fraction

    def __call__(self, emb: torch.Tensor, labeled: torch.Tensor, labels: torch.Tensor,
                 num_classes: int) -> PseudoLabels:
        n = len(emb)
        d, nbr = knn_indices(emb, emb, min(self.k, n - 1), exclude_self=True)
        sigma2 = d.pow(2).mean().clamp_min(1e-12)
        w = torch.exp(-d.pow(2) / sigma2)
        rows = torch.arange(n, device=emb.device).repeat_interleave(nbr.shape[1])
        idx = torch.stack([torch.cat([rows, nbr.flatten()]), torch.cat([nbr.flatten(), rows])])
        graph = torch.sparse_coo_tensor(idx, torch.cat([w.flatten(), w.flatten()]), (n, n),
                                        check_invariants=False).coalesce()  # W + W^T
        deg = torch.zeros(n, device=emb.device).index_add_(0, graph.indices()[0],
                                                            graph.values())
        scale = deg.clamp_min(1e-12).rsqrt()
        i, j = graph.indices()
        s = torch.sparse_coo_tensor(graph.indices(), graph.values() * scale[i] * scale[j],
                                    (n, n), check_invariants=False)
        y = torch.zeros(n, num_classes, device=emb.device)
        y[labeled, labels] = 1.0
        f = y.clone()
        for _ in range(self.iterations):
            f = self.alpha * torch.sparse.mm(s, f) + (1 - self.alpha) * y
        score = f / f.sum(1, keepdim=True).clamp_min(1e-12)
        confidence, pseudo = score.max(1)
        pseudo[labeled] = labels
        candidates = f.sum(1) > 0  # reached by the propagation
        candidates[labeled] = False
        return PseudoLabels(pseudo, keep_most_confident(pseudo, confidence, candidates,
                                                        self.keep_fraction))


def pseudo_label_quality(pseudo: PseudoLabels, truth: torch.Tensor,
                         labeled: torch.Tensor) -> dict[str, float]:
    """Accuracy of the pseudo-labels against the hidden labels: over all unlabeled points
    and over the kept ones, and the fraction kept."""
    unlabeled = torch.ones_like(pseudo.keep)
    unlabeled[labeled] = False
    right = pseudo.labels == truth
    kept = pseudo.keep
    return {
        "pseudo_accuracy": right[unlabeled].float().mean().item(),
        "pseudo_kept_fraction": kept[unlabeled].float().mean().item(),
        "pseudo_kept_accuracy": right[kept].float().mean().item() if kept.any() else 0.0,
    }


class SemiSupervision:
    """The labeled subset, the current pseudo-labels and each epoch's batches.

    ``labels`` is the training label vector the loop reads: true labels of the labeled
    images, pseudo-labels elsewhere (updated in place at each refresh). Every step has a
    P x K batch of labeled images (``sampler``) and, once pseudo-labels exist, a second
    batch drawn by pseudo-class from labeled + kept images (``Epoch.extra``).
    """

    def __init__(self, truth: torch.Tensor, labeled: torch.Tensor, num_classes: int,
                 sampler, method=None, warmup_epochs: int = 2, refresh_every: int = 2,
                 p: int = 10, k: int = 25, graph: str = "embedding",
                 pixel_val_p1: float = float("nan")) -> None:
        if warmup_epochs < 0 or refresh_every < 1:
            raise ValueError("need semi.warmup_epochs >= 0 and semi.refresh_every >= 1")
        if graph not in GRAPH_SPACES:
            raise ValueError(f"semi.graph must be one of {GRAPH_SPACES}, got {graph!r}")
        # Where pseudo-labels come from: raw pixels, the model's features, or ("auto")
        # pixels until the model's validation P@1 beats raw pixels' (pixel_val_p1).
        self.graph, self.pixel_val_p1 = graph, pixel_val_p1
        self.space = "pixels" if graph in ("pixels", "auto") else "embedding"
        self._from_pixels: PseudoLabels | None = None  # pixels do not change: computed once
        self.truth, self.labeled = truth, labeled.to(truth.device)
        self.labels = truth.clone()
        self.num_classes, self.sampler, self.method = num_classes, sampler, method
        self.warmup, self.refresh_every = warmup_epochs, refresh_every
        self.extra_sampler = PKSampler(p, k)
        self.keep: torch.Tensor | None = None
        self.epoch_no = 0
        self.quality: dict[str, float] = {}

    def state_dict(self) -> dict:
        """What a checkpoint keeps to continue: the current labels (pseudo-labels where
        unlabeled), which pseudo-labels are kept, the epoch count."""
        return {"labels": self.labels.cpu(),
                "keep": None if self.keep is None else self.keep.cpu(),
                "epoch_no": self.epoch_no, "space": self.space}

    def load_state_dict(self, state: dict) -> None:
        self.labels.copy_(state["labels"].to(self.labels.device))
        self.keep = None if state["keep"] is None else state["keep"].to(self.labels.device)
        self.epoch_no = int(state["epoch_no"])
        self.space = state.get("space", self.space)

    def _pseudo_labels(self, features) -> PseudoLabels:
        if self.space == "pixels" and self._from_pixels is not None:
            return self._from_pixels
        pseudo = self.method(features(self.space), self.labeled, self.truth[self.labeled],
                             self.num_classes)
        if self.space == "pixels":
            self._from_pixels = pseudo
        return pseudo

    def observe(self, val_p1: float) -> str | None:
        """After an epoch: with ``graph="auto"``, switch the pseudo-labels' graph from raw
        pixels to the model's features once its validation P@1 beats raw pixels'.
        Returns a message when it switches."""
        if self.graph != "auto" or self.space == "embedding" or not val_p1 > self.pixel_val_p1:
            return None
        self.space = "embedding"
        return (f"pseudo-labels now from the learned features: validation P@1 {val_p1:.4f} "
                f"beats raw pixels' {self.pixel_val_p1:.4f}")

    def refresh_due(self) -> bool:
        e = self.epoch_no
        return self.method is not None and e > self.warmup and \
            (e - self.warmup - 1) % self.refresh_every == 0

    def next_epoch(self, features, g: torch.Generator, main: bool = True,
                   share=lambda value: value):
        """Draw the next epoch; ``features(space)`` gives (N, F) features of every training
        image in ``space`` ("pixels" or "embedding") and is called only when pseudo-labels
        are refreshed, by the ``main`` process; ``share`` hands its pseudo-labels to every
        process (several processes: a broadcast from rank 0), so all draw the same
        epoch."""
        self.epoch_no += 1
        self.quality = {}
        if self.refresh_due():
            pseudo = self._pseudo_labels(features) if main else None
            pseudo = share(None if pseudo is None else
                           PseudoLabels(pseudo.labels.cpu(), pseudo.keep.cpu()))
            device = self.labels.device
            pseudo = PseudoLabels(pseudo.labels.to(device), pseudo.keep.to(device))
            self.labels.copy_(pseudo.labels)
            self.keep = pseudo.keep
            self.quality = {**pseudo_label_quality(pseudo, self.truth, self.labeled),
                            "pseudo_from_pixels": float(self.space == "pixels")}
        lab = self.sampler.epoch(self.truth[self.labeled], g)
        indices = self.labeled[lab.indices]
        extra = None
        if self.keep is not None:
            pool = torch.cat([self.labeled, torch.nonzero(self.keep).flatten()])
            self.extra_sampler.batches_per_epoch = len(indices)
            extra = pool[self.extra_sampler.epoch(self.labels[pool], g).indices]
        return Epoch(indices, None, extra)
