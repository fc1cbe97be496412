"""``dmlrun-summarize``: turn a multirun (or a list of run folders) into a comparison table.

Finds every run folder (one with ``.hydra/config.yaml``), works out which command-line
settings (``.hydra/overrides.yaml``) vary between runs, groups runs by them (seeds
pooled), and reports per group the mean, standard deviation and 95% confidence interval
(Student t) of each metric. Failed and unfinished runs are listed, never dropped.
"""

from __future__ import annotations

import argparse
import csv
import difflib
import functools
import html
import json
import math
import os
import sys
import textwrap
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib
import torch
from omegaconf import DictConfig, OmegaConf
from scipy.stats import t

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

from dmlrun import report  # noqa: E402
from dmlrun.config import saved_overrides  # noqa: E402

IGNORED_PREFIXES = ("paths.", "hydra.", "tag")
EXCLUDED = ("trainer.progress_bar", "trainer.device")
POOLED = ("seed",)


@dataclass
class RunInfo:
    path: Path
    config: dict[str, str]
    status: str  # finished | failed | unfinished
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class Group:
    key: tuple[tuple[str, str], ...]
    runs: list[RunInfo]

    def stats(self, metric: str) -> tuple[int, float, float, float]:
        """(n, mean, sample std, 95% CI half-width) of ``metric`` over finished runs."""
        values = [r.metrics[metric] for r in self.runs if metric in r.metrics]
        return mean_std_ci(values)


def mean_std_ci(values: list[float]) -> tuple[int, float, float, float]:
    """n, mean, sample std (ddof 1) and the half-width of the 95% Student-t interval."""
    n = len(values)
    if n == 0:
        return 0, math.nan, math.nan, math.nan
    mean = sum(values) / n
    if n == 1:
        return 1, mean, math.nan, math.nan
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return n, mean, std, float(t.ppf(0.975, n - 1)) * std / math.sqrt(n)


def find_runs(paths: Iterable[str | Path]) -> list[Path]:
    found = []
    for p in map(Path, paths):
        if (p / ".hydra" / "config.yaml").is_file():
            found.append(p)
        elif p.is_dir():
            found.extend(sorted(c.parent.parent for c in p.rglob(".hydra/config.yaml")))
    return sorted(set(found))


def load_run(path: Path) -> RunInfo:
    """A run's settings (its overrides, ``key -> value``), status and summary metrics."""
    flat = {}
    for item in saved_overrides(path):
        key, _, value = str(item).lstrip("+~").partition("=")
        if not key.startswith(IGNORED_PREFIXES) and key not in EXCLUDED:
            flat[key] = value
    summary = path / "summary.json"
    if summary.is_file():
        s = json.loads(summary.read_text())
        metrics = {f"test.{k}": v for k, v in s.get("test", {}).items()}
        metrics.update({f"val.{k}": v for k, v in s.get("val", {}).items()})
        metrics["wall_seconds"] = s.get("wall_seconds", math.nan)
        return RunInfo(path, flat, "finished", metrics)
    return RunInfo(path, flat, "failed" if (path / "FAILED").exists() else "unfinished")


@functools.lru_cache(maxsize=4096)
def _saved_config(path: Path) -> DictConfig | None:
    """A run's .hydra/config.yaml, read once per run (``setting`` asks it for every key)."""
    config = path / ".hydra" / "config.yaml"
    return OmegaConf.load(config) if config.is_file() else None


@functools.lru_cache(maxsize=4096)
def _saved_choices(path: Path) -> dict[str, str]:
    """A run's config group choices (``loss -> triplet_soft``), as Hydra recorded them in
    .hydra/hydra.yaml; empty where that file is missing."""
    hydra_file = path / ".hydra" / "hydra.yaml"
    if not hydra_file.is_file():
        return {}
    choices = OmegaConf.select(OmegaConf.load(hydra_file), "hydra.runtime.choices",
                               default=None)
    return {} if choices is None else {str(k): str(v) for k, v in choices.items()
                                       if v is not None}


def setting(run: RunInfo, key: str) -> str:
    """The run's value of ``key``: its override, else the default it ran with: a group's
    choice as Hydra recorded it (``.hydra/hydra.yaml``; without that file, the class name
    of the group's ``_target_``), any other key from its saved config."""
    if key in run.config:
        return run.config[key]
    if key in (choices := _saved_choices(run.path)):
        return choices[key]
    config = _saved_config(run.path)
    if config is None:
        return ""
    node = OmegaConf.select(config, key, default=None, throw_on_missing=False,
                            throw_on_resolution_failure=False)
    if isinstance(node, DictConfig) and "_target_" in node:
        return f"({str(node._target_).rsplit('.', 1)[-1]})"
    return "" if node is None or isinstance(node, DictConfig) else str(node)


