"""Semi-supervised DML: pseudo-labels for unlabeled training images, from raw pixels or
the model's features, and the batches that train on them.

Two methods behind one contract, ``method(features (N, F), labeled (L,) indices, labels
(L,), num_classes) -> PseudoLabels``:

- ``KMeansPseudoLabeler``: k-means on all embeddings (k = ``clusters_per_class`` x classes);
  each cluster takes the majority label of the labeled points in it (or, with none, the
  label of the labeled point nearest its centre). Confidence is closeness to the centre;
  optionally only points whose labeled-kNN vote agrees are kept.
- ``LabelPropagation``: labels spread over the symmetric kNN graph of the features' PCA
  coordinates (Zhou et al. 2004, "Learning with local and global consistency"):
  F <- a S F + (1 - a) Y with S = D^-1/2 W D^-1/2, class-balanced scores; confidence is
  the normalised score of the winning class, optionally turned into sampling weights.

Each keeps the ``keep_fraction`` most confident unlabeled points per pseudo-class.
``SemiSupervision`` decides when pseudo-labels are refreshed and from which space, and
draws each epoch's batches.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from dmlrun.clustering import kmeans
from dmlrun.data.samplers import Epoch, PKSampler

GRAPH_SPACES = ("embedding", "pixels", "auto", "teachers")
# spaces whose features do not change during a run: their pseudo-labels are computed once
FIXED_SPACES = ("pixels", "teachers")
FEATURE_LAYERS = ("output", "penultimate", "auto")
# with semi.features=auto, embeddings narrower than this give way to the layer before
MIN_GRAPH_DIM = 16


class PseudoLabels(NamedTuple):
    """``labels`` (N,) pseudo-label of every point (labeled points keep their own);
    ``keep`` (N,) bool: unlabeled points confident enough to train on; ``weight`` (N,)
    optional confidence in [0, 1]: how often a kept point is drawn, relative to the
    others of its pseudo-class (labeled points 1; None = all alike)."""

    labels: torch.Tensor
    keep: torch.Tensor
    weight: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> PseudoLabels:
        return PseudoLabels(self.labels.to(device), self.keep.to(device),
                            None if self.weight is None else self.weight.to(device))


def feature_layer(choice: str, embedding_dim: int) -> str:
    """Which layer's features the pseudo-label graph is built on: ``choice`` as given, or
    for "auto" the output unless it is narrower than ``MIN_GRAPH_DIM`` (a 2-D embedding
    packs classes too tightly for a kNN graph)."""
    if choice not in FEATURE_LAYERS:
        raise ValueError(f"semi.features must be one of {FEATURE_LAYERS}, got {choice!r}")
    if choice == "auto":
        return "output" if embedding_dim >= MIN_GRAPH_DIM else "penultimate"
    return choice


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
                chunk: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, k) Euclidean distances and indices of each row's k nearest rows of ``ref``.

    Rows are ranked by |r|^2 - 2 x.r (one matrix product per chunk; |x|^2 is the same
    along a row), and only the k winners get their square root. Every chunk's product is
    written into one reused buffer: a fresh (chunk, len(ref)) tensor per chunk (hundreds
    of MB) costs more in page faults than the product itself."""
    ref_sq = ref.pow(2).sum(1)
    ds, ids = [], []
    buffer = torch.empty(min(chunk, len(x)), len(ref), device=x.device, dtype=ref_sq.dtype)
    for s in range(0, len(x), chunk):
        part = x[s : s + chunk]
        d = torch.addmm(ref_sq, part, ref.T, alpha=-2, out=buffer[: len(part)])
        if exclude_self:
            rows = torch.arange(s, s + len(part), device=x.device)
            d[rows - s, rows] = float("inf")
        values, columns = smallest_in_rows(d, k)
        ds.append((values + part.pow(2).sum(1, keepdim=True)).clamp_min(0).sqrt())
        ids.append(columns)
    return torch.cat(ds), torch.cat(ids)


