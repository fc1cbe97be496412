"""report.html: one self-contained page per run (and per sweep) that needs no network:
every image is inlined. Built from the run folder's own files, so it can be rebuilt from
any finished run."""

from __future__ import annotations

import base64
import html
import json
import math
from collections.abc import Sequence
from pathlib import Path

import torch
from omegaconf import OmegaConf
from PIL import Image

from dmlrun.analysis import worst_classes_first
from dmlrun.config import saved_overrides
from dmlrun.metrics import display_order

SHORT = {"precision_at_1": "P@1", "recall_at_1": "R@1", "recall_at_2": "R@2",
         "recall_at_4": "R@4", "recall_at_8": "R@8", "r_precision": "R-precision",
         "map_at_r": "MAP@R", "knn_accuracy": "kNN accuracy", "nmi": "NMI", "ami": "AMI"}
# (file under plots/, caption), in reading order
RUN_PLOTS = (
    ("embedding.png", "Test embeddings of the best epoch"),
    ("gallery.png", "Queries and their 8 nearest test neighbours (green: same class, red: "
                    "another); above the line random right answers, below the worst failures"),
    ("distances.png", "Distances of same-class and different-class test pairs"),
    ("confusion.png", "Nearest-neighbour class confusion on the test set"),
    ("per_class.png", "Per-class test metrics"),
    ("curves.png", "Training: loss and mining per step, validation per epoch, learning rate"),
    ("epochs/embedding.gif", "Validation embeddings, epoch by epoch"),
)
STYLE = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em;display:block;overflow-x:auto}
td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}th{background:#f3f3f3}
td:first-child,th:first-child{text-align:left}pre{background:#f7f7f7;padding:1em;overflow:auto;font-size:12px}
figure{margin:1.5em 0}img{max-width:100%;border:1px solid #ddd}figcaption{color:#555}
.bad{color:#b00}
"""
# Marks the page once loaded: every image decoded (data-images-ok), so a headless browser
# (and a reader) can tell a broken image at once.
CHECK = """<script>
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var broken = imgs.filter(function (i) { return !(i.complete && i.naturalWidth > 0); });
  document.body.setAttribute('data-images', String(imgs.length));
  document.body.setAttribute('data-images-ok', String(broken.length === 0));
  broken.forEach(function (i) { i.insertAdjacentHTML('afterend',
    '<p class="bad">image failed to load: ' + i.alt + '</p>'); });
});
</script>"""


def data_uri(path: Path) -> str:
    kind = {"png": "image/png", "gif": "image/gif", "jpg": "image/jpeg"}[path.suffix[1:]]
    return f"data:{kind};base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.4f}"
    return html.escape(str(value))


def table(head: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    out = ["<table><tr>" + "".join(f"<th>{html.escape(str(h))}</th>" for h in head) + "</tr>"]
    out += ["<tr>" + "".join(f"<td>{_fmt(v)}</td>" for v in row) + "</tr>" for row in rows]
    return "".join(out) + "</table>"


def page(title: str, body: Sequence[str]) -> str:
    return (f"<!doctype html><html lang=en><head><meta charset=utf-8><title>"
            f"{html.escape(title)}</title><style>{STYLE}</style></head><body>"
            + "\n".join(body) + CHECK + "</body></html>\n")


def _command(run_dir: Path) -> str:
    return "dmlrun " + " ".join(saved_overrides(run_dir))


def _metrics_table(summary: dict) -> str:
    rows = {"trained (test)": summary.get("test", {}), "best epoch (val)": summary.get("val", {}),
            **{f"{k} (test)": v for k, v in summary.get("baselines", {}).items()}}
    cols = display_order({m for r in rows.values() for m in r if m in SHORT or
                          m.startswith("recall_at_")})
    return table(["model", *(SHORT.get(c, f"R@{c[10:]}") for c in cols)],
                 [[name, *(r.get(c, math.nan) for c in cols)] for name, r in rows.items()])


def _per_class_table(summary: dict) -> str:
    """Every class in id order; over ``MAX_NAMED_CLASSES``, where per_class.png draws
    ranks without names, worst P@1 (then MAP@R) first, as that plot ranks them."""
    from dmlrun.retrieval_plots import MAX_NAMED_CLASSES

    per_class = summary.get("per_class", {})
    if not per_class:
        return ""
    ranked = len(per_class) > MAX_NAMED_CLASSES
    names = worst_classes_first(per_class) if ranked else list(per_class)
    return f"<h2>Per class (test){', worst first' if ranked else ''}</h2>" + table(
        ["class", "P@1", "MAP@R", "images"],
        [[c, per_class[c]["precision_at_1"], per_class[c]["map_at_r"], per_class[c]["n"]]
         for c in names])


def _figures(run_dir: Path) -> list[str]:
    """Every plot of RUN_PLOTS the run has, then any other PNG in plots/ (a task's own),
    captioned by the title stored in the PNG."""
    out = []
    known = {rel for rel, _ in RUN_PLOTS}
    others = [(p.name, Image.open(p).info.get("Title", p.stem.replace("_", " ")))
              for p in sorted((run_dir / "plots").glob("*.png")) if p.name not in known]
    for rel, caption in (*RUN_PLOTS[:-1], *others, RUN_PLOTS[-1]):
        path = run_dir / "plots" / rel
        if path.is_file():
            out.append(f'<figure><img alt="{html.escape(rel)}" src="{data_uri(path)}">'
                       f"<figcaption>{html.escape(caption)}</figcaption></figure>")
    return out


def _resolved_config(run_dir: Path) -> str:
    """The config with every interpolation as the run resolved it (data root included),
    from its last checkpoint; "" if there is none."""
    last = run_dir / "checkpoints" / "last.pt"
    if not last.is_file():
        return ""
    state = torch.load(last, map_location="cpu", weights_only=True)
    return OmegaConf.to_yaml(OmegaConf.create(state.get("config", {})))


def write_run_report(run_dir: str | Path) -> Path:
    """run_dir/report.html from summary.json, the Hydra files and plots/."""
    run_dir = Path(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    config = run_dir / ".hydra" / "config.yaml"
    choices = summary.get("choices", {})
    how = "the last" if summary.get("select") == "last" else \
        f"by val {summary.get('monitor')}"
    facts = [["tested epoch", f"{summary.get('best_epoch')} of {summary.get('epochs')} ({how})"],
             ["embedding size", summary.get("embedding_dim")],
             ["classes in training / test", f"{len(summary.get('train_classes', []))} / "
                                            f"{len(summary.get('test_classes', []))}"],
             ["wall time", f"{summary.get('wall_seconds', math.nan):.1f} s (training "
                           f"{summary.get('train_seconds', math.nan):.1f} s, "
                           f"{summary.get('train_samples_per_s', math.nan):.0f} samples/s)"],
             ["device", f"{summary.get('device')} (AMP {summary.get('amp')}), "
                        f"{summary.get('processes', 1)} process(es)"],
             ["versions", ", ".join(f"{k} {v}" for k, v in summary.get("versions", {}).items())]]
    body = [f"<h1>{html.escape(run_dir.name)}</h1>",
            f"<p>{html.escape(' '.join(f'{k}={v}' for k, v in choices.items()))}</p>",
            f"<pre>{html.escape(_command(run_dir))}</pre>",
            f"<h2>Test metrics ({html.escape(summary.get('test_protocol', 'leave-one-out'))})"
            " beside the baselines</h2>",
            _metrics_table(summary), _per_class_table(summary), "<h2>Plots</h2>",
            *_figures(run_dir), "<h2>Run</h2>", table(["", ""], facts)]
    resolved = _resolved_config(run_dir)
    if resolved or config.is_file():
        body += ["<h2>Config (as the run resolved it)</h2>" if resolved else "<h2>Config</h2>",
                 f"<pre>{html.escape(resolved or config.read_text())}</pre>"]
    path = run_dir / "report.html"
    path.write_text(page(f"dmlrun: {run_dir.name}", body))
    return path
