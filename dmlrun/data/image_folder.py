"""Bring-your-own images: one sub-folder per class (``root/<class>/<image>``)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from dmlrun.data.dataset import Split, TensorDataset, make_splits, stratified_split
from dmlrun.data.streaming import FileSplit, decode_image
from dmlrun.errors import UserError

EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


def _list_folder(root: Path, classes: list[str]) -> tuple[list[str], torch.Tensor]:
    """Image files under ``root/<class>/`` (sorted) and their class ids."""
    paths, labels = [], []
    for label, name in enumerate(classes):
        files = sorted(p for p in (root / name).iterdir() if p.suffix.lower() in EXTENSIONS)
        paths += [str(p) for p in files]
        labels += [label] * len(files)
    if not paths:
        raise UserError(f"no images ({', '.join(sorted(EXTENSIONS))}) under {root}")
    return paths, torch.tensor(labels, dtype=torch.long)


def _read_folder(root: Path, classes: list[str], image_size: int, channels: int,
                 stream: bool, workers: int) -> Split | FileSplit:
    paths, labels = _list_folder(root, classes)
    if stream:
        return FileSplit(paths, labels, image_size, channels, workers)
    return Split(torch.from_numpy(np.stack([decode_image(p, image_size, channels)
                                            for p in paths])), labels)


def _streams(stream: bool | str, n_images: int, image_size: int, channels: int,
             stream_above_mb: float) -> bool:
    if stream == "auto":
        return n_images * channels * image_size**2 / 2**20 > stream_above_mb
    if isinstance(stream, bool):
        return stream
    raise UserError(f"dataset.stream must be true, false or auto, got {stream!r}")


def load_image_folder(
    root: str,
    image_size: int = 28,
    channels: int = 1,
    test_root: str | None = None,
    test_fraction: float = 0.2,
    val_size: int = 100,
    train_size: int | None = None,
    test_size: int | None = None,
    seed: int = 0,
    train_classes: Sequence[int] | None = None,
    name: str = "image_folder",
    stream: bool | str = "auto",
    stream_above_mb: float = 4096.0,
    workers: int = 2,
    val_classes: Sequence[int] | None = None,
    **_: object,
) -> TensorDataset:
    """Load ``root/<class>/*.png`` (and so on) as uint8 (N, C, S, S) images, resized to
    ``image_size`` and converted to 1 (grey) or 3 (RGB) ``channels``: into memory, or,
    with ``stream`` (``"auto"``: when the decoded images would exceed ``stream_above_mb``),
    read from the files per batch on ``workers`` DataLoader processes (``FileSplit``).

    The test set is ``test_root`` (same class folders) when given, else a stratified,
    seeded ``test_fraction`` of ``root``. Class ids follow sorted folder names.
    """
    root_path = Path(root).expanduser()
    if not root_path.is_dir():
        raise UserError(f"image folder {root_path} does not exist (dataset.root)")
    if channels not in (1, 3):
        raise UserError(f"dataset.channels must be 1 or 3, got {channels}")
    classes = sorted(p.name for p in root_path.iterdir() if p.is_dir())
    if len(classes) < 2:
        raise UserError(f"{root_path} needs at least 2 class sub-folders, found {classes}")
    n_files = sum(1 for c in classes for p in (root_path / c).iterdir()
                  if p.suffix.lower() in EXTENSIONS)
    streamed = _streams(stream, n_files, image_size, channels, stream_above_mb)
    pool = _read_folder(root_path, classes, image_size, channels, streamed, workers)
    if test_root is not None:
        test_path = Path(test_root).expanduser()
        extra = sorted(p.name for p in test_path.iterdir() if p.is_dir()) if \
            test_path.is_dir() else []
        if not test_path.is_dir() or set(extra) - set(classes):
            raise UserError(f"test folder {test_path} must exist and use class folders of "
                            f"{root_path}")
        test = _read_folder(test_path, classes, image_size, channels, streamed, workers)
    else:
        g = torch.Generator().manual_seed(seed + 1)
        test_idx, train_idx = stratified_split(pool.labels, round(len(pool) * test_fraction), g)
        test, pool = pool.subset(test_idx), pool.subset(train_idx)
    return make_splits(name, len(classes), pool, test, val_size, train_size, test_size, seed,
                       train_classes, classes, val_classes)
