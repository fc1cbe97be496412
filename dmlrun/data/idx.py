"""MNIST and Fashion-MNIST from torchvision's raw layout: ``<root>/<Name>/raw/*-idx?-ubyte``.

The files are read here (``read_idx``); torchvision is imported only to download them,
since importing it costs every run about two seconds on a CPU (it loads torch's compiler).
"""

from __future__ import annotations

import logging
import math
import shutil
import struct
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

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


def read_idx(path: Path) -> torch.Tensor:
    """An IDX file of unsigned bytes (LeCun's MNIST format: a 4-byte magic number whose
    third byte is the type, 0x08, and fourth the number of dimensions; one big-endian
    uint32 per dimension; the values) as a uint8 tensor of its shape."""
    data = path.read_bytes()
    ndim = data[3] if len(data) >= 4 else 0
    start = 4 + 4 * ndim
    if len(data) < start or data[:3] != b"\x00\x00\x08" or ndim == 0:
        raise ValueError(f"{path.name} is not an IDX file of unsigned bytes")
    shape = struct.unpack(f">{ndim}I", data[4:start])
    if len(data) - start != math.prod(shape):
        raise ValueError(f"{path.name} holds {len(data) - start} values after its header, "
                         f"which says {' x '.join(map(str, shape))}")
    return torch.frombuffer(bytearray(data[start:]), dtype=torch.uint8).reshape(shape)


def _missing(raw_dir: Path) -> list[str]:
    return [f for f in IDX_FILES if not (raw_dir / f).is_file()]


def torchvision_download(folder: str, root: str, train: bool) -> None:
    """Fetch one part of torchvision's dataset class ``folder`` (e.g. ``MNIST``) into
    ``<root>/<folder>/raw``."""
    from torchvision import datasets

    getattr(datasets, folder)(root, train=train, download=True)


def _try_download(folder: str, root: Path, fetch: Callable[[str, str, bool], object]
                  ) -> str | None:
    """Fetch the files with ``fetch``; return the failure reason, or None on success.
    A failed download removes the folders it created (``<root>/<Name>/raw``), so a
    failed load leaves nothing behind."""
    raw = root / folder / "raw"
    created = [p for p in (raw, *raw.parents) if not p.exists()]
    try:
        for train in (True, False):
            fetch(folder, str(root), train)
    except Exception as exc:  # no network, proxy, disk: all mean "provide the files"
        for path in created:  # deepest first; only what this attempt made
            shutil.rmtree(path, ignore_errors=True)
        return f"{type(exc).__name__}: {exc}".strip()
    return None


def load_idx_dataset(
    folder: str,
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
    fetch: Callable[[str, str, bool], object] = torchvision_download,
) -> TensorDataset:
    """Load an MNIST-style dataset from ``<root>/<folder>/raw`` into memory as uint8 (N, 1,
    28, 28) images and int64 labels on the CPU, then split (see ``make_splits``). Missing
    files are downloaded (``fetch(folder, root, train)``) when ``download`` is true and the
    network allows, otherwise a UserError names them."""
    root_path = Path(root).expanduser()
    raw_dir = root_path / folder / "raw"
    missing = _missing(raw_dir)
    reason = None
    if missing and download:
        log.info("%s files missing under %s; trying to download them", folder, raw_dir)
        reason = _try_download(folder, root_path, fetch)
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
    parts = []
    for prefix in ("train", "t10k"):
        try:
            images = read_idx(raw_dir / f"{prefix}-images-idx3-ubyte")
            labels = read_idx(raw_dir / f"{prefix}-labels-idx1-ubyte")
        except (OSError, ValueError) as exc:
            raise UserError(f"could not read {folder} files in {raw_dir}: {exc}") from exc
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise UserError(f"could not read {folder} files in {raw_dir}: {prefix} images of "
                            f"shape {tuple(images.shape)} with labels of shape "
                            f"{tuple(labels.shape)}; expected (N, H, W) and (N,)")
        parts.append(Split(images.unsqueeze(1).contiguous(), labels.long()))
    train_pool, test_split = parts
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
    return load_idx_dataset("MNIST", root, name, val_size, train_size, test_size, download, seed,
                            train_classes, None, val_classes)


def load_fashion_mnist(
    root: str, val_size: int = 5000, train_size: int | None = None,
    test_size: int | None = None, download: bool = True, seed: int = 0,
    train_classes: Sequence[int] | None = None, name: str = "fashion_mnist",
    val_classes: Sequence[int] | None = None, **_: object,
) -> TensorDataset:
    """Fashion-MNIST (Zalando; 60k train / 10k test, 10 clothing classes)."""
    return load_idx_dataset("FashionMNIST", root, name, val_size, train_size, test_size,
                            download, seed, train_classes, FASHION_CLASSES, val_classes)
