"""In-memory image datasets and seeded, stratified splits."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from dmlrun.errors import ConfigError


@dataclass
class Split:
    """One split held in memory: ``images`` (N, C, H, W) uint8 and ``labels`` (N,) int64,
    same device. ``FileSplit`` (data/streaming.py) offers the same methods for images read
    from files as they are used; code that reads a split's images uses only these."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def to(self, device: torch.device | str) -> Split:
        return Split(self.images.to(device), self.labels.to(device))

    def subset(self, index: torch.Tensor) -> Split:
        index = index.to(self.labels.device)
        return Split(self.images[index], self.labels[index])

    def with_labels(self, labels: torch.Tensor) -> Split:
        """The same images with other (N,) labels (e.g. labels a task assigned)."""
        return Split(self.images, labels)

    def take(self, index: torch.Tensor) -> torch.Tensor:
        """(len(index), C, H, W) uint8 images, on the split's device."""
        return self.images[index.to(self.images.device)]

    def batches(self, index_batches: Iterable[torch.Tensor]) -> Iterator[torch.Tensor]:
        """The uint8 images of each index tensor in turn (an epoch's rows, or chunks)."""
        for index in index_batches:
            yield self.take(index)


def chunks(n: int, size: int) -> list[torch.Tensor]:
    """0..n-1 in consecutive index tensors of at most ``size``."""
    return list(torch.arange(n).split(size))


@dataclass
class TensorDataset:
    """Train / validation / test splits of one dataset (each a ``Split`` or a
    ``FileSplit``)."""

    name: str
    num_classes: int
    train: Any
    val: Any
    test: Any
    class_names: Sequence[str] | None = None

    def to(self, device: torch.device | str) -> TensorDataset:
        return TensorDataset(
            self.name, self.num_classes, self.train.to(device), self.val.to(device),
            self.test.to(device), self.class_names,
        )


def images_to_float(images: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) uint8 -> float32 in [0, 1] on the same device."""
    return images.float().div_(255.0)


def stratified_split(
    labels: torch.Tensor, size: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick ``size`` indices with class proportions kept; return (picked, rest), each sorted.

    Per class, round(size * class_share) items are drawn at random (the largest
    remainders absorb the rounding so that exactly ``size`` are picked).
    """
    n = len(labels)
    if not 0 <= size <= n:
        raise ValueError(f"cannot pick {size} of {n} items")
    classes, counts = torch.unique(labels, return_counts=True)
    exact = counts.double() * size / n
    quota = exact.floor().long()
    short = size - int(quota.sum())
    if short > 0:
        quota[torch.argsort(exact - quota, descending=True)[:short]] += 1
    picked = []
    for c, q in zip(classes.tolist(), quota.tolist(), strict=True):
        members = torch.nonzero(labels == c).flatten()
        picked.append(members[torch.randperm(len(members), generator=generator)[:q]])
    chosen = torch.cat(picked).sort().values
    mask = torch.ones(n, dtype=torch.bool)
    mask[chosen] = False
    return chosen, torch.nonzero(mask).flatten()


def make_splits(
    name: str,
    num_classes: int,
    train_pool: Split,
    test: Split,
    val_size: int,
    train_size: int | None,
    test_size: int | None,
    seed: int,
    train_classes: Sequence[int] | None = None,
    class_names: Sequence[str] | None = None,
    val_classes: Sequence[int] | None = None,
) -> TensorDataset:
    """Hold out a stratified validation set from ``train_pool``; optionally cap train and test.

    With ``train_classes`` (class-disjoint protocol), training and validation use only
    those classes and the test set only the others, so test retrieval is on unseen classes.
    With ``val_classes``, validation is every training-pool image of those classes and
    training has none of them (class-disjoint model selection, as in the Metric Learning
    Reality Check); with ``train_classes`` too, the test set has neither list's classes.
    """
    if val_classes is not None:
        return _class_disjoint_val(name, num_classes, train_pool, test, train_size, test_size,
                                   seed, train_classes, class_names, val_classes)
    g = torch.Generator().manual_seed(seed)
    if train_classes is not None:
        seen = torch.tensor(sorted({int(c) for c in train_classes}))
        all_classes = torch.unique(torch.cat([train_pool.labels, test.labels]))
        if len(seen) < 2 or not torch.isin(seen, all_classes).all() or len(seen) == len(
                all_classes):
            raise ConfigError(
                f"dataset.train_classes={list(train_classes)} must name at least 2 of the "
                f"classes {all_classes.tolist()} and leave at least one for testing")
        train_pool = train_pool.subset(torch.nonzero(torch.isin(train_pool.labels, seen))[:, 0])
        test = test.subset(torch.nonzero(~torch.isin(test.labels, seen))[:, 0])
    if not 0 < val_size < len(train_pool):
        raise ConfigError(f"dataset.val_size={val_size} must be between 1 and "
                          f"{len(train_pool) - 1} (the training pool)")
    val_idx, train_idx = stratified_split(train_pool.labels, val_size, g)
    train = train_pool.subset(train_idx)
    if train_size is not None and train_size < len(train):
        train = train.subset(stratified_split(train.labels, train_size, g)[0])
    if test_size is not None and test_size < len(test):
        test = test.subset(stratified_split(test.labels, test_size, g)[0])
    return TensorDataset(name, num_classes, train, train_pool.subset(val_idx), test, class_names)


def _class_disjoint_val(
    name: str, num_classes: int, train_pool: Split, test: Split, train_size: int | None,
    test_size: int | None, seed: int, train_classes: Sequence[int] | None,
    class_names: Sequence[str] | None, val_classes: Sequence[int],
) -> TensorDataset:
    """``make_splits`` with validation on ``val_classes``, none of them in training."""
    val = torch.tensor(sorted({int(c) for c in val_classes}))
    present = torch.unique(train_pool.labels)
    train = present[~torch.isin(present, val)] if train_classes is None else \
        torch.tensor(sorted({int(c) for c in train_classes}))
    if len(val) < 2 or not torch.isin(val, present).all() or torch.isin(val, train).any() \
            or len(train) < 2:
        raise ConfigError(
            f"dataset.val_classes={list(val_classes)} must name at least 2 classes of the "
            f"training images {present.tolist()}, none of dataset.train_classes, and leave "
            "at least 2 for training")
    g = torch.Generator().manual_seed(seed)
    val_split = train_pool.subset(torch.nonzero(torch.isin(train_pool.labels, val))[:, 0])
    train_split = train_pool.subset(torch.nonzero(torch.isin(train_pool.labels, train))[:, 0])
    if train_classes is not None:
        seen = torch.cat([train, val])
        test = test.subset(torch.nonzero(~torch.isin(test.labels, seen))[:, 0])
        if len(test) == 0:
            raise ConfigError("dataset.train_classes and dataset.val_classes leave no class "
                              "for testing")
    if train_size is not None and train_size < len(train_split):
        train_split = train_split.subset(stratified_split(train_split.labels, train_size, g)[0])
    if test_size is not None and test_size < len(test):
        test = test.subset(stratified_split(test.labels, test_size, g)[0])
    return TensorDataset(name, num_classes, train_split, val_split, test, class_names)
