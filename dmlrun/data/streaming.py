"""Images read from files as they are used, for datasets larger than memory.

A ``FileSplit`` holds file paths and labels; its images are decoded per batch by
DataLoader worker processes (into pinned memory on CUDA) while the device trains on the
previous batch. It has the methods of an in-memory ``Split`` that the run uses (``take``,
``batches``, ``subset``, ``with_labels``, ``to``), so the P x K sampler, the training loop
and evaluation work unchanged; augmentation stays on the device.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from dmlrun.errors import UserError


def decode_image(path: str | Path, image_size: int, channels: int) -> np.ndarray:
    """One image file as uint8 (C, S, S): converted to grey (1) or RGB (3), resized.
    OpenCV reads a file stored as wanted (grey or 3-channel, S x S) about twice as fast as
    PIL; anything to convert or resize goes through PIL, so every path gives PIL's
    pixels."""
    arr = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if arr is not None and arr.dtype == np.uint8 and arr.shape[:2] == (image_size, image_size):
        if channels == 1 and arr.ndim == 2:
            return arr[None]
        if channels == 3 and arr.ndim == 3 and arr.shape[2] == 3:
            return np.ascontiguousarray(arr[:, :, ::-1].transpose(2, 0, 1))  # BGR -> RGB
    return read_image(path, image_size, channels)


def read_image(path: str | Path, image_size: int, channels: int) -> np.ndarray:
    """One image file as uint8 (C, S, S) through PIL alone: decoded in full (a truncated
    or unreadable file raises ``UserError``), converted to grey (1) or RGB (3), resized."""
    mode = {1: "L", 3: "RGB"}[channels]
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode != mode or img.size != (image_size, image_size):  # else: as stored
                img = img.convert(mode).resize((image_size, image_size), Image.BILINEAR)
            arr = np.asarray(img, dtype=np.uint8)
    except (OSError, ValueError, SyntaxError) as exc:  # PIL's errors for bad files
        raise UserError(f"cannot read image {path}: {exc}") from exc
    return arr[None] if channels == 1 else arr.transpose(2, 0, 1)


class _Batches(Dataset):
    """Item i: the decoded uint8 (n_i, C, S, S) images of the i-th index tensor; through
    ``transform`` when given, with a generator drawn from ``seed`` and the batch's indices
    when ``train`` (so a resumed run draws the same crops), else without randomness."""

    def __init__(self, paths: Sequence[str], index_batches: list[torch.Tensor],
                 image_size: int, channels: int, transform: Callable | None = None,
                 train: bool = False, seed: int = 0) -> None:
        self.paths, self.index_batches = paths, index_batches
        self.image_size, self.channels = image_size, channels
        self.transform, self.train, self.seed = transform, train, seed

    def __len__(self) -> int:
        return len(self.index_batches)

    def __getitem__(self, i: int) -> torch.Tensor:
        index = self.index_batches[i].tolist()
        files = [self.paths[j] for j in index]
        if self.transform is None:
            return decode_files(files, self.image_size, self.channels)
        rng = np.random.default_rng([self.seed, len(index), *index[:16]]) if self.train \
            else None
        if not files:
            return torch.zeros(0, self.channels, self.image_size, self.image_size,
                               dtype=torch.uint8)
        return torch.from_numpy(np.stack([self.transform(f, rng) for f in files]))


def decode_files(paths: Sequence[str], image_size: int, channels: int) -> torch.Tensor:
    """(len(paths), C, S, S) uint8 images, as the in-memory loader reads them."""
    if not paths:
        return torch.zeros(0, channels, image_size, image_size, dtype=torch.uint8)
    return torch.from_numpy(np.stack([decode_image(p, image_size, channels) for p in paths]))


class FileSplit:
    """One split whose images stay on disk: ``paths`` (N,) and ``labels`` (N,) int64 on the
    split's device; images decoded on ``workers`` DataLoader processes, ``prefetch``
    batches ahead each. With a ``transform`` (``data/transforms.py``), images are decoded
    through it: with random crops and flips for a ``train`` split (seeded by ``seed`` and
    each batch's indices), without randomness otherwise. ``query_count``: for a test set
    graded query against gallery (In-Shop), the first ``query_count`` items are the
    queries and the rest the gallery; None: leave-one-out."""

    def __init__(self, paths: Sequence[str], labels: torch.Tensor, image_size: int,
                 channels: int, workers: int = 2, prefetch: int = 4,
                 transform: Callable | None = None, train: bool = False, seed: int = 0,
                 query_count: int | None = None) -> None:
        self.paths, self.labels = list(paths), labels
        self.image_size, self.channels = image_size, channels
        self.workers, self.prefetch = workers, prefetch
        self.transform, self.train, self.seed = transform, train, seed
        self.query_count = query_count

    def __len__(self) -> int:
        return len(self.labels)

    def _like(self, paths: Sequence[str], labels: torch.Tensor) -> FileSplit:
        return FileSplit(paths, labels, self.image_size, self.channels, self.workers,
                         self.prefetch, self.transform, self.train, self.seed)

    def to(self, device: torch.device | str) -> FileSplit:
        moved = self._like(self.paths, self.labels.to(device))
        moved.query_count = self.query_count
        return moved

    def subset(self, index: torch.Tensor) -> FileSplit:
        index = index.cpu()
        return self._like([self.paths[i] for i in index.tolist()],
                          self.labels[index.to(self.labels.device)])

    def with_labels(self, labels: torch.Tensor) -> FileSplit:
        return self._like(self.paths, labels)

    def _decoder(self, rows: list[torch.Tensor], train: bool) -> _Batches:
        return _Batches(self.paths, rows, self.image_size, self.channels, self.transform,
                        train, self.seed)

    def take(self, index: torch.Tensor) -> torch.Tensor:
        """(len(index), C, S, S) uint8 images decoded here (without random transforms), on
        the split's device."""
        return self._decoder([index.cpu()], False)[0].to(self.labels.device)

    def batches(self, index_batches: Iterable[torch.Tensor]) -> Iterator[torch.Tensor]:
        """The images of each index tensor in turn, decoded ahead by the workers and
        copied to the device without blocking (from pinned memory on CUDA)."""
        device = self.labels.device
        rows = list(index_batches.cpu()) if isinstance(index_batches, torch.Tensor) else \
            [i.cpu() for i in index_batches]  # one copy from the device, not one per row
        # its own generator: the workers' seeds are not drawn from the global one, which
        # the training steps draw from (augmentation), so streaming changes no random draw
        loader = DataLoader(self._decoder(rows, self.train), batch_size=None, shuffle=False,
                            num_workers=self.workers, pin_memory=device.type == "cuda",
                            prefetch_factor=self.prefetch if self.workers else None,
                            generator=torch.Generator().manual_seed(0))
        for images in loader:
            yield images.to(device, non_blocking=True)
