"""Plots of a run: 2D embedding scatter, per-epoch frames and GIF, training curves."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from PIL import Image  # noqa: E402

Limits = tuple[float, float, float, float]


def project_2d(
    embeddings: torch.Tensor, method: str = "pca", seed: int = 0
) -> tuple[torch.Tensor, str]:
    """(N, D) -> (N, 2) and a caption: as is for D <= 2 (D = 1 gets a zero y), else PCA
    or t-SNE (scikit-learn) by ``method``."""
    x = embeddings.detach().float().cpu()
    if x.shape[1] == 2:
        return x, ""
    if x.shape[1] == 1:
        return torch.cat([x, torch.zeros_like(x)], 1), ""
    if method == "tsne":
        from sklearn.manifold import TSNE  # deliberately here: slow to import, rarely used

        pts = TSNE(n_components=2, init="pca", random_state=seed).fit_transform(x.numpy())
        return torch.from_numpy(pts).float(), f"t-SNE of {x.shape[1]}-D"
    if method != "pca":
        raise ValueError(f"projection must be pca or tsne, got {method!r}")
    centred = x - x.mean(0)
    _, s, v = torch.linalg.svd(centred, full_matrices=False)
    share = float((s[:2] ** 2).sum() / (s**2).sum())
    return centred @ v[:2].T, f"PCA of {x.shape[1]}-D ({share:.0%} variance)"


def robust_limits(points: Sequence[torch.Tensor], pad: float = 0.05) -> Limits:
    """Shared axis limits covering the central 99.8% of all points, padded."""
    allp = torch.cat([p.float() for p in points])
    lo = torch.quantile(allp, 0.001, dim=0)
    hi = torch.quantile(allp, 0.999, dim=0)
    span = (hi - lo).clamp_min(1e-6)
    lo, hi = lo - pad * span, hi + pad * span
    return float(lo[0]), float(hi[0]), float(lo[1]), float(hi[1])


def scatter(
    points: torch.Tensor,
    labels: torch.Tensor,
    path: str | Path,
    title: str,
    class_names: Sequence[str] | None = None,
    limits: Limits | None = None,
    xlabel: str = "",
) -> Path:
    """Save a scatter of (N, 2) points, one colour per class, legend, equal aspect."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    labels = labels.cpu()
    points = points.cpu()
    classes = torch.unique(labels).tolist()
    cmap = plt.get_cmap("tab10" if len(classes) <= 10 else "tab20")
    fig, ax = plt.subplots(figsize=(7.5, 7))
    for i, c in enumerate(classes):
        sel = labels == c
        name = class_names[c] if class_names is not None else str(c)
        ax.scatter(points[sel, 0], points[sel, 1], s=3, alpha=0.5, color=cmap(i % cmap.N),
                   label=name, rasterized=True)
    ax.set_aspect("equal", adjustable="datalim" if limits is None else "box")
    if limits is not None:
        ax.set_xlim(limits[0], limits[1])
        ax.set_ylim(limits[2], limits[3])
    ax.set_title(title, fontsize=10)
    if xlabel:
        ax.set_xlabel(xlabel)
    ax.legend(markerscale=4, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def epoch_frames(
    frames: Sequence[tuple[int, torch.Tensor]],
    labels: torch.Tensor,
    folder: str | Path,
    title: str,
    gif: bool = True,
) -> list[Path]:
    """Save one scatter per (epoch, embeddings) with shared axes; optionally an animated GIF."""
    folder = Path(folder)
    projected = [(epoch, project_2d(e)[0]) for epoch, e in frames]
    if not projected:
        return []
    limits = robust_limits([p for _, p in projected])
    paths = [
        scatter(p, labels, folder / f"epoch_{epoch:03d}.png", f"{title} - epoch {epoch}",
                limits=limits)
        for epoch, p in projected
    ]
    if gif and len(paths) > 1:
        images = [Image.open(p).convert("P", palette=Image.Palette.ADAPTIVE) for p in paths]
        images[0].save(folder / "embedding.gif", save_all=True, append_images=images[1:],
                       duration=700, loop=0)
    return paths


def curves(history: Sequence[dict], path: str | Path, metrics: Sequence[str],
           steps: Sequence[dict] = ()) -> Path:
    """Train loss, validation metrics and mining diagnostics (mean positive / negative
    distance in the batch, fraction of tuples with non-zero loss) per epoch; with
    ``steps`` (rows of steps.jsonl), the inverted fraction of every step, placed at
    epoch - 1 + step / steps in that epoch."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_val, ax_mine) = plt.subplots(1, 3, figsize=(15, 4))
    ax_loss.plot(epochs, [h["train_loss"] for h in history], marker="o", label="as optimised")
    lowest = min(h["train_loss"] for h in history)
    if "train_tuple_loss" in history[0] and any(
            abs(h["train_tuple_loss"] - h["train_loss"]) > 1e-6 * abs(h["train_loss"])
            for h in history):
        ax_loss.plot(epochs, [h["train_tuple_loss"] for h in history], marker="s",
                     label="mean over all tuples")
        lowest = min(lowest, *(h["train_tuple_loss"] for h in history))
        ax_loss.legend()
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("train loss")
    ax_loss.set_yscale("log" if lowest > 0 else "linear")
    for m in metrics:
        key = f"val_{m}"
        if key in history[0]:
            ax_val.plot(epochs, [h[key] for h in history], marker="o", label=m)
    ax_val.set_xlabel("epoch")
    ax_val.set_ylabel("validation")
    ax_val.legend()
    if "pos_distance" in history[0]:
        ax_mine.plot(epochs, [h["pos_distance"] for h in history], marker="o",
                     label="same class")
        ax_mine.plot(epochs, [h["neg_distance"] for h in history], marker="o",
                     label="different class")
        ax_mine.set_ylabel("mean distance in batch")
        ax_frac = ax_mine.twinx()
        ax_frac.plot(epochs, [h["active_fraction"] for h in history], "k--", marker="x",
                     label="active (loss > 0)")
        if steps and "inverted" in steps[0]:
            per_epoch: dict[int, int] = {}
            for row in steps:
                per_epoch[row["epoch"]] = max(per_epoch.get(row["epoch"], 0), row["step"])
            ax_frac.plot([r["epoch"] - 1 + r["step"] / per_epoch[r["epoch"]] for r in steps],
                         [r["inverted"] for r in steps], color="tab:red", lw=0.6, alpha=0.6,
                         label="inverted (neg. closer than pos.), per step")
        ax_frac.set_ylabel("fraction of tuples")
        ax_frac.set_ylim(0, 1.05)
        lines = ax_mine.get_legend_handles_labels()
        extra = ax_frac.get_legend_handles_labels()
        # below the panel: the lines fill every corner of it
        ax_mine.legend(lines[0] + extra[0], lines[1] + extra[1], loc="upper center",
                       bbox_to_anchor=(0.5, -0.15), ncol=3, fontsize=8, frameon=False)
    ax_mine.set_xlabel("epoch")
    ax_mine.set_title("mining")
    for ax in (ax_loss, ax_val, ax_mine):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def pseudo_labels(history: Sequence[dict], path: str | Path) -> Path:
    """Pseudo-label quality at each refresh: accuracy on all unlabeled images, accuracy of
    the kept ones, and the fraction kept."""
    path = Path(path)
    rows = [h for h in history if "pseudo_accuracy" in h]
    epochs = [h["epoch"] for h in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(epochs, [h["pseudo_accuracy"] for h in rows], marker="o", label="all unlabeled")
    ax.plot(epochs, [h["pseudo_kept_accuracy"] for h in rows], marker="o", label="kept")
    ax.plot(epochs, [h["pseudo_kept_fraction"] for h in rows], "k--", marker="x",
            label="fraction kept")
    ax.set_xlabel("epoch (refresh)")
    ax.set_ylabel("pseudo-label accuracy / fraction")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