def group_runs(runs: list[RunInfo], varying: list[str] | None = None
               ) -> tuple[list[str], list[Group]]:
    """The config keys that vary (seed excluded; or ``varying`` as given) and the runs
    grouped by their values; a run that did not set a key shows the default it ran with."""
    if varying is None:
        keys = sorted({k for r in runs for k in r.config})
        varying = [k for k in keys if k not in POOLED
                   and len({setting(r, k) for r in runs}) > 1]
    groups: dict[tuple, list[RunInfo]] = {}
    for r in runs:
        groups.setdefault(tuple((k, setting(r, k)) for k in varying), []).append(r)
    return varying, [Group(k, v) for k, v in groups.items()]


def table_rows(varying: list[str], groups: list[Group], metrics: list[str]) -> list[dict]:
    rows = []
    for g in groups:
        row = dict(g.key)
        row["runs"] = len(g.runs)
        for m in metrics:
            n, mean, std, ci = g.stats(m)
            row.update({f"{m} n": n, f"{m} mean": mean, f"{m} std": std, f"{m} ci95": ci})
        rows.append(row)
    return rows


def to_markdown(rows: list[dict]) -> str:
    if not rows:
        return "(no runs)\n"
    cols = list(rows[0])

    def fmt(v):
        if isinstance(v, float):
            return "-" if math.isnan(v) else f"{v:.4f}"  # std and CI of a single run
        return str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def comparison_plot(rows: list[dict], metric: str, path: Path, label_cols: list[str]) -> None:
    labels = [", ".join(str(r[c]) for c in label_cols if str(r[c])) or "all" for r in rows]
    means = [r[f"{metric} mean"] for r in rows]
    cis = [0.0 if math.isnan(r[f"{metric} ci95"]) else r[f"{metric} ci95"] for r in rows]
    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(rows) + 2), 4))
    # points with error bars, not bars: the axis zooms to the data, so differences of a
    # few tenths of a percent stay visible without a misleading bar length
    ax.errorbar(range(len(rows)), means, yerr=cis, fmt="o", capsize=6, color="tab:blue")
    ax.set_xticks(range(len(rows)), labels, rotation=30, ha="right", fontsize=8)
    ax.set_xlim(-0.5, len(rows) - 0.5)
    ax.set_ylabel(f"{metric} (mean, 95% CI)")
    if label_cols:
        ax.set_xlabel(", ".join(label_cols), fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def embedding_grid(runs: list[RunInfo], varying: list[str], path: Path,
                   max_runs: int = 48) -> int:
    """The finished runs' test embeddings side by side, redrawn from each run's saved 2-D
    points (plots/embedding_points.pt) at a readable size, titled by their varying
    settings and seed. Returns how many were drawn."""
    shown = [r for r in runs if (r.path / "plots" / "embedding_points.pt").is_file()]
    shown = shown[:max_runs]
    if not shown:
        return 0
    cols = min(4, len(shown))
    rows = math.ceil(len(shown) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols + 0.8, 3.6 * rows),
                             squeeze=False, layout="constrained")
    classes: set[int] = set()
    for ax in axes.flat:
        ax.axis("off")
    for ax, r in zip(axes.flat, shown, strict=False):
        saved = torch.load(r.path / "plots" / "embedding_points.pt", weights_only=True)
        points, labels = saved["points"], saved["labels"]
        ax.scatter(points[:, 0], points[:, 1], c=labels, cmap="tab10", s=1.5, alpha=0.5,
                   vmin=0, vmax=9, rasterized=True)
        ax.set_aspect("equal", adjustable="datalim")
        title = ", ".join(f"{k}={setting(r, k)}" for k in [*varying, "seed"]
                          if setting(r, k)) or r.path.name
        p1 = r.metrics.get("test.precision_at_1", math.nan)
        # wrapped to the panel's width, so that neighbouring titles do not run together
        ax.set_title("\n".join([*textwrap.wrap(title, 44), f"P@1 {p1:.3f}"]), fontsize=8)
        classes.update(int(c) for c in labels.unique())
    if classes and max(classes) <= 9:  # one key for the colours, as the run's plot has
        handles = [Line2D([], [], ls="", marker="o", color=plt.get_cmap("tab10")(c))
                   for c in sorted(classes)]
        fig.legend(handles, [str(c) for c in sorted(classes)], title="class",
                   loc="outside right", fontsize=8, title_fontsize=8)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return len(shown)


def check_metric(metric: str, runs: list[RunInfo]) -> None:
    """KeyError with the closest names when no finished run has ``metric``."""
    names = sorted({k for r in runs for k in r.metrics})
    if names and metric not in names:
        close = difflib.get_close_matches(metric, names, n=1, cutoff=0.5)
        hint = f"; did you mean {close[0]}?" if close else ""
        raise KeyError(f"--metric {metric} is not in the runs' summaries{hint} "
                       f"(choose from {', '.join(names)})")


