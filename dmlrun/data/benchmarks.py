"""The four image-retrieval benchmarks of deep metric learning, read from their official
layouts under the data root and streamed from the files (``FileSplit``):

- ``cub200``: ``CUB_200_2011/images.txt``, ``image_class_labels.txt``, ``images/``; classes
  1-100 train, 101-200 test (``train_test_split.txt`` is the classification split and is
  not used);
- ``cars196``: ``cars196/cars_annos.mat`` (struct ``annotations``) and ``car_ims/``;
  classes 1-98 train, 99-196 test;
- ``sop``: ``Stanford_Online_Products/Ebay_train.txt`` and ``Ebay_test.txt``;
- ``inshop``: ``InShop/Eval/list_eval_partition.txt`` and ``img/``; train items, and the
  test set graded query against gallery.

Model selection is class-disjoint, as in the Metric Learning Reality Check: the training
classes are cut into ``folds`` contiguous partitions (in class order); fold ``fold`` is the
validation set and the others train. Counts are compared with the official ones; a
difference is logged (a replica or a partial copy still runs).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from dmlrun.data.dataset import TensorDataset
from dmlrun.data.streaming import FileSplit
from dmlrun.errors import ConfigError, UserError

log = logging.getLogger("dmlrun")

WHERE = {
    "cub200": "https://www.vision.caltech.edu/datasets/cub_200_2011/ (CUB_200_2011.tgz)",
    "cars196": "https://ai.stanford.edu/~jkrause/cars/car_dataset.html (car_ims.tgz and "
               "cars_annos.mat)",
    "sop": "https://cvgl.stanford.edu/projects/lifted_struct/ (Stanford_Online_Products.zip)",
    "inshop": "https://mmlab.ie.cuhk.edu.hk/projects/DeepFashion/InShopRetrieval.html "
              "(img.zip and Eval/list_eval_partition.txt)",
}
# the official sizes: images and classes of the training and test parts
OFFICIAL = {
    "cub200": {"train": (5864, 100), "test": (5924, 100)},
    "cars196": {"train": (8054, 98), "test": (8131, 98)},
    "sop": {"train": (59551, 11318), "test": (60502, 11316)},
    "inshop": {"train": (25882, 3997), "query": (14218, 3985), "gallery": (12612, 3985)},
}


@dataclass
class Parsed:
    """A layout as read: per part (train, test or query/gallery), paths and class ids;
    ``names``: the dataset's own name of a class id, where it has one (else the id)."""

    parts: dict[str, tuple[list[str], list[int]]]
    names: dict[int, str] = field(default_factory=dict)

    def name(self, c: int) -> str:
        return self.names.get(c, str(c))


def _need(path: Path, name: str) -> Path:
    if not path.exists():
        raise UserError(f"{name}: {path} is missing. The dataset is published at "
                        f"{WHERE[name]}; unpack it so that this path exists under the data "
                        "root (DMLRUN_DATA_DIR or paths.data_dir)")
    return path


