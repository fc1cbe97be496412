"""Plots of what a trained embedding retrieves: a gallery of queries with their nearest
neighbours, same- vs different-class distance histograms, nearest-neighbour class
confusion and per-class metrics. The numbers come from ``analysis.py``."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from dmlrun import analysis  # noqa: E402
from dmlrun.analysis import DistanceSample  # noqa: E402
from dmlrun.distances import Distance  # noqa: E402
from dmlrun.metrics import per_query  # noqa: E402

GREEN, RED, GREY = (0.1, 0.65, 0.2), (0.85, 0.1, 0.1), (0.3, 0.3, 0.3)
BORDER = 3  # pixels of the coloured frame around each tile
GAP = 2  # white pixels between tiles
GALLERY_RIGHT, GALLERY_WRONG, GALLERY_K = 5, 7, 8  # gallery rows and neighbours per row
# Classes a confusion plot draws (cells readable at a few inches per ten classes; the
# benchmarks test on 98 to 11,316 classes) and classes per_class.png names one by one.
MAX_CONFUSION_CLASSES = 20
MAX_NAMED_CLASSES = 30


def _name(c: int, class_names: Sequence[str] | None) -> str:
    return str(class_names[c]) if class_names is not None and c < len(class_names) else str(c)


def _tile(image: torch.Tensor, colour: tuple[float, float, float]) -> torch.Tensor:
    """(C, H, W) uint8 -> (H + 2 BORDER, W + 2 BORDER, 3) float in [0, 1], framed."""
    x = image.float().cpu() / 255.0
    x = x.expand(3, -1, -1) if x.shape[0] == 1 else x[:3]
    framed = torch.tensor(colour).view(3, 1, 1).expand(3, x.shape[1] + 2 * BORDER,
                                                       x.shape[2] + 2 * BORDER).clone()
    framed[:, BORDER:-BORDER, BORDER:-BORDER] = x
    spaced = torch.ones(3, framed.shape[1] + 2 * GAP, framed.shape[2] + 2 * GAP)
    spaced[:, GAP:-GAP, GAP:-GAP] = framed
    return spaced.permute(1, 2, 0)


def gallery(query_images: torch.Tensor, query_labels: torch.Tensor,
            neighbour_images: torch.Tensor, neighbour_labels: torch.Tensor,
            neighbour_dists: torch.Tensor, path: str | Path, title: str,
            class_names: Sequence[str] | None = None, n_right: int | None = None) -> Path:
    """Each row: a query (grey frame) and its nearest neighbours, framed green when of the
    query's class and red when not, with their distances. Shapes: (Q, C, H, W),
    (Q,), (Q, k, C, H, W), (Q, k), (Q, k). The first ``n_right`` rows are queries whose
    nearest neighbour is right; the rest the worst failures."""
    q, k = neighbour_labels.shape
    rows = []
    for i in range(q):
        tiles = [_tile(query_images[i], GREY)] + [
            _tile(neighbour_images[i, j], GREEN if neighbour_labels[i, j] == query_labels[i]
                  else RED) for j in range(k)]
        rows.append(torch.cat(tiles, dim=1))
    grid = torch.cat(rows, dim=0)
    th, tw = grid.shape[0] // q, grid.shape[1] // (k + 1)
    fig, ax = plt.subplots(figsize=(1.0 * (k + 1) + 1.6, 1.05 * q + 0.9))
    ax.imshow(grid.numpy(), interpolation="nearest")
    for i in range(q):
        for j in range(k):
            ax.text((j + 1.5) * tw, (i + 1) * th - GAP - BORDER - 1,
                    f"{float(neighbour_dists[i, j]):.2g}", ha="center", va="bottom",
                    fontsize=6.5, color="white",
                    bbox={"facecolor": "black", "alpha": 0.55, "pad": 0.5, "lw": 0})
    if n_right is not None and 0 < n_right < q:
        ax.axhline(n_right * th - 0.5, color="black", lw=2)
    ax.set_xticks([(j + 0.5) * tw for j in range(k + 1)],
                  ["query"] + [f"#{j + 1}" for j in range(k)], fontsize=8)
    # the query's class as a tick label, so that the layout makes room for long names
    # (CUB's "133.White_throated_Sparrow")
    ax.set_yticks([(i + 0.5) * th for i in range(q)],
                  [_name(int(query_labels[i]), class_names) for i in range(q)], fontsize=9)
    ax.tick_params(length=0)
    ax.set_title(title, fontsize=10)
    return _save(fig, path, dpi=110, fit=True)


def distance_histograms(sample: DistanceSample, path: str | Path, title: str,
                        margin: float | None = None) -> Path:
    """Histograms of same-class and different-class pair distances, the loss margin as a
    vertical line when there is one (a margin of 0, e.g. the soft margin's, draws none),
    and their overlap in the legend."""
    fig, ax = plt.subplots(figsize=(7, 4))
    both = torch.cat([sample.same, sample.different])
    bins = torch.linspace(float(both.min()), float(both.max()), 81).tolist() \
        if len(both) else 10
    ax.hist(sample.same.numpy(), bins=bins, density=True, alpha=0.55, color="tab:blue",
            label=f"same class ({len(sample.same)} pairs)")
    ax.hist(sample.different.numpy(), bins=bins, density=True, alpha=0.55, color="tab:orange",
            label=f"different class ({len(sample.different)} pairs)")
    if margin:
        ax.axvline(margin, color="black", ls="--", lw=1.2, label=f"loss margin {margin:g}")
    ax.plot([], [], " ", label=f"overlap {sample.overlap:.3f} (0 = separable)")
    ax.set_xlabel("distance")
    ax.set_ylabel("density")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def confusion(counts: torch.Tensor, classes: torch.Tensor, total: int, path: str | Path,
              title: str, class_names: Sequence[str] | None = None) -> Path:
    """Row-normalised nearest-neighbour confusion of ``classes`` (K ids, ``total`` classes in
    all; ``counts`` (K, K + 1) from ``analysis.nn_confusion``): row = query class, column =
    class of its nearest neighbour, and, when K < total, an "other" column for the classes
    not drawn; off-diagonal cells say which classes are mixed up."""
    k = len(classes)
    rates = (counts.float() / counts.sum(1, keepdim=True).clamp_min(1)).cpu()
    if k == total:
        rates, counts = rates[:, :k], counts[:, :k]
    fig, ax = plt.subplots(figsize=(1.0 + 0.55 * rates.shape[1], 0.8 + 0.5 * k))
    image = ax.imshow(rates.numpy(), cmap="Blues", vmin=0, vmax=1)
    for i in range(k):
        for j in range(rates.shape[1]):
            if counts[i, j] > 0:
                value = float(rates[i, j])
                shown = "<.01" if value < 0.005 else f"{value:.2f}" if value < 0.995 else "1"
                ax.text(j, i, shown, ha="center",
                        va="center", fontsize=7, color="white" if value > 0.6 else "black")
    names = [_name(int(c), class_names) for c in classes]
    columns = names + (["other"] if rates.shape[1] > k else [])
    ax.set_xticks(range(len(columns)), columns, rotation=45 if len(columns) > 10 else 0,
                  fontsize=8)
    ax.set_yticks(range(k), names, fontsize=8)
    ax.set_xlabel("class of the nearest neighbour")
    ax.set_ylabel("class of the query")
    if k < total:
        title += (f"\nthe {k} classes of the most frequent mix-ups, of {total}; other: "
                  "every class not shown")
    ax.set_title(title, fontsize=10)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of the row")
    return _save(fig, path)


def per_class_plot(per_class: dict[str, dict[str, float]], path: str | Path,
                   title: str, graded: str = "leave-one-out") -> Path:
    """P@1 and MAP@R of each class (keys: class names) as points on a zoomed axis (bars
    on an axis that does not start at 0 would exaggerate the differences). Over
    ``MAX_NAMED_CLASSES`` classes their names would not fit: the classes are ranked by P@1
    (then MAP@R) and drawn as two curves over the rank; report.html's table names them."""
    named = len(per_class) <= MAX_NAMED_CLASSES
    names = list(per_class) if named else analysis.worst_classes_first(per_class)
    x = torch.arange(len(names)).float()
    width = max(6, 0.6 * len(names) + 2) if named else 9
    fig, ax = plt.subplots(figsize=(width, 4))
    for offset, metric, colour in ((-0.12, "precision_at_1", "tab:blue"),
                                   (0.12, "map_at_r", "tab:green")):
        values = [per_class[n][metric] for n in names]
        if named:
            ax.plot((x + offset).tolist(), values, "o", color=colour, label=metric,
                    markersize=7)
        else:
            ax.plot(x.tolist(), values, "-", color=colour, label=metric, lw=1.5)
    if named:
        ax.set_xticks(x.tolist(), names, rotation=45 if len(names) > 10 else 0, fontsize=8)
        ax.set_xlim(-0.6, len(names) - 0.4)
    else:
        ax.set_xlabel(f"the {len(names)} classes, ranked by P@1 (report.html names them)")
        ax.set_xlim(0, len(names) - 1)
    # one line as long as it fits the 4-inch axis ("leave-one-out" does), else two
    ax.set_ylabel(textwrap.fill(f"test metric ({graded}; zoomed axis)", 42))
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.12 if named else -0.2),
              ncol=2, frameon=False)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def loss_margin(loss: Any) -> float | None:
    """The loss's margin in distance units, if it has one (for the histograms): its own
    ``plot_margin()`` (losses from elsewhere have none)."""
    return loss.plot_margin() if hasattr(loss, "plot_margin") else None