def sweep_report(result: dict, runs: list[RunInfo], metric: str, out_dir: Path) -> Path:
    """out_dir/report.html: the comparison table with 95% CIs, the plots, the failed and
    unfinished runs apart, and a link to each run's own report."""
    rows = result["rows"]
    cols = [c for c in (rows[0] if rows else {}) if not c.endswith((" n", " std"))]
    body = [f"<h1>Sweep: {html.escape(str(out_dir))}</h1>",
            f"<p>{len(runs)} runs; rows sorted by {html.escape(metric)} (mean, 95% CI "
            "half-width over seeds)</p>",
            report.table(cols, [[r[c] for c in cols] for r in rows])]
    for name, caption in (("comparison.png", f"{metric}: mean and 95% CI per setting"),
                          ("embeddings.png", "Test embeddings of every finished run")):
        if (out_dir / name).is_file():
            body.append(f'<figure><img alt="{name}" src="{report.data_uri(out_dir / name)}">'
                        f"<figcaption>{html.escape(caption)}</figcaption></figure>")
    if result["problems"]:
        body.append("<h2>Failed or unfinished</h2>" + report.table(
            ["run", "status", "reason"],
            [[p, status, _reason(Path(p))] for p, status in result["problems"]]))
    links = []
    for r in runs:
        if (r.path / "report.html").is_file():
            href = os.path.relpath(r.path / "report.html", out_dir)
            title = ", ".join(f"{k}={v}" for k, v in r.config.items()) or r.path.name
            links.append(f'<li><a href="{html.escape(href)}">{html.escape(title)}</a></li>')
    if links:
        body.append("<h2>Runs</h2><ul>" + "".join(links) + "</ul>")
    path = out_dir / "report.html"
    path.write_text(report.page(f"dmlrun sweep: {out_dir.name}", body))
    return path


def _reason(path: Path) -> str:
    failed = path / "FAILED"
    return failed.read_text().strip().splitlines()[0] if failed.is_file() else "did not finish"


def summarize(paths: list[str], metric: str, out_dir: Path | None = None) -> dict:
    """Summarize the runs under ``paths``; write summary.md, summary.csv, comparison.png to
    ``out_dir`` (default: the first path). Returns rows and the failed/unfinished runs."""
    run_dirs = find_runs(paths)
    if not run_dirs:
        raise FileNotFoundError(f"no run folders (with .hydra/config.yaml) under {paths}")
    runs = [load_run(p) for p in run_dirs]
    finished = [r for r in runs if r.status == "finished"]
    check_metric(metric, finished)
    varying, _ = group_runs(runs)  # what the sweep varies, failed runs included
    groups = group_runs(finished, varying)[1]  # the others are listed apart
    metrics = [metric] + [m for m in ("test.precision_at_1", "test.map_at_r", "test.nmi",
                                      "val.precision_at_1") if m != metric]
    rows = table_rows(varying, groups, metrics)
    rows.sort(key=lambda r: -r[f"{metric} mean"] if not math.isnan(r[f"{metric} mean"])
              else math.inf)
    out_dir = Path(out_dir or paths[0])
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "summary.md").write_text(to_markdown(rows))
    with open(out_dir / "summary.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["runs"])
        w.writeheader()
        w.writerows(rows)
    if finished:
        comparison_plot(rows, metric, out_dir / "comparison.png", varying)
        embedding_grid(sorted(finished, key=lambda r: sorted(r.config.items())), varying,
                       out_dir / "embeddings.png")
    problems = [(str(r.path), r.status) for r in runs if r.status != "finished"]
    result = {"rows": rows, "varying": varying, "problems": problems, "out_dir": str(out_dir)}
    sweep_report(result, runs, metric, out_dir)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="dmlrun-summarize", description=__doc__.splitlines()[0])
    p.add_argument("paths", nargs="+", help="multirun folder(s) or run folders")
    p.add_argument("--metric", default="test.precision_at_1",
                   help="sort key, e.g. test.map_at_r or val.precision_at_1")
    p.add_argument("--output", "--out", dest="output",
                   help="folder for summary.md/.csv, comparison.png, embeddings.png and "
                        "report.html (default: the first path; these derived files are "
                        "rewritten)")
    args = p.parse_args(argv)
    try:
        result = summarize(args.paths, args.metric, Path(args.output) if args.output else None)
    except (FileNotFoundError, KeyError) as exc:
        print(f"dmlrun-summarize: error: {exc.args[0]}", file=sys.stderr)
        return 2
    rows = result["rows"]
    cols = [c for c in (rows[0] if rows else {}) if not c.endswith((" n", " std")) or
            c.startswith(args.metric)]
    print(to_markdown([{c: r[c] for c in cols} for r in rows]), end="")
    for path, status in result["problems"]:
        print(f"{status}: {path} ({_reason(Path(path))})")
    print(f"written: {result['out_dir']}/summary.md, summary.csv, comparison.png, "
          "embeddings.png, report.html")
    return 0


if __name__ == "__main__":
    sys.exit(main())
