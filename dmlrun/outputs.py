"""What a finished run leaves: its plots under plots/ and summary.json."""

from __future__ import annotations

import json
import logging
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

import hydra
import torch

from dmlrun import __version__, plots, retrieval_plots
from dmlrun.assemble import Context
from dmlrun.evaluation import Validation
from dmlrun.metrics import display_order
from dmlrun.recorder import Recorder

log = logging.getLogger("dmlrun")


def format_table(rows: dict[str, dict[str, float]]) -> str:
    """Metrics as an aligned text table, one row per model."""
    cols = display_order({c for r in rows.values() for c in r})
    head = f"{'':<12}" + "".join(f"{c:>15}" for c in cols)
    lines = [head] + [f"{name:<12}" + "".join(f"{r.get(c, float('nan')):>15.4f}" for c in cols)
                      for name, r in rows.items()]
    return "\n".join(lines)


def versions() -> dict[str, str]:
    # torchvision's from its package metadata: importing it costs seconds, and most runs
    # (MNIST, the convnet) never do
    return {"dmlrun": __version__, "torch": torch.__version__,
            "torchvision": metadata.version("torchvision"), "hydra": hydra.__version__,
            "python": platform.python_version()}


def write_plots(ctx: Context, history: list[dict], recorder: Recorder,
                validation: Validation, test_emb: torch.Tensor, test: dict,
                baselines: dict) -> dict[str, Any]:
    """Every plot under plots/; returns the analysis numbers for summary.json."""
    data, names, s = ctx.data, ctx.names, ctx.parts.settings
    plot_dir = ctx.run_dir / "plots"
    classes = list(data.class_names) if data.class_names else None
    title = (f"{data.name} test: loss={names['loss']} miner={names['miner']} epoch "
             f"{recorder.best['epoch']} - P@1 {test['precision_at_1']:.3f} MAP@R "
             f"{test['map_at_r']:.3f}")
    loss = ctx.parts.loss
    points, analysis = split_plots(test_emb, data.test, data, loss.distance,
                                   retrieval_plots.loss_margin(loss), s.evaluation.projection,
                                   s.seed, plot_dir, f"{data.name} test", title)
    # the 2-D points, so a sweep's summary can redraw every run's embedding from data
    torch.save({"points": points.cpu(), "labels": data.test.labels.cpu()},
               plot_dir / "embedding_points.pt")
    plots.curves(history, plot_dir / "curves.png",
                 ["precision_at_1", "map_at_r", "r_precision", "nmi"], recorder.step_rows(),
                 baselines)
    ctx.parts.task.write_plots(history, plot_dir)
    if frames := validation.frames():
        plots.epoch_frames(frames, data.val.labels[validation.frame_idx], plot_dir / "epochs",
                           f"{data.name} val: loss={names['loss']} miner={names['miner']}",
                           class_names=classes)
    return analysis


def split_plots(emb: torch.Tensor, split: Any, data: Any, distance: Any, margin: float | None,
                projection: str, seed: int, out: Path, title: str,
                scatter_title: str | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
    """The plots of one embedded split, for the run's test set and for any split
    ``dmlrun-evaluate --plots`` grades: the 2-D scatter (``embedding.png``) and
    ``retrieval_plots.write_all`` (gallery, distances, confusion, per class) with the
    run's distance and the loss's margin. Returns the (N, 2) points and the analysis
    numbers."""
    classes = list(data.class_names) if data.class_names else None
    points, how = plots.project_2d(emb, projection, seed)
    plots.scatter(points, split.labels, out / "embedding.png", scatter_title or title,
                  class_names=classes, xlabel=how)
    return points, retrieval_plots.write_all(emb, split, distance, margin, out, title,
                                             classes, seed)


def test_protocol(split: Any) -> str:
    """How a test split is graded, in words: leave-one-out, or its queries against its
    gallery (``query_count``, as In-Shop's)."""
    q = getattr(split, "query_count", None)
    if q is None:
        return "leave-one-out"
    return f"{q} queries against a gallery of {len(split) - q}"


def write_summary(ctx: Context, history: list[dict], recorder: Recorder, best_state: dict,
                   test_emb: torch.Tensor, test: dict, baselines: dict,
                   extra: dict[str, Any], wall: float) -> dict[str, Any]:
    s, ranks, device, data = ctx.parts.settings, ctx.ranks, ctx.device, ctx.data
    best = recorder.best
    log.info("%s epoch %d (val %s %.4f); test P@1 %.4f, MAP@R %.4f", recorder.select,
             best["epoch"], recorder.monitor, best["value"], test["precision_at_1"],
             test["map_at_r"])
    log.info("test metrics:\n%s", format_table({"trained": test, **baselines}))
    train_seconds = sum(h["train_seconds"] for h in history)
    summary = {
        "run_dir": str(ctx.run_dir.resolve()),
        "choices": ctx.names,
        "seed": s.seed,
        "tag": s.tag,
        "embedding_dim": int(test_emb.shape[1]),
        "train_classes": torch.unique(data.train.labels).tolist(),
        "test_classes": torch.unique(data.test.labels).tolist(),
        "test_protocol": test_protocol(data.test),
        "epochs": len(history),
        "best_epoch": best["epoch"],
        "monitor": recorder.monitor,
        "select": recorder.select,
        "val": {k[4:]: v for k, v in best_state["metrics"].items() if k.startswith("val_")},
        "test": test,
        "baselines": baselines,
        **extra,
        "wall_seconds": wall,
        "train_seconds": train_seconds,
        "train_samples_per_s": sum(h["samples_per_s"] * h["train_seconds"] for h in history)
        / train_seconds,
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "amp": str(ctx.amp_dtype).replace("torch.", "") if ctx.amp_dtype else None,
        "processes": ranks.world,
        **({"backend": torch.distributed.get_backend(),
            "mining": s.trainer.mining} if ranks.launched else {}),
        "versions": versions(),
    }
    with open(ctx.run_dir / "summary.json", "w") as f:
        json.dump(summary, f, indent=2)
    log.info("done in %.1fs; summary: %s", wall, ctx.run_dir / "summary.json")
    return summary