def smallest_in_rows(d: torch.Tensor, k: int, block: int = 128
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, M) -> (B, k) each row's k smallest values, ascending, and their columns: the
    same as ``d.topk(k, dim=1, largest=False)``, in about half of its time on a CPU
    (where topk over the (2048, 60,100) chunks of a kNN graph was half of its cost).

    A row's k + 1 smallest lie in the k + 1 blocks of ``block`` columns with the smallest
    minima (those blocks hold k + 1 values no larger than their largest minimum), so
    topk runs on the minima and then on those blocks' values. Rows with equal values
    among their k + 1 smallest, where topk's pick among equals is its own, or a NaN
    (which hides its block's minimum), take topk over the whole row."""
    rows, width = d.shape
    full = width // block
    minima = d[:, : full * block].view(rows, full, block).amin(2)
    if width > full * block:
        minima = torch.cat([minima, d[:, full * block :].amin(1, keepdim=True)], 1)
    if minima.shape[1] <= k + 1:
        top = d.topk(k, dim=1, largest=False)
        return top.values, top.indices
    blocks = minima.topk(k + 1, dim=1, largest=False).indices
    columns = (blocks[:, :, None] * block + torch.arange(block, device=d.device)).view(rows, -1)
    outside = columns >= width  # past the end of the last, shorter block
    values = d.gather(1, columns.clamp_max(width - 1)).masked_fill_(outside, float("inf"))
    top = values.topk(k + 1, dim=1, largest=False)
    values, columns = top.values[:, :k].contiguous(), columns.gather(1, top.indices[:, :k])
    # a NaN hides its block's minimum (amin returns NaN): those rows too take the topk
    tied = torch.nonzero((top.values[:, 1:] == top.values[:, :-1]).any(1)
                         | minima.isnan().any(1)).flatten()
    if len(tied):
        exact = d[tied].topk(k, dim=1, largest=False)
        values[tied], columns[tied] = exact.values, exact.indices
    return values, columns


def pca(x: torch.Tensor, dims: int) -> torch.Tensor:
    """(N, F) -> (N, min(dims, F)) coordinates on the leading principal axes (seeded
    randomised SVD, so every process and rerun gets the same axes)."""
    if x.shape[1] <= dims:
        return x
    with torch.random.fork_rng(devices=[x.device] if x.is_cuda else []):
        torch.manual_seed(0)
        _, _, v = torch.pca_lowrank(x, q=dims, center=True, niter=4)
    return (x - x.mean(0)) @ v


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
    """Labels spread over the kNN graph of the features (manifold assumption).

    Features wider than ``pca_dims`` are first projected on their leading principal axes
    (kNN on raw MNIST pixels is both slower and less accurate than on 32 PCA
    coordinates). With ``balance``, each class's scores are divided by their total
    before the argmax, so a class that spreads more mass does not swallow its neighbours
    (Iscen et al. 2019)."""

    def __init__(self, k: int = 10, alpha: float = 0.99, iterations: int = 50,
                 keep_fraction: float = 1.0, pca_dims: int | None = 32,
                 balance: bool = True, weights: bool = False) -> None:
        if k < 1 or not 0 < alpha < 1 or iterations < 1 or not 0 < keep_fraction <= 1 or \
                (pca_dims is not None and pca_dims < 1):
            raise ValueError("need k >= 1, 0 < alpha < 1, iterations >= 1, "
                             "0 < keep_fraction <= 1, pca_dims >= 1 or null")
        self.k, self.alpha, self.iterations, self.keep_fraction = k, alpha, iterations, \
            keep_fraction
        self.pca_dims, self.balance, self.weights = pca_dims, balance, weights

    def __call__(self, emb: torch.Tensor, labeled: torch.Tensor, labels: torch.Tensor,
                 num_classes: int) -> PseudoLabels:
        n = len(emb)
        if self.pca_dims is not None:
            emb = pca(emb, self.pca_dims)
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
        reached = f.sum(1) > 0
        if self.balance:
            f = f / f.sum(0, keepdim=True).clamp_min(1e-12)
        score = f / f.sum(1, keepdim=True).clamp_min(1e-12)
        confidence, pseudo = score.max(1)
        pseudo[labeled] = labels
        candidates = reached.clone()
        candidates[labeled] = False
        weight = None
        if self.weights:  # 1 - normalised entropy of the scores (Iscen et al. 2019)
            entropy = -(score * score.clamp_min(1e-12).log()).sum(1)
            weight = (1 - entropy / math.log(num_classes)).clamp(0, 1)
            weight[labeled] = 1.0
        return PseudoLabels(pseudo, keep_most_confident(pseudo, confidence, candidates,
                                                        self.keep_fraction), weight)


def weighted_pk_batches(labels: torch.Tensor, weight: torch.Tensor, p: int, k: int,
                        batches: int, g: torch.Generator) -> torch.Tensor:
    """(batches, p * k) positions into ``labels``: each batch p random classes, k members
    of each drawn with probability proportional to ``weight`` (without replacement while
    a class has k members of non-zero weight), laid out class by class like
    ``PKSampler``."""
    labels, weight = labels.cpu(), weight.cpu().double()
    classes = torch.unique(labels)
    members = [torch.nonzero(labels == c).flatten() for c in classes.tolist()]
    if p > len(classes):
        raise ValueError(f"semi.p={p} is more than the {len(classes)} pseudo-classes")
    out = torch.empty(batches, p * k, dtype=torch.long)
    for b in range(batches):
        for slot, c in enumerate(torch.randperm(len(classes), generator=g)[:p].tolist()):
            w = weight[members[c]].clamp_min(1e-6)  # every member keeps some chance
            pick = torch.multinomial(w, k, replacement=len(w) < k, generator=g)
            out[b, slot * k:(slot + 1) * k] = members[c][pick]
    return out


def pseudo_label_quality(pseudo: PseudoLabels, truth: torch.Tensor,
                         labeled: torch.Tensor) -> dict[str, float]:
    """Accuracy of the pseudo-labels against the hidden labels: over all unlabeled points
    and over the kept ones, and the fraction kept; with confidence weights, the kept
    ones' accuracy weighted as they are drawn."""
    unlabeled = torch.ones_like(pseudo.keep)
    unlabeled[labeled] = False
    right = pseudo.labels == truth
    kept = pseudo.keep
    out = {
        "pseudo_accuracy": right[unlabeled].float().mean().item(),
        "pseudo_kept_fraction": kept[unlabeled].float().mean().item(),
        "pseudo_kept_accuracy": right[kept].float().mean().item() if kept.any() else 0.0,
    }
    if pseudo.weight is not None and kept.any():
        w = pseudo.weight[kept]
        out["pseudo_weighted_accuracy"] = ((w * right[kept]).sum() / w.sum().clamp_min(
            1e-12)).item()
    return out


class SemiSupervision:
    """The labeled subset, the current pseudo-labels and each epoch's batches.

    ``labels`` is the training label vector the loop reads: true labels of the labeled
    images, pseudo-labels elsewhere (updated in place at each refresh). Every step has a
    P x K batch of labeled images (``sampler``), once pseudo-labels exist a second
    batch drawn by pseudo-class from labeled + kept images (``Epoch.extra``), and with
    ``views_batch`` a third of any training images for the two-view term (``Epoch.views``).

    With ``val_truth`` (the validation labels), the validation images join the
    pseudo-label graph with their labels hidden, and the share labelled right measures
    the pseudo-labels honestly. ``graph="auto"`` uses it to choose: raw pixels until the
    model's features label the validation images better (then the features for good;
    compared from the second epoch on, once the network has trained).
    ``graph="teachers"``: always the embeddings of other, trained runs (semi.teachers).
    """

    def __init__(self, truth: torch.Tensor, labeled: torch.Tensor, num_classes: int,
                 sampler, method=None, warmup_epochs: int = 2, refresh_every: int = 2,
                 p: int = 10, k: int = 25, graph: str = "embedding",
                 val_truth: torch.Tensor | None = None, views_batch: int = 0) -> None:
        if warmup_epochs < 0 or refresh_every < 1 or views_batch < 0:
            raise ValueError("need semi.warmup_epochs >= 0, semi.refresh_every >= 1 and "
                             "semi.views.batch >= 0")
        if graph not in GRAPH_SPACES:
            raise ValueError(f"semi.graph must be one of {GRAPH_SPACES}, got {graph!r}")
        if graph == "auto" and val_truth is None:
            raise ValueError("semi.graph=auto compares the graphs on the validation images "
                             "and needs their labels")
        self.graph, self.val_truth = graph, val_truth
        self.space = {"auto": "pixels"}.get(graph, graph)
        self._fixed: dict[str, tuple[PseudoLabels, float]] = {}  # FIXED_SPACES' results
        self.note: str | None = None  # the switch, for the log
        self.truth, self.labeled = truth, labeled.to(truth.device)
        self.labels = truth.clone()
        self.num_classes, self.sampler, self.method = num_classes, sampler, method
        self.warmup, self.refresh_every = warmup_epochs, refresh_every
        self.views_batch = views_batch
        self.extra_sampler = PKSampler(p, k)
        self.keep: torch.Tensor | None = None
        self.weight: torch.Tensor | None = None  # confidence weights, if the method gives
        self.epoch_no = 0
        self.quality: dict[str, float] = {}

    def state_dict(self) -> dict:
        """What a checkpoint keeps to continue: the current labels (pseudo-labels where
        unlabeled), which pseudo-labels are kept, the epoch count, the graph's space."""
        return {"labels": self.labels.cpu(),
                "keep": None if self.keep is None else self.keep.cpu(),
                "weight": None if self.weight is None else self.weight.cpu(),
                "epoch_no": self.epoch_no, "space": self.space}

    def load_state_dict(self, state: dict) -> None:
        self.labels.copy_(state["labels"].to(self.labels.device))
        self.keep = None if state["keep"] is None else state["keep"].to(self.labels.device)
        weight = state.get("weight")
        self.weight = None if weight is None else weight.to(self.labels.device)
        self.epoch_no = int(state["epoch_no"])
        self.space = state.get("space", self.space)

    def _label(self, space: str, features) -> tuple[PseudoLabels, float]:
        """Pseudo-labels of the training images from the graph in ``space``, and the
        share of validation images (graph nodes after the training images, labels
        hidden) it labels right (NaN without validation labels)."""
        if space in self._fixed:
            return self._fixed[space]
        feats = features(space)
        n = len(self.truth)
        pseudo = self.method(feats, self.labeled, self.truth[self.labeled],
                             self.num_classes)
        right = float("nan")
        if self.val_truth is not None and len(feats) > n:
            right = (pseudo.labels[n:] == self.val_truth.to(feats.device)).float().mean()
            right = right.item()
        out = PseudoLabels(pseudo.labels[:n], pseudo.keep[:n],
                           None if pseudo.weight is None else pseudo.weight[:n]), right
        if space in FIXED_SPACES:
            self._fixed[space] = out
        return out

    def _pseudo_labels(self, features) -> tuple[PseudoLabels, float]:
        pseudo, right = self._label(self.space, features)
        # before any training step (the first refresh with no warm-up) the network is
        # its random initialisation: not worth an embedding and a kNN graph of every image
        if self.graph == "auto" and self.space == "pixels" and self.epoch_no > 1:
            learned, learned_right = self._label("embedding", features)
            self.quality["pseudo_val_accuracy_features"] = learned_right
            if learned_right > right:
                self.note = (f"pseudo-labels now from the learned features: they label "
                             f"{learned_right:.1%} of the validation images right, raw "
                             f"pixels {right:.1%}")
                self.space, pseudo, right = "embedding", learned, learned_right
        return pseudo, right

    def take_note(self) -> str | None:
        """The message about a switch of graph since the last call, if any."""
        note, self.note = self.note, None
        return note

    def refresh_due(self) -> bool:
        e = self.epoch_no
        return self.method is not None and e > self.warmup and \
            (e - self.warmup - 1) % self.refresh_every == 0

    def next_epoch(self, features, g: torch.Generator, main: bool = True,
                   share=lambda value: value):
        """Draw the next epoch; ``features(space)`` gives (N [+ V], F) features of every
        training image (then every validation image, if ``val_truth`` is given) in
        ``space`` ("pixels", "embedding" or "teachers") and is called only when pseudo-labels
        are refreshed, by the ``main`` process; ``share`` hands its pseudo-labels to every
        process (several processes: a broadcast from rank 0), so all draw the same
        epoch."""
        self.epoch_no += 1
        self.quality = {}
        if self.refresh_due():
            pseudo, right = self._pseudo_labels(features) if main else (None, float("nan"))
            pseudo = share(None if pseudo is None else pseudo.to("cpu"))
            pseudo = pseudo.to(self.labels.device)
            self.labels.copy_(pseudo.labels)
            self.keep, self.weight = pseudo.keep, pseudo.weight
            self.quality.update({**pseudo_label_quality(pseudo, self.truth, self.labeled),
                                 "pseudo_val_accuracy": right,
                                 "pseudo_from_pixels": float(self.space == "pixels")})
        lab = self.sampler.epoch(self.truth[self.labeled], g)
        indices = self.labeled[lab.indices]
        extra = None
        if self.keep is not None:
            pool = torch.cat([self.labeled, torch.nonzero(self.keep).flatten()])
            if self.weight is None:
                self.extra_sampler.batches_per_epoch = len(indices)
                extra = pool[self.extra_sampler.epoch(self.labels[pool], g).indices]
            else:  # confident pseudo-labels drawn more often
                sampler = self.extra_sampler
                extra = pool[weighted_pk_batches(self.labels[pool], self.weight[pool],
                                                 sampler.p, sampler.k, len(indices), g)
                             .to(pool.device)]
        return Epoch(indices, None, extra, self._views(len(indices), g))

    def _views(self, steps: int, g: torch.Generator) -> torch.Tensor | None:
        """(steps, views_batch) training images for the two-view term, drawn from every
        training image without repeats until all have been drawn; None when off."""
        if not self.views_batch:
            return None
        n, need = len(self.truth), steps * self.views_batch
        perms = [torch.randperm(n, generator=g) for _ in range(-(-need // n))]
        return torch.cat(perms)[:need].view(steps, self.views_batch).to(self.truth.device)
