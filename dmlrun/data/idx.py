"""MNIST and Fashion-MNIST from torchvision's raw layout: ``<root>/<Name>/raw/*-idx?-ubyte``."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Sequence
from pathlib import Path

from torchvision.datasets import MNIST, FashionMNIST

from dmlrun.data.dataset import Split, TensorDataset, make_splits
from dmlrun.errors import UserError

log = logging.getLogger(__name__)

IDX_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                   "Sneaker", "Bag", "Ankle boot")


def _missing(raw_dir: Path) -> list[str]:
    return [f for f in IDX_FILES if not (raw_dir / f).is_file()]


def _try_download(dataset_cls, root: Path) -> str | None:
    """Let torchvision fetch the files; return the failure reason, or None on success.
    A failed download removes the folders it created (``<root>/<Name>/raw``), so a
    failed load leaves nothing behind."""
    raw = root / dataset_cls.__name__ / "raw"
    created = [p for p in (raw, *raw.parents) if not p.exists()]
    try:
        for train in (True, False):
            dataset_cls(str(root), train=train, download=True)
    except Exception as exc:  # no network, proxy, disk: all mean "provide the files"
        for path in created:  # deepest first; only what this attempt made
            shutil.rmtree(path, ignore_errors=True)
        return f"{type(exc).__name__}: {exc}".strip()
    return None


def load_idx_dataset(
    dataset_cls,
    root: str,
    name: str,
    val_size: int,
    train_size: int | None,
    test_size: int | None,
    download: bool,
    seed: int,
    train_classes: Sequence[int] | None = None,
    class_names: Sequence[str] | None = None,
    val_classes: Sequence[int] | None = None,
) -> TensorDataset:
    """Load a torchvision MNIST-style dataset into memory as uint8 (N, 1, 28, 28) images and
    int64 labels on the CPU, then split (see ``make_splits``). Missing files are downloaded
    when ``download`` is true and the network allows, otherwise a UserError names them."""
    folder = dataset_cls.__name__
    root_path = Path(root).expanduser()
    raw_dir = root_path / folder / "raw"
    missing = _missing(raw_dir)
    reason = None
    if missing and download:
        log.info("%s files missing under %s; trying to download them", folder, raw_dir)
        reason = _try_download(dataset_cls, root_path)
        missing = _missing(raw_dir)
    if missing:
        if reason and len(reason) > 200:
            reason = reason[:197] + "..."  # said so, rather than cut mid-word
        how = f"the download failed ({reason})" if reason else "downloading is off"
        raise UserError(
            f"{folder} data not found: {', '.join(missing)} missing in {raw_dir.resolve()} "
            f"and {how}. Put the four uncompressed files (torchvision's raw layout) there, "
            f"or point the data root elsewhere with DMLRUN_DATA_DIR=<dir> or "
            f"dataset.root=<dir> (files under <dir>/{folder}/raw/)"
            + ("." if download else "; with network access, dataset.download=true fetches "
               "them.")
        )
    try:
        train = dataset_cls(str(root_path), train=True, download=False)
        test = dataset_cls(str(root_path), train=False, download=False)
    except Exception as exc:
        raise UserError(f"could not read {folder} files in {raw_dir}: {exc}") from exc
    train_pool = Split(train.data.unsqueeze(1).contiguous(), train.targets.long())
    test_split = Split(test.data.unsqueeze(1).contiguous(), test.targets.long())
    return make_splits(name, 10, train_pool, test_split, val_size, train_size, test_size, seed,
                       train_classes, class_names, val_classes)


def load_mnist(
    root: str, val_size: int = 5000, train_size: int | None = None,
    test_size: int | None = None, download: bool = True, seed: int = 0,
    train_classes: Sequence[int] | None = None, name: str = "mnist",
    val_classes: Sequence[int] | None = None, **_: object,
) -> TensorDataset:
    """MNIST digits (60k train / 10k test). Extra config keys (channels, mean, ...) are
    for the model and ignored here."""
    return load_idx_dataset(MNIST, root, name, val_size, train_size, test_size, download, seed,
                            train_classes, None, val_classes)


def load_fashion_mnist(
    root: str, val_size: int = 5000, train_size: int | None = None,
    test_size: int | None = None, download: bool = True, seed: int = 0,
    train_classes: Sequence[int] | None = None, name: str = "fashion_mnist",
    val_classes: Sequence[int] | None = None, **_: object,
) -> TensorDataset:
    """Fashion-MNIST (Zalando; 60k train / 10k test, 10 clothing classes)."""
    return load_idx_dataset(FashionMNIST, root, name, val_size, train_size, test_size,
                            download, seed, train_classes, FASHION_CLASSES, val_classes)
