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
    mean, comps, share = fit_pca(x)
    return (x - mean) @ comps, f"PCA of {x.shape[1]}-D ({share:.0%} variance)"


def robust_limits(points: Sequence[torch.Tensor], pad: float = 0.05) -> Limits:
    """Shared axis limits covering the central 99.8% of all points, padded."""
    allp = torch.cat([p.float() for p in points])
    lo = torch.quantile(allp, 0.001, dim=0)
    hi = torch.quantile(allp, 0.999, dim=0)
    span = (hi - lo).clamp_min(1e-6)
    lo, hi = lo - pad * span, hi + pad * span
    return float(lo[0]), float(hi[0]), float(lo[1]), float(hi[1])


MAX_LEGEND = 20


def scatter(
    points: torch.Tensor,
    labels: torch.Tensor,
    path: str | Path,
    title: str,
    class_names: Sequence[str] | None = None,
    limits: Limits | None = None,
    xlabel: str = "",
) -> Path:
    """Save a scatter of (N, 2) points, one colour per class, equal aspect; a legend of
    the classes up to ``MAX_LEGEND`` of them (more would not fit beside the plot, and
    their colours repeat: the title says how many)."""
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
    if len(classes) <= MAX_LEGEND:
        ax.legend(markerscale=4, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    else:
        title = f"{title}\n({len(classes)} classes; colours repeat every {cmap.N})"
    ax.set_title(title, fontsize=10)
    if xlabel:
        ax.set_xlabel(xlabel)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def fit_pca(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(mean (D,), components (D, 2), share of variance) of the PCA of (N, D) points."""
    x = x.detach().float().cpu()
    mean = x.mean(0)
    _, s, v = torch.linalg.svd(x - mean, full_matrices=False)
    return mean, v[:2].T, float((s[:2] ** 2).sum() / (s**2).sum())


def epoch_frames(
    frames: Sequence[tuple[int, torch.Tensor]],
    labels: torch.Tensor,
    folder: str | Path,
    title: str,
    gif: bool = True,
    class_names: Sequence[str] | None = None,
) -> list[Path]:
    """Save one scatter per (epoch, embeddings) with shared axes; optionally an animated
    GIF. Above 2-D, one PCA is fitted to all frames together and used for every frame, so
    the axes mean the same thing from frame to frame."""
    folder = Path(folder)
    if not frames:
        return []
    dim = frames[0][1].shape[1]
    xlabel = ""
    if dim > 2:
        mean, comps, share = fit_pca(torch.cat([e for _, e in frames]))
        projected = [(epoch, (e.float().cpu() - mean) @ comps) for epoch, e in frames]
        xlabel = f"PCA of {dim}-D, fitted on all frames ({share:.0%} variance)"
    else:
        projected = [(epoch, project_2d(e)[0]) for epoch, e in frames]
    limits = robust_limits([p for _, p in projected])
    paths = [
        scatter(p, labels, folder / f"epoch_{epoch:03d}.png",
                f"{title} - epoch {epoch}" + (" (untrained)" if epoch == 0 else ""),
                class_names=class_names, limits=limits, xlabel=xlabel)
        for epoch, p in projected
    ]
    if gif and len(paths) > 1:
        images = [Image.open(p).convert("P", palette=Image.Palette.ADAPTIVE) for p in paths]
        images[0].save(folder / "embedding.gif", save_all=True, append_images=images[1:],
                       duration=700, loop=0)
    return paths


def _step_x(steps: Sequence[dict]) -> list[float]:
    """Each step's position in epochs: epoch - 1 + step / steps of that epoch."""
    per_epoch: dict[int, int] = {}
    for row in steps:
        per_epoch[row["epoch"]] = max(per_epoch.get(row["epoch"], 0), row["step"])
    return [r["epoch"] - 1 + r["step"] / per_epoch[r["epoch"]] for r in steps]


def smooth(values: Sequence[float], window: int) -> list[float]:
    """Trailing mean over ``window`` values (fewer at the start)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def epoch_axis(ax, last_epoch: int) -> None:
    ax.set_xlabel("epoch")
    ax.grid(alpha=0.3)
    if last_epoch <= 20:
        ax.set_xticks(range(0, last_epoch + 1))
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def curves(history: Sequence[dict], path: str | Path, metrics: Sequence[str],
           steps: Sequence[dict] = (), baselines: dict | None = None) -> Path:
    """Four panels: the loss per tuple at every step (faint) and smoothed; the validation
    metrics per epoch with the test baselines (untrained network, raw pixels) dashed; the
    mining diagnostics per step (mean same- and different-class distance in the batch,
    fractions of active and inverted tuples); the learning rate per epoch. Epochs on the
    x axis; a step sits at epoch - 1 + step / steps."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    epochs = [h["epoch"] for h in history]
    last = max(epochs)
    fig, (ax_loss, ax_val, ax_mine, ax_lr) = plt.subplots(1, 4, figsize=(19, 4.2))
    _loss_panel(ax_loss, history, steps)
    for i, m in enumerate(metrics):
        if f"val_{m}" in history[0]:
            colour = f"C{i}"
            ax_val.plot(epochs, [h[f"val_{m}"] for h in history], marker="o", color=colour,
                        label=m)
            for base, ls in zip((baselines or {}).values(), ("--", ":"), strict=False):
                if m in base:
                    ax_val.axhline(base[m], color=colour, ls=ls, lw=1, alpha=0.8)
    if baselines:
        for name, ls in zip(baselines, ("--", ":"), strict=False):
            ax_val.plot([], [], color="grey", ls=ls, label=f"{name.replace('_', ' ')} (test)")
    ax_val.set_ylabel("validation metric")
    ax_val.set_title("validation per epoch; baselines dashed")
    ax_val.legend(fontsize=7)
    _mining_panel(ax_mine, history, steps)
    if all("lr_first" in h for h in history):  # the rate applied at each epoch's ends
        xs = [x for h in history for x in (h["epoch"] - 1, h["epoch"])]
        rates = [r for h in history for r in (h["lr_first"], h["lr_last"])]
        ax_lr.plot(xs, rates, marker=".")
        ax_lr.set_ylabel("learning rate applied\n(each epoch's first and last step)")
    else:  # records written before the applied rate was kept
        rates = [h.get("lr", float("nan")) for h in history]
        ax_lr.plot(epochs, rates, marker="o")
        ax_lr.set_ylabel("learning rate at the epoch's start")
    ax_lr.set_title("learning rate")
    if all(r > 0 for r in rates) and max(rates) < 1e3 * min(rates):  # a decay to ~0: linear
        ax_lr.set_yscale("log")
    for ax in (ax_loss, ax_val, ax_mine, ax_lr):
        epoch_axis(ax, last)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _loss_panel(ax, history: Sequence[dict], steps: Sequence[dict]) -> None:
    key = "tuple_loss" if steps and "tuple_loss" in steps[0] else "loss"
    if steps:
        x, y = _step_x(steps), [r[key] for r in steps]
        ax.plot(x, y, color="tab:blue", lw=0.5, alpha=0.35, label="per step")
        ax.plot(x, smooth(y, max(1, len(y) // 50)), color="tab:blue", lw=1.5,
                label="smoothed")
    else:
        ax.plot([h["epoch"] for h in history],
                [h.get("train_tuple_loss", h["train_loss"]) for h in history], marker="o")
    values = [r[key] for r in steps] if steps else [h["train_loss"] for h in history]
    ax.set_yscale("log" if min(values) > 0 else "linear")
    ax.set_ylabel("loss, mean over tuples")
    ax.set_title("training loss per tuple")
    ax.legend(fontsize=7)


def _mining_panel(ax, history: Sequence[dict], steps: Sequence[dict]) -> None:
    if steps and "pos_distance" in steps[0]:
        x = _step_x(steps)
        w = max(1, len(steps) // 50)
        ax.plot(x, smooth([r["pos_distance"] for r in steps], w), label="same class")
        ax.plot(x, smooth([r["neg_distance"] for r in steps], w), label="different class")
        frac = ax.twinx()
        frac.plot(x, smooth([r["active"] / max(r["tuples"], 1) for r in steps], w), "k--",
                  lw=1, label="active (loss > 0)")
        if "inverted" in steps[0]:
            frac.plot(x, [r["inverted"] for r in steps], color="tab:red", lw=0.6, alpha=0.6,
                      label="inverted (neg. closer than pos.)")
        frac.set_ylabel("fraction of tuples")
        frac.set_ylim(0, 1.05)
        lines, extra = ax.get_legend_handles_labels(), frac.get_legend_handles_labels()
        ax.legend(lines[0] + extra[0], lines[1] + extra[1], loc="upper center",
                  bbox_to_anchor=(0.5, -0.15), ncol=2, fontsize=7, frameon=False)
    elif "pos_distance" in history[0]:
        epochs = [h["epoch"] for h in history]
        ax.plot(epochs, [h["pos_distance"] for h in history], marker="o", label="same class")
        ax.plot(epochs, [h["neg_distance"] for h in history], marker="o",
                label="different class")
        ax.legend(fontsize=7)
    ax.set_ylabel("mean distance in batch (smoothed)")
    ax.set_title("mining per step")
