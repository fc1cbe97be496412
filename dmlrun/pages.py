"""Self-contained HTML pages of images (each inlined as a PNG): search results, one row per
query with its neighbours, and a contact sheet per cluster. Every name is HTML-escaped;
the page marks itself once its images decoded (``report.CHECK``)."""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Iterable, Sequence
from pathlib import Path

from PIL import Image

from dmlrun.report import page

THUMB = 96  # thumbnail side, pixels
STYLE = """<style>
.row{display:flex;flex-wrap:wrap;gap:6px;align-items:flex-start;margin:.4em 0 1.2em}
.cell{width:104px;font-size:11px;text-align:center;overflow-wrap:anywhere}
.cell img{display:block;margin:0 auto 2px;image-rendering:pixelated}
.query{border-right:3px solid #444;padding-right:8px}.same{color:#070}.other{color:#b00}
</style>"""


def image_uri(img: Image.Image, side: int = THUMB) -> str:
    """``img`` scaled to fit ``side`` x ``side`` (small images enlarged by whole pixels) as
    a PNG data URI."""
    scale = side / max(img.size)
    size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
    resample = Image.NEAREST if scale >= 1 else Image.LANCZOS
    buf = io.BytesIO()
    img.convert("RGB").resize(size, resample).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def cell(img: Image.Image, caption: str, css: str = "") -> str:
    text = html.escape(caption)
    return (f'<div class="cell {css}"><img alt="{text}" src="{image_uri(img)}">'
            f"{text}</div>")


def _open(path: str | Path) -> Image.Image:
    with Image.open(path) as img:
        return img.convert("RGB")


def write_search_page(index, results: Sequence[dict], files: Sequence[str], out: Path) -> Path:
    """One row per query: the query image, then its neighbours with rank and distance
    (green: the query's label, red: another, when labels are known)."""
    items = sorted({nb["item"] for row in results for nb in row["neighbours"]}
                   | {row["item"] for row in results if "item" in row})
    pictures = dict(zip(items, index.display_images(items), strict=True))
    labels = index.labels
    body = [STYLE, f"<h1>Search: {html.escape(str(index.folder))}</h1>",
            f"<p>{index.count} images, {index.meta['distance']['name']} distance, "
            f"{html.escape(index.kind)} search</p>"]
    file_rows = iter(files)
    for row in results:
        own = row.get("item")
        query = pictures[own] if own is not None else _open(next(file_rows))
        want = None if labels is None or own is None else int(labels[own])
        cells = [cell(query, str(row["query"]), "query")]
        for nb in row["neighbours"]:
            css = "" if want is None else "same" if nb.get("label") == want else "other"
            cells.append(cell(pictures[nb["item"]],
                              f"{nb['rank']}. {nb['distance']:.3f} {nb['name']}", css))
        body.append('<div class="row">' + "".join(cells) + "</div>")
    out.write_text(page(f"dmlrun search: {index.folder}", body))
    return out


def write_cluster_page(out: Path, title: str, clusters: Iterable[tuple[int, int, str, list]],
                       facts: str) -> Path:
    """A contact sheet per cluster: (cluster id, size, description, [(PIL image,
    caption), ...] of its sample)."""
    body = [STYLE, f"<h1>{html.escape(title)}</h1>", facts]
    for cid, size, text, sample in clusters:
        body.append(f"<h2>Cluster {cid}: {size} images</h2><p>{html.escape(text)}</p>")
        body.append('<div class="row">' + "".join(cell(img, cap) for img, cap in sample)
                    + "</div>")
    out.write_text(page(title, body))
    return out
