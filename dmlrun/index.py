"""A searchable index of images embedded by a trained run: ``Index.build``, ``add``,
``search``, ``save``, ``load`` (the ``dmlrun-index`` command does the same).

Exact search is the metrics' own (``metrics.nearest_neighbours``: the run's distance, ties
by index), so searching a run's test split reproduces its test metrics to the digit.
``kind="ivf"`` or ``"hnsw"`` adds an approximate faiss index (``dmlrun.ann``), checked
against exact search on a sample when it is built.

On disk (one folder)::

    index.json        what it holds and was built with; written last (the commit point)
    part-NNNNN.npy    (n, D) float32 embeddings, one file per chunk of images
    part-NNNNN.jsonl  the chunk's items: {"name": ..., "label": ...}
    ann-G.faiss       the approximate index, generation G (kind ivf or hnsw)

A build writes into a hidden sibling folder and renames it into place at the end; ``add``
writes new parts and a new faiss file first and replaces ``index.json`` last. An
interruption therefore leaves the old index or none, never half of one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dmlrun import __version__
from dmlrun.embedder import RunEmbedding
from dmlrun.errors import UserError
from dmlrun.search import nearest_neighbours
from dmlrun.sources import Source, embed_batches, open_source, parse_source

FORMAT = "dmlrun-index-1"
KINDS = ("exact", "ivf", "hnsw")
PART_ROWS = 65536  # images per part file
SKIPPED_KEPT = 50  # unreadable files named in index.json (all are counted)


@dataclass
class Hits:
    """Search results: ``indices`` (Q, k) into the index, ``distances`` (Q, k) in the run's
    distance, nearest first; ``names`` (Q lists of k) item names, ``labels`` or None."""

    indices: torch.Tensor
    distances: torch.Tensor
    names: list[list[str]]
    labels: torch.Tensor | None


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


class Index:
    """Embeddings (N, D) of named images (labels when the source had them), the run that
    embedded them and, for ``kind`` ivf or hnsw, an approximate faiss index."""

    def __init__(self, folder: Path, meta: dict, run: RunEmbedding | None = None) -> None:
        self.folder, self.meta, self._run = folder, meta, run
        self._emb: torch.Tensor | None = None
        self._items: list[dict] | None = None
        self._ann = None

    # ---- building ----------------------------------------------------------------
    @classmethod
    def build(cls, run: str | Path | RunEmbedding, source: Source | Sequence[str],
              out: str | Path, kind: str = "exact", device: str = "auto",
              progress: bool | None = None, **ann_options: int) -> Index:
        """Embed every image of ``source`` (a ``Source`` or command-line tokens: a folder or
        ``dataset=... split=...``) with the run's model and save the index in ``out``, a
        new folder. ``kind``: exact, ivf or hnsw (faiss; ``ann_options`` as in
        ``ann.build``)."""
        if kind not in KINDS:
            raise UserError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
        out = Path(out)
        if out.exists():
            raise UserError(f"{out} exists; refusing to overwrite it (choose a new --out)")
        if kind != "exact":
            from dmlrun import ann

            ann.faiss_module()  # a missing faiss is said before any embedding
        run = run if isinstance(run, RunEmbedding) else RunEmbedding(run, device)
        if not isinstance(source, Source):
            source = parse_source(source, run.config, run.image_size, run.channels)
        tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
        meta = {"format": FORMAT, "dmlrun": __version__, "kind": "exact",
                "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "run": str(run.checkpoint.parent.parent.resolve()),
                "checkpoint": str(run.checkpoint.resolve()),
                "checkpoint_sha256": file_sha256(run.checkpoint), "epoch": run.epoch,
                "dim": run.dim, "distance": {"name": run.distance.name,
                                             "normalize": bool(run.distance.normalize)},
                "input": {"channels": run.channels, "image_size": run.image_size},
                "sources": [], "parts": [], "count": 0, "skipped": [], "skipped_count": 0}
        try:
            tmp.mkdir(parents=True)
            index = cls(tmp, meta, run)
            index._embed_into(source, progress)
            if kind != "exact":
                index._build_ann(kind, ann_options)
            _write_json(tmp / "index.json", index.meta)
            os.rename(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        index.folder = out
        return index

    def add(self, source: Source | Sequence[str], progress: bool | None = None) -> int:
        """Embed ``source`` with the index's run and append it; returns the images added.
        The approximate index, if any, is extended and its recall measured again."""
        if self.folder is None:
            raise UserError("save the index before adding to it")
        run = self.run()
        if not isinstance(source, Source):
            source = parse_source(source, run.config, run.image_size, run.channels)
        meta = json.loads(json.dumps(self.meta))
        old_parts, old_ann = len(meta["parts"]), meta.get("ann", {}).get("file")
        try:
            before = self.count
            self._embed_into(source, progress)
            self._emb, self._items = None, None
            if self.kind != "exact":
                self._extend_ann(before)
            _write_json(self.folder / "index.json", self.meta)
        except BaseException:
            for part in self.meta["parts"][old_parts:]:
                for f in (part["embeddings"], part["items"]):
                    (self.folder / f).unlink(missing_ok=True)
            new_ann = self.meta.get("ann", {}).get("file")
            if new_ann and new_ann != old_ann:
                (self.folder / new_ann).unlink(missing_ok=True)
            self.meta, self._emb, self._items, self._ann = meta, None, None, None
            raise
        if old_ann and old_ann != self.meta["ann"]["file"]:
            (self.folder / old_ann).unlink(missing_ok=True)
        return self.count - before

    def _embed_into(self, source: Source, progress: bool | None) -> None:
        """Embed ``source`` in batches and write parts of up to PART_ROWS rows."""
        run, meta = self.run(), self.meta
        emb_buf: list[np.ndarray] = []
        items_buf: list[dict] = []
        added = 0
        for batch, emb in embed_batches(run, source, progress):
            for item, message in batch.errors:
                meta["skipped_count"] += 1
                if len(meta["skipped"]) < SKIPPED_KEPT:
                    meta["skipped"].append({"name": source.names[item], "error": message})
            emb_buf.append(emb.numpy())
            items_buf += [_item(source, int(i)) for i in batch.positions]
            added += len(emb)
            while sum(len(e) for e in emb_buf) >= PART_ROWS:
                emb_buf, items_buf = self._write_part(emb_buf, items_buf, PART_ROWS)
        if added == 0:
            raise UserError(f"no readable images in {_describe(source)} "
                            f"({meta['skipped_count']} unreadable)")
        if sum(len(e) for e in emb_buf):
            self._write_part(emb_buf, items_buf, None)
        meta["count"] += added
        meta["sources"].append({**source.spec, "count": added})
        meta["has_labels"] = meta.get("has_labels", True) and source.labels is not None
        if source.class_names and "class_names" not in meta:
            meta["class_names"] = list(source.class_names)

    def _write_part(self, emb_buf: list[np.ndarray], items_buf: list[dict], rows: int | None
                    ) -> tuple[list[np.ndarray], list[dict]]:
        """Write the first ``rows`` buffered rows (all when None) as the next part; return
        what is left."""
        emb = np.concatenate(emb_buf)
        rows = len(emb) if rows is None else rows
        n = len(self.meta["parts"])
        names = {"embeddings": f"part-{n:05d}.npy", "items": f"part-{n:05d}.jsonl"}
        np.save(self.folder / names["embeddings"], np.ascontiguousarray(emb[:rows]))
        (self.folder / names["items"]).write_text(
            "".join(json.dumps(it) + "\n" for it in items_buf[:rows]))
        self.meta["parts"].append({**names, "count": rows})
        return ([emb[rows:]] if rows < len(emb) else []), items_buf[rows:]

    # ---- loading and saving ------------------------------------------------------
    @classmethod
    def load(cls, folder: str | Path, run: str | Path | None = None,
             device: str = "auto") -> Index:
        """An index saved by ``build``; with ``run``, checked to come from that run's
        model (else ``UserError``)."""
        folder = Path(folder)
        path = folder / "index.json"
        if not path.is_file():
            raise UserError(f"{folder} is not a dmlrun index (no index.json)")
        try:
            meta = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise UserError(f"{path} is not valid JSON: {exc}") from exc
        if meta.get("format") != FORMAT:
            raise UserError(f"{path} is not a {FORMAT} index")
        index = cls(folder, meta)
        index._device = device
        if run is not None:
            index._run = index._checked_run(RunEmbedding(run, device))
        return index

    def save(self, folder: str | Path) -> Path:
        """Copy the index to ``folder`` (a new folder), atomically."""
        folder = Path(folder)
        if folder.exists():
            raise UserError(f"{folder} exists; refusing to overwrite it")
        tmp = folder.parent / f".{folder.name}.partial-{os.getpid()}"
        try:
            shutil.copytree(self.folder, tmp)
            os.rename(tmp, folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return folder

    def run(self) -> RunEmbedding:
        """The run's model that embedded the index (loaded and checked on first use)."""
        if self._run is None:
            ckpt = Path(self.meta["checkpoint"])
            if not ckpt.is_file():
                raise UserError(f"the index {self.folder} was built with {ckpt}, which no "
                                "longer exists")
            self._run = self._checked_run(RunEmbedding(ckpt, getattr(self, "_device", "auto")))
        return self._run

    def _checked_run(self, run: RunEmbedding) -> RunEmbedding:
        if run.dim != self.dim:
            raise UserError(f"the index {self.folder} holds {self.dim}-D embeddings; the model "
                            f"in {run.checkpoint} gives {run.dim}-D")
        if file_sha256(run.checkpoint) != self.meta["checkpoint_sha256"]:
            raise UserError(f"the index {self.folder} was built with another model "
                            f"({self.meta['checkpoint']}); {run.checkpoint} differs: build a "
                            "new index for it")
        return run

    # ---- contents ----------------------------------------------------------------
    @property
    def kind(self) -> str:
        return self.meta["kind"]

    @property
    def dim(self) -> int:
        return int(self.meta["dim"])

    @property
    def count(self) -> int:
        return int(self.meta["count"])

    def __len__(self) -> int:
        return self.count

    @property
    def embeddings(self) -> torch.Tensor:
        """(N, D) float32, read from the part files on first use."""
        if self._emb is None:
            parts = [np.load(self.folder / p["embeddings"], mmap_mode="r")
                     for p in self.meta["parts"]]
            self._emb = torch.from_numpy(np.concatenate(parts)) if parts else torch.zeros(
                0, self.dim)
        return self._emb

    @property
    def items(self) -> list[dict]:
        if self._items is None:
            self._items = [json.loads(line) for p in self.meta["parts"]
                           for line in (self.folder / p["items"]).read_text().splitlines()]
        return self._items

    @property
    def names(self) -> list[str]:
        return [it["name"] for it in self.items]

    @property
    def labels(self) -> torch.Tensor | None:
        if not self.meta.get("has_labels"):
            return None
        return torch.tensor([it["label"] for it in self.items], dtype=torch.long)

    def distance(self):
        from dmlrun.distances import (
            CosineDistance,
            DotProductDistance,
            EuclideanDistance,
            SquaredEuclideanDistance,
        )

        kinds = {"euclidean": EuclideanDistance, "squared": SquaredEuclideanDistance,
                 "cosine": CosineDistance, "dot": DotProductDistance}
        d = self.meta["distance"]
        if d["name"] not in kinds:  # a custom distance: the run's own object
            return self.run().distance
        return kinds[d["name"]](normalize=d["normalize"])

    # ---- search ------------------------------------------------------------------
    def search(self, queries: torch.Tensor, k: int = 10,
               exclude: torch.Tensor | None = None, exact: bool | None = None) -> Hits:
        """The ``k`` nearest items of (Q, D) query embeddings; ``exclude`` (Q,) an item to
        leave out of each row (-1: none). ``exact``: None uses the index's kind."""
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise UserError(f"queries must be (Q, {self.dim}) embeddings, got "
                            f"{tuple(queries.shape)}")
        if k < 1:
            raise UserError(f"k must be at least 1, got {k}")
        queries = queries.float().cpu()
        if exact is None:
            exact = self.kind == "exact"
        if exact:
            idx, dist = nearest_neighbours(queries, self.embeddings, k, self.distance(),
                                           exclude)
        else:
            from dmlrun import ann

            idx, dist = ann.search(self._ann_index(), queries, k, self.meta["distance"],
                                   exclude)
        names = self.names
        labels = self.labels
        return Hits(idx, dist, [[names[j] for j in row] for row in idx.tolist()],
                    None if labels is None else labels[idx])

    def search_images(self, images: torch.Tensor, k: int = 10) -> Hits:
        """Search with (Q, C, H, W) uint8 images, embedded by the index's run."""
        return self.search(self.run()(images).cpu(), k)

    def search_files(self, paths: Sequence[str | Path], k: int = 10) -> Hits:
        """Search with image files (read as the run's evaluation reads them)."""
        from dmlrun.sources import EvalReader

        run = self.run()
        read = EvalReader(run.config, run.image_size, run.channels)
        images = torch.from_numpy(np.stack([read(p) for p in paths]))
        return self.search_images(images, k)

    def search_items(self, items: torch.Tensor | Sequence[int] | None = None, k: int = 10,
                     exact: bool | None = None) -> Hits:
        """Search with the index's own items (all when None), each left out of its own
        results."""
        items = torch.arange(self.count) if items is None else torch.as_tensor(items).long()
        if len(items) and (int(items.min()) < 0 or int(items.max()) >= self.count):
            raise UserError(f"items must be in 0..{self.count - 1}")
        return self.search(self.embeddings[items], k, exclude=items, exact=exact)

    def source(self, i: int) -> tuple[Source, int]:
        """The source holding item ``i`` (reopened) and the item's position in it."""
        start = 0
        for spec in self.meta["sources"]:
            if i < start + spec["count"]:
                run = self.run()
                src = open_source({k: v for k, v in spec.items() if k != "count"},
                                  run.config, run.image_size, run.channels)
                return src, src.names.index(self.names[i])
            start += spec["count"]
        raise IndexError(i)

    def display_images(self, items: Sequence[int]) -> Iterator:
        """PIL images of index items (sources reopened once each)."""
        opened: dict[int, tuple[Source, dict[str, int]]] = {}
        bounds = np.cumsum([s["count"] for s in self.meta["sources"]])
        names = self.names
        for i in items:
            s = int(np.searchsorted(bounds, i, side="right"))
            if s not in opened:
                src = self.source(int(i))[0]
                opened[s] = (src, {n: j for j, n in enumerate(src.names)})
            src, where = opened[s]
            yield src.display(where[names[i]])

    # ---- approximate -------------------------------------------------------------
    def _ann_index(self):
        if self._ann is None:
            from dmlrun import ann

            self._ann = ann.read(self.folder / self.meta["ann"]["file"])
        return self._ann

    def _build_ann(self, kind: str, options: dict) -> None:
        from dmlrun import ann

        self._ann = ann.build(kind, self.embeddings, self.meta["distance"], **options)
        self._save_ann(kind, options, generation=1)

    def _extend_ann(self, before: int) -> None:
        from dmlrun import ann

        index = ann.read(self.folder / self.meta["ann"]["file"])
        ann.add(index, self.embeddings[before:], self.meta["distance"])
        self._ann = index
        self._save_ann(self.kind, self.meta["ann"]["options"],
                       generation=int(self.meta["ann"]["generation"]) + 1)

    def _save_ann(self, kind: str, options: dict, generation: int) -> None:
        from dmlrun import ann

        name = f"ann-{generation}.faiss"
        ann.write(self._ann, self.folder / name)
        self.meta["kind"] = kind
        self.meta["ann"] = {"file": name, "generation": generation,
                            "options": ann.options_of(self._ann, options),
                            **self._check_ann()}

    def _check_ann(self, sample: int = 1000, k: int = 10, seed: int = 0) -> dict:
        """Recall@k of the approximate search against exact search on ``sample`` items
        (each left out of its own results), and the speed-up over exact search."""
        g = torch.Generator().manual_seed(seed)
        items = torch.randperm(self.count, generator=g)[:sample]
        k = min(k, self.count - 1)
        t0 = time.perf_counter()
        exact = self.search_items(items, k, exact=True).indices
        t1 = time.perf_counter()
        approx = self.search_items(items, k, exact=False).indices
        t2 = time.perf_counter()
        found = (approx[:, :, None] == exact[:, None, :]).any(2).float().mean()
        return {"recall_at_k": round(float(found), 4), "k": k, "sample": len(items),
                "exact_s": round(t1 - t0, 4), "approx_s": round(t2 - t1, 4),
                "speedup": round((t1 - t0) / max(t2 - t1, 1e-9), 2)}


def _item(source: Source, i: int) -> dict:
    item: dict = {"name": source.names[i]}
    if source.labels is not None:
        item["label"] = int(source.labels[i])
    return item


def _describe(source: Source) -> str:
    spec = source.spec
    return spec["folder"] if "folder" in spec else f"{' '.join(spec['dataset'])} " \
        f"split={spec['split']}"
