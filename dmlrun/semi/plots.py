"""The semi-supervised task's plot: pseudo-label quality at each refresh."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib.pyplot as plt

from dmlrun.plots import epoch_axis

# the PNG's title, which the run's report shows as its caption
CAPTION = "Pseudo-label quality at each refresh (semi-supervised)"


def pseudo_label_plot(history: Sequence[dict], path: str | Path) -> Path:
    """Pseudo-label quality at each refresh: the share right on the unlabeled training
    images (their hidden labels) and on the validation images (what the run could see),
    for the graph in use and, while raw pixels are in use, for the model's features; the
    kept ones' accuracy and the fraction kept when not every pseudo-label is kept; epochs
    whose pseudo-labels came from raw pixels shaded."""
    path = Path(path)
    rows = [h for h in history if "pseudo_accuracy" in h]
    epochs = [h["epoch"] for h in rows]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    # (field, legend, line style, colour): each series keeps its colour in every run
    series = [("pseudo_accuracy", "unlabeled training images (hidden labels)", "-o", "C0"),
              ("pseudo_val_accuracy", "validation images", "--o", "C1"),
              ("pseudo_val_accuracy_features", "validation images, model's features", ":s",
               "C2")]
    partial = any(h["pseudo_kept_fraction"] < 1 for h in rows)
    if partial:
        series.insert(1, ("pseudo_kept_accuracy", "kept pseudo-labels", "-^", "C3"))
    shown: list[float] = []
    for key, label, style, colour in series:
        pts = [(h["epoch"], h[key]) for h in rows if math.isfinite(h.get(key, math.nan))]
        if pts:
            ax.plot(*zip(*pts, strict=True), style, color=colour, label=label)
            shown += [v for _, v in pts]
    for h in rows:
        if h.get("pseudo_from_pixels"):
            ax.axvspan(h["epoch"] - 0.5, h["epoch"] + 0.5, color="0.9", zorder=0)
    if any(h.get("pseudo_from_pixels") for h in rows):
        ax.fill_between([], [], color="0.9", label="from raw pixels")
    ax.set_ylabel("pseudo-labels right")
    ax.set_ylim(max(0.0, min(shown, default=0.0) - 0.03), 1.005)
    if partial:
        twin = ax.twinx()
        twin.plot(epochs, [h["pseudo_kept_fraction"] for h in rows], "k--", marker="x",
                  label="fraction kept")
        twin.set_ylim(0, 1.05)
        twin.set_ylabel("fraction of unlabeled images kept")
        twin.legend(loc="center right", fontsize=8)
    ax.set_title("pseudo-labels at each refresh")
    ax.legend(fontsize=8, loc="lower right")
    epoch_axis(ax, max(epochs) if epochs else 1)
    fig.tight_layout()
    fig.savefig(path, dpi=100, metadata={"Title": CAPTION})
    plt.close(fig)
    return path
