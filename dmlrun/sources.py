"""Images to embed with a trained model: an image folder (any depth, any format Pillow
opens) or a split of a configured dataset. Both give item names, optional labels, the
images as uint8 batches in the model's input shape (decoded by DataLoader workers, so a
folder larger than memory streams through), and display images for HTML pages.

A ``spec`` (a small dict) names a source so that it can be opened again later, e.g. to
draw the neighbours an index returns: ``{"folder": <abs path>, "labels": bool}`` or
``{"dataset": [<overrides>], "split": "test"}``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from dmlrun.data.dataset import Split, chunks
from dmlrun.data.streaming import FileSplit, read_image
from dmlrun.errors import UserError

# formats Pillow can open (its registry also lists some it can only write)
IMAGE_EXTENSIONS = frozenset(ext for ext, fmt in Image.registered_extensions().items()
                             if fmt in Image.OPEN)
SPLITS = ("test", "val", "train", "all")


class EvalReader:
    """One image file -> uint8 (C, S, S) as a run's evaluation reads its files: the run's
    ``transform`` without randomness (``transform=imagenet``: the shorter side resized,
    the centre cropped), or, for a config without one, resized to the model's input.
    Folder sources and query files go through it, so an image embeds the same whether it
    comes from the run's dataset split or from its file."""

    def __init__(self, config: dict, image_size: int, channels: int) -> None:
        node = config.get("transform")
        self.transform = None
        if isinstance(node, dict) and "_target_" in node:
            from hydra.utils import instantiate

            self.transform = instantiate(node)
        self.image_size, self.channels = image_size, channels

    def __call__(self, path: str | Path) -> np.ndarray:
        if self.transform is None:
            return read_image(path, self.image_size, self.channels)
        return self.transform(path, None)


@dataclass
class Batch:
    """One batch of a source: items ``start .. start + len(ok) - 1``; ``images`` (n, C, S, S)
    uint8 holds the readable ones (``ok``, (len,) bool) in order; ``errors``: (item,
    message) for each unreadable one."""

    start: int
    images: torch.Tensor
    ok: torch.Tensor
    errors: list[tuple[int, str]]

    @property
    def positions(self) -> torch.Tensor:
        """(n,) the source positions of ``images``."""
        return self.start + torch.nonzero(self.ok).squeeze(1)


class Source:
    """Names (N,), labels (N,) int64 or None, class names or None, and the ``spec`` that
    reopens it."""

    names: list[str]
    labels: torch.Tensor | None
    class_names: list[str] | None
    spec: dict

    def __len__(self) -> int:
        return len(self.names)

    def batches(self, size: int) -> Iterator[Batch]:
        raise NotImplementedError

    def display(self, i: int) -> Image.Image:
        """Item ``i`` as a picture to show (its own colours and shape)."""
        raise NotImplementedError

    def short_name(self, i: int) -> str:
        """Item ``i``'s name for a caption."""
        return self.names[i]


def embed_batches(run, source: Source, progress: bool | None = None
                  ) -> Iterator[tuple[Batch, torch.Tensor]]:
    """Each batch of ``source`` with the (n, D) embeddings of its readable images (on the
    CPU), embedded by ``run`` (an ``embedder.RunEmbedding``); a progress bar counts images
    (``progress`` None: only on a terminal)."""
    with tqdm(total=len(source), unit="img", desc="embedding",
              disable=None if progress is None else not progress) as bar:
        for batch in source.batches(run.batch_size):
            emb = run(batch.images).cpu() if len(batch.images) else torch.zeros(0, run.dim)
            yield batch, emb
            bar.update(len(batch.ok))


def list_images(root: Path) -> list[Path]:
    """Image files under ``root`` at any depth, sorted by path; hidden files and folders
    (names starting with a dot) are left out."""
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [Path(folder) / f for f in files
                  if not f.startswith(".") and Path(f).suffix.lower() in IMAGE_EXTENSIONS]
    return sorted(found)


class _Files(Dataset):
    """Item i: batch i of files decoded as (images, ok, errors)."""

    def __init__(self, paths: Sequence[Path], size: int, read: EvalReader) -> None:
        self.paths, self.size, self.read = paths, size, read

    def __len__(self) -> int:
        return (len(self.paths) + self.size - 1) // self.size

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, str]]]:
        start = i * self.size
        arrays, ok, errors = [], [], []
        for j, path in enumerate(self.paths[start : start + self.size]):
            try:
                arrays.append(self.read(path))
                ok.append(True)
            except UserError as exc:
                ok.append(False)
                errors.append((start + j, str(exc.__cause__ or exc)))
        images = torch.from_numpy(np.stack(arrays)) if arrays else torch.zeros(
            0, self.read.channels, self.read.image_size, self.read.image_size,
            dtype=torch.uint8)
        return images, torch.tensor(ok), errors