def _rows(path: Path, name: str, columns: int, skip: int = 0) -> list[list[str]]:
    """Whitespace-separated rows of a text file, each with ``columns`` fields."""
    rows = []
    for n, line in enumerate(_need(path, name).read_text().splitlines()[skip:], skip + 1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != columns:
            raise UserError(f"{name}: {path} line {n} is malformed: expected {columns} "
                            f"fields, got {line!r} (the file is published at {WHERE[name]})")
        rows.append(fields)
    return rows


def _int(value: str, path: Path, name: str) -> int:
    try:
        return int(value)
    except ValueError as exc:
        raise UserError(f"{name}: {path} holds {value!r} where a number belongs "
                        f"({WHERE[name]})") from exc


def parse_cub(root: Path) -> Parsed:
    name, base = "cub200", root / "CUB_200_2011"
    files = {i: p for i, p in _rows(base / "images.txt", name, 2)}
    labels = {i: _int(c, base / "image_class_labels.txt", name)
              for i, c in _rows(base / "image_class_labels.txt", name, 2)}
    if set(files) != set(labels):
        raise UserError(f"{name}: images.txt and image_class_labels.txt list different image "
                        f"ids ({len(files)} and {len(labels)})")
    ids = sorted(files, key=lambda i: _int(i, base / "images.txt", name))
    paths = [str(base / "images" / files[i]) for i in ids]
    classes = [labels[i] for i in ids]
    names = {}
    if (base / "classes.txt").is_file():  # "1 001.Black_footed_Albatross"
        names = {_int(c, base / "classes.txt", name): n
                 for c, n in _rows(base / "classes.txt", name, 2)}
    return _by_class(paths, classes, lambda c: c <= 100, names)


def parse_cars(root: Path) -> Parsed:
    from scipy.io import loadmat

    name, base = "cars196", root / "cars196"
    mat_path = _need(base / "cars_annos.mat", name)
    try:
        mat = loadmat(str(mat_path))
        annos = mat["annotations"][0]
        paths = [str(base / str(a["relative_im_path"][0])) for a in annos]
        classes = [int(a["class"][0][0]) for a in annos]
        # class c (1-based) is the make and model class_names[c - 1], where the file has them
        names = {i + 1: str(n[0]) for i, n in enumerate(mat["class_names"][0])} \
            if "class_names" in mat else {}
    except (KeyError, ValueError, IndexError, TypeError, OSError) as exc:
        raise UserError(f"{name}: {mat_path} is not the annotation file expected (a struct "
                        f"'annotations' with relative_im_path and class): {exc} "
                        f"({WHERE[name]})") from exc
    return _by_class(paths, classes, lambda c: c <= 98, names)


def parse_sop(root: Path) -> Parsed:
    name, base = "sop", root / "Stanford_Online_Products"
    parts = {}
    for part, file in (("train", "Ebay_train.txt"), ("test", "Ebay_test.txt")):
        rows = _rows(base / file, name, 4, skip=1)
        parts[part] = ([str(base / r[3]) for r in rows],
                       [_int(r[1], base / file, name) for r in rows])
    return Parsed(parts)


def parse_inshop(root: Path) -> Parsed:
    name, base = "inshop", root / "InShop"
    file = base / "Eval" / "list_eval_partition.txt"
    rows = _rows(file, name, 3, skip=2)
    parts: dict[str, tuple[list[str], list[int]]] = {p: ([], []) for p in
                                                     ("train", "query", "gallery")}
    for path, item, status in rows:
        if status not in parts or not item.startswith("id_"):
            raise UserError(f"{name}: {file} has an unexpected row {path} {item} {status} "
                            f"(status train, query or gallery; items id_NNNNNNNN)")
        parts[status][0].append(str(base / path))
        parts[status][1].append(_int(item[3:], file, name))
    names = {c: f"id_{c:08d}" for _, classes in parts.values() for c in classes}
    return Parsed(parts, names)


def _by_class(paths: list[str], classes: list[int], is_train: Callable[[int], bool],
              names: dict[int, str]) -> Parsed:
    train = [i for i, c in enumerate(classes) if is_train(c)]
    test = [i for i, c in enumerate(classes) if not is_train(c)]
    return Parsed({"train": ([paths[i] for i in train], [classes[i] for i in train]),
                   "test": ([paths[i] for i in test], [classes[i] for i in test])}, names)


PARSERS = {"cub200": parse_cub, "cars196": parse_cars, "sop": parse_sop,
           "inshop": parse_inshop}


def _compare_counts(name: str, parsed: Parsed) -> None:
    for part, (paths, classes) in parsed.parts.items():
        want = OFFICIAL[name][part]
        got = (len(paths), len(set(classes)))
        if got != want:
            log.warning("%s %s: %d images of %d classes (the official set has %d of %d): a "
                        "replica or partial copy", name, part, *got, *want)


def _check_files(name: str, parsed: Parsed) -> None:
    missing = [p for paths, _ in parsed.parts.values() for p in paths if not os.path.exists(p)]
    if missing:
        files = "image file listed is" if len(missing) == 1 else "image files listed are"
        raise UserError(f"{name}: {len(missing)} {files} missing, e.g. "
                        f"{missing[0]} (the images are published at {WHERE[name]})")


def fold_classes(classes: Sequence[int], folds: int, fold: int) -> tuple[list[int], list[int]]:
    """(training, validation) classes: ``classes`` sorted and cut into ``folds`` contiguous
    partitions; partition ``fold`` validates."""
    if not 0 <= fold < folds or folds < 2:
        raise ConfigError(f"dataset.fold={fold} must be in 0..{folds - 1} (dataset.folds="
                          f"{folds}, at least 2)")
    parts = np.array_split(np.array(sorted(set(classes))), folds)
    val = parts[fold].tolist()
    return [int(c) for i, p in enumerate(parts) if i != fold for c in p], [int(c) for c in val]


def load_benchmark(
    name: str, root: str, transform: Callable, fold: int = 0, folds: int = 4,
    seed: int = 0, workers: int = 4, **_: object,
) -> TensorDataset:
    """One of ``PARSERS`` as a ``TensorDataset`` of ``FileSplit`` s: train (random
    transforms), class-disjoint val (fold ``fold`` of ``folds``), test (In-Shop: query
    then gallery, ``query_count`` set). Labels: training classes 0..C-1 (C =
    ``num_classes``), validation and test classes after them."""
    if name not in PARSERS:
        raise ConfigError(f"dataset.name must be one of {sorted(PARSERS)}, got {name!r}")
    parsed = PARSERS[name](Path(root).expanduser())
    _compare_counts(name, parsed)
    _check_files(name, parsed)
    paths, classes = parsed.parts["train"]
    train_cls, val_cls = fold_classes(classes, folds, fold)
    test_parts = [p for p in ("test", "query", "gallery") if p in parsed.parts]
    test_cls = sorted({c for p in test_parts for c in parsed.parts[p][1]})
    ids = {c: i for i, c in enumerate([*train_cls, *val_cls])}
    ids.update({("test", c): len(ids) + i for i, c in enumerate(test_cls)})
    # labels are positions (training classes first, as proxy losses want); plots and
    # reports name a class as the dataset does (CUB's folder name, SOP's class_id, ...)
    class_names = [parsed.name(c) for c in [*train_cls, *val_cls, *test_cls]]
    size = int(getattr(transform, "size", 224))
    workers = min(workers, len(os.sched_getaffinity(0)))  # no more decoders than cores

    def split(part_paths: list[str], labels: list[int], train: bool = False,
              query_count: int | None = None) -> FileSplit:
        return FileSplit(part_paths, torch.tensor(labels, dtype=torch.long), size, 3, workers,
                         transform=transform, train=train, seed=seed,
                         query_count=query_count)

    val_set = set(val_cls)
    tr = [i for i, c in enumerate(classes) if c not in val_set]
    va = [i for i, c in enumerate(classes) if c in val_set]
    test_paths = [p for part in test_parts for p in parsed.parts[part][0]]
    test_labels = [ids[("test", c)] for part in test_parts for c in parsed.parts[part][1]]
    query = len(parsed.parts["query"][0]) if "query" in parsed.parts else None
    log.info("%s: %d training images of %d classes, %d validation images of %d classes "
             "(fold %d of %d), %d test images of %d classes%s", name, len(tr), len(train_cls),
             len(va), len(val_cls), fold, folds, len(test_paths), len(test_cls),
             f" ({query} queries against a gallery of {len(test_paths) - query})"
             if query else "")
    return TensorDataset(
        name, len(train_cls),
        split([paths[i] for i in tr], [ids[classes[i]] for i in tr], train=True),
        split([paths[i] for i in va], [ids[classes[i]] for i in va]),
        split(test_paths, test_labels, query_count=query), class_names)
