"""Bring-your-own images: one sub-folder per class (``root/<class>/<image>``)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dmlrun.data.dataset import Split, TensorDataset, make_splits, stratified_split
from dmlrun.errors import UserError

EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


def _read_folder(root: Path, classes: list[str], image_size: int, channels: int) -> Split:
    mode = {1: "L", 3: "RGB"}[channels]
    images, labels = [], []
    for label, name in enumerate(classes):
        files = sorted(p for p in (root / name).iterdir() if p.suffix.lower() in EXTENSIONS)
        for path in files:
            try:
                with Image.open(path) as img:
                    img = img.convert(mode).resize((image_size, image_size), Image.BILINEAR)
                    arr = np.asarray(img, dtype=np.uint8)
            except OSError as exc:
                raise UserError(f"cannot read image {path}: {exc}") from exc
            images.append(arr[None] if channels == 1 else arr.transpose(2, 0, 1))
            labels.append(label)
    if not images:
        raise UserError(f"no images ({', '.join(sorted(EXTENSIONS))}) under {root}")
    return Split(torch.from_numpy(np.stack(images)), torch.tensor(labels, dtype=torch.long))


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
    **_: object,
) -> TensorDataset:
    """Load ``root/<class>/*.png`` (and so on) into memory as uint8 (N, C, S, S) images,
    resized to ``image_size`` and converted to 1 (grey) or 3 (RGB) ``channels``.

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
    pool = _read_folder(root_path, classes, image_size, channels)
    if test_root is not None:
        test_path = Path(test_root).expanduser()
        extra = sorted(p.name for p in test_path.iterdir() if p.is_dir()) if \
            test_path.is_dir() else []
        if not test_path.is_dir() or set(extra) - set(classes):
            raise UserError(f"test folder {test_path} must exist and use class folders of "
                            f"{root_path}")
        test = _read_folder(test_path, classes, image_size, channels)
    else:
        g = torch.Generator().manual_seed(seed + 1)
        test_idx, train_idx = stratified_split(pool.labels, round(len(pool) * test_fraction), g)
        test, pool = pool.subset(test_idx), pool.subset(train_idx)
    return make_splits(name, len(classes), pool, test, val_size, train_size, test_size, seed,
                       train_classes, classes)