class FolderSource(Source):
    """Every image under ``root``; with ``labels``, each image's label is the first-level
    sub-folder it sits in (class ids by sorted folder name)."""

    def __init__(self, root: str | Path, read: EvalReader, labels: bool = False,
                 workers: int = 2) -> None:
        self.root = Path(root).expanduser().resolve()
        if not self.root.is_dir():
            raise UserError(f"{root} is not a folder")
        self.paths = list_images(self.root)
        if not self.paths:
            raise UserError(f"no images under {self.root} (looked for "
                            f"{', '.join(sorted(IMAGE_EXTENSIONS)[:12])}, ... at any depth)")
        self.names = [str(p) for p in self.paths]
        self.read, self.workers = read, workers
        self.labels, self.class_names = None, None
        if labels:
            tops = [p.relative_to(self.root).parts for p in self.paths]
            if any(len(t) < 2 for t in tops):
                raise UserError(f"--labels needs every image of {self.root} inside a class "
                                "sub-folder (root/<class>/...)")
            self.class_names = sorted({t[0] for t in tops})
            ids = {c: i for i, c in enumerate(self.class_names)}
            self.labels = torch.tensor([ids[t[0]] for t in tops], dtype=torch.long)
        self.spec = {"folder": str(self.root), "labels": labels}

    def batches(self, size: int) -> Iterator[Batch]:
        data = _Files(self.paths, size, self.read)
        workers = min(self.workers, len(data) - 1) if len(data) > 1 else 0
        loader = DataLoader(data, batch_size=None, num_workers=workers,
                            prefetch_factor=2 if workers else None)
        for i, (images, ok, errors) in enumerate(loader):
            yield Batch(i * size, images, ok, errors)

    def display(self, i: int) -> Image.Image:
        with Image.open(self.paths[i]) as img:
            return img.convert("RGB")

    def short_name(self, i: int) -> str:
        return str(self.paths[i].relative_to(self.root))


class SplitSource(Source):
    """A configured dataset's split (``all``: train, val and test in that order); item
    names are ``<dataset>:<split>:<position>``."""

    def __init__(self, config: dict, overrides: Sequence[str], split: str) -> None:
        from dmlrun.evaluate_cli import load_dataset

        if split not in SPLITS:
            raise UserError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
        data = load_dataset(config, list(overrides))
        parts = [("train", data.train), ("val", data.val), ("test", data.test)] \
            if split == "all" else [(split, getattr(data, split))]
        self.split = _concat([p for _, p in parts])
        self.names = [f"{data.name}:{name}:{i}" for name, part in parts
                      for i in range(len(part))]
        self.labels = self.split.labels.cpu()
        self.class_names = list(data.class_names) if data.class_names else None
        self.spec = {"dataset": list(overrides), "split": split}

    def batches(self, size: int) -> Iterator[Batch]:
        for index, images in zip(chunks(len(self), size), self.split.batches(
                chunks(len(self), size)), strict=True):
            yield Batch(int(index[0]), images, torch.ones(len(index), dtype=torch.bool), [])

    def display(self, i: int) -> Image.Image:
        image = self.split.take(torch.tensor([i]))[0].cpu().numpy()
        return Image.fromarray(image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0))


def _concat(parts: list) -> Split | FileSplit:
    if len(parts) == 1:
        return parts[0]
    if all(isinstance(p, Split) for p in parts):
        return Split(torch.cat([p.images for p in parts]), torch.cat([p.labels for p in parts]))
    if all(isinstance(p, FileSplit) for p in parts):
        first = parts[0]
        return FileSplit([f for p in parts for f in p.paths],
                         torch.cat([p.labels for p in parts]), first.image_size,
                         first.channels, first.workers, first.prefetch)
    raise UserError("split=all needs every split in memory or every split streamed")


def open_source(spec: dict, config: dict, image_size: int, channels: int) -> Source:
    """Reopen a source from its ``spec`` (as saved in an index)."""
    if "folder" in spec:
        return FolderSource(spec["folder"], EvalReader(config, image_size, channels),
                            bool(spec.get("labels")))
    return SplitSource(config, spec["dataset"], spec["split"])


def parse_source(tokens: Sequence[str], config: dict, image_size: int, channels: int,
                 labels: bool = False) -> Source:
    """A source from the command line: one folder, or dataset settings such as
    ``dataset=mnist split=test`` (``split`` defaults to test; other settings as for
    ``dmlrun-evaluate``)."""
    tokens = list(tokens)
    if len(tokens) == 1 and "=" not in tokens[0]:
        if not Path(tokens[0]).expanduser().is_dir():
            raise UserError(f"{tokens[0]} is not a folder (give an image folder, or dataset "
                            "settings such as `dataset=mnist split=test`)")
        return FolderSource(tokens[0], EvalReader(config, image_size, channels), labels)
    if not tokens or any("=" not in t for t in tokens):
        raise UserError(f"give one image folder, or dataset settings such as `dataset=mnist "
                        f"split=test`; got {tokens}")
    split = [t.split("=", 1)[1] for t in tokens if t.startswith("split=")]
    rest = [t for t in tokens if not t.startswith("split=")]
    return SplitSource(config, rest, split[-1] if split else "test")