def write_all(emb: torch.Tensor, split: Any, distance: Distance, margin: float | None,
              plot_dir: Path, title: str, class_names: list[str] | None,
              seed: int) -> dict[str, Any]:
    """gallery.png, distances.png (with the loss's ``margin``, if any), confusion.png (of
    the split's classes, at most ``MAX_CONFUSION_CLASSES`` of them) and per_class.png of
    (N, D) embeddings of ``split`` (a ``Split`` or ``FileSplit``), graded with
    ``distance``. Returns per-class metrics and the distance overlap."""
    labels = split.labels
    # a query/gallery test set (In-Shop) is graded, and drawn, queries against the gallery
    q = getattr(split, "query_count", None)
    query_labels = labels if q is None else labels[:q]
    graded = "leave-one-out" if q is None else "queries against the gallery"
    pq = per_query(emb, labels, distance, q)
    per_class = analysis.per_class_metrics(query_labels.cpu(), pq.hit1.cpu(), pq.ap.cpu(),
                                           class_names)
    nn_labels = labels[pq.nearest]
    drawn = analysis.confused_classes(query_labels, nn_labels, MAX_CONFUSION_CLASSES)
    confusion(analysis.nn_confusion(query_labels, nn_labels, drawn), drawn,
              len(torch.unique(query_labels)), plot_dir / "confusion.png",
              f"{title}: nearest-neighbour classes, row-normalised", class_names)
    per_class_plot(per_class, plot_dir / "per_class.png",
                   f"{title}: per-class P@1 and MAP@R", graded)
    sample = analysis.distance_sample(emb, labels, distance, seed=seed)
    distance_histograms(sample, plot_dir / "distances.png",
                                        f"{title}: pair distances ({distance.name})",
                                        margin)
    right, wrong = analysis.pick_queries(pq.hit1, GALLERY_RIGHT, GALLERY_WRONG, seed,
                                         -pq.ap.nan_to_num(1.0))
    queries = torch.cat([right, wrong]).to(emb.device)
    nbr, dist = analysis.nearest(emb, queries, GALLERY_K, distance, q)
    gallery(
        split.take(queries), labels[queries],
        split.take(nbr.flatten()).view(*nbr.shape, *split.take(queries[:1]).shape[1:]),
        labels[nbr], dist, plot_dir / "gallery.png", f"{title}: queries (grey), their "
        f"{GALLERY_K} nearest neighbours (green: same class, red: another)\nabove the line: "
        "random right answers; below: the worst failures (lowest AP@R)", class_names,
        n_right=len(right))
    return {"per_class": per_class, "distance_overlap": sample.overlap}


def _save(fig, path: str | Path, dpi: int = 100, fit: bool = False) -> Path:
    """Write ``fig``; ``fit``: grow or crop the canvas to what is drawn (the gallery,
    whose image keeps its aspect, leaves tight_layout no room for long class names)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi, bbox_inches="tight" if fit else None)
    plt.close(fig)
    return path
