"""Small replicas of the official layouts of CUB-200-2011, Cars196, Stanford Online
Products and In-Shop (the same files, names and formats), with images a network can learn:
class c shows digit c % 10 (drawn from MNIST's test images) in a colour of a palette
(``Painter``), at a random size and place on a noisy background of random size. Training
and test classes differ, as in the real benchmarks, but share digits and colours.

    DMLRUN_DATA_DIR=../shared/data python scripts/make_replicas.py <root> [--datasets cub200 ...]

then ``dmlrun dataset=cub200 paths.data_dir=<root> ...``. The tests import ``make``.
"""

from __future__ import annotations

import argparse
import colorsys
import os
from pathlib import Path

import numpy as np
from PIL import Image

DEFAULT_CLASSES = {"cub200": 200, "cars196": 196, "sop": 120, "inshop": 100}


def mnist_digits(data_dir: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """MNIST's 10,000 test images (N, 28, 28) uint8 and labels, from the raw IDX files."""
    raw = Path(data_dir) / "MNIST" / "raw"
    images = np.frombuffer((raw / "t10k-images-idx3-ubyte").read_bytes(), np.uint8, offset=16)
    labels = np.frombuffer((raw / "t10k-labels-idx1-ubyte").read_bytes(), np.uint8, offset=8)
    return images.reshape(-1, 28, 28), labels


class Painter:
    """Draws images of class c: digit c % 10 in colour (c // 10 + c % 10) mod the number of
    colours, a new MNIST sample each. The first and second halves of the classes (training
    and test in every layout) both use every digit and nearly every colour, in pairs the
    other half never shows: what transfers to the test classes is digit shape and hue."""

    def __init__(self, data_dir: str | Path, classes: int, seed: int = 0) -> None:
        self.images, labels = mnist_digits(data_dir)
        self.by_digit = [np.flatnonzero(labels == d) for d in range(10)]
        self.used = [0] * 10
        self.rng = np.random.default_rng(seed)
        n_colours = (classes + 9) // 10
        self.colours = [np.array(colorsys.hsv_to_rgb(i / n_colours, 0.85, 1.0)) * 255
                        for i in range(n_colours)]

    def image(self, c: int) -> Image.Image:
        d = c % 10
        pick = self.by_digit[d][self.used[d] % len(self.by_digit[d])]
        self.used[d] += 1
        w, h = (int(v) for v in self.rng.integers(64, 97, 2))
        side = int(self.rng.integers(40, min(w, h) + 1))
        glyph = np.asarray(Image.fromarray(self.images[pick]).resize((side, side),
                                                                     Image.BILINEAR)) / 255.0
        canvas = self.rng.integers(0, 60, (h, w, 3)).astype(np.float64)
        top, left = int(self.rng.integers(0, h - side + 1)), int(self.rng.integers(0, w - side + 1))
        patch = canvas[top : top + side, left : left + side]
        colour = self.colours[(c // 10 + d) % len(self.colours)]
        patch[:] = patch * (1 - glyph[..., None]) + colour * glyph[..., None]
        return Image.fromarray(canvas.astype(np.uint8))


def _save(painter: Painter, c: int, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    painter.image(c).save(path, quality=92)


def make_cub(root: Path, painter: Painter, classes: int, per_class: int) -> dict:
    base = root / "CUB_200_2011"
    images, labels, split, names = [], [], [], []
    for c in range(classes):
        folder = f"{c + 1:03d}.Replica_{c + 1}"
        names.append(f"{c + 1} {folder}")
        for j in range(per_class):
            rel = f"{folder}/Replica_{c + 1}_{j + 1:04d}.jpg"
            _save(painter, c, base / "images" / rel)
            images.append(rel)
            labels.append(c + 1)
            split.append(j % 2)
    ids = range(1, len(images) + 1)
    for file, column in (("images.txt", images), ("image_class_labels.txt", labels),
                         ("train_test_split.txt", split)):
        (base / file).write_text("".join(f"{i} {v}\n" for i, v in zip(ids, column,
                                                                       strict=True)))
    (base / "classes.txt").write_text("\n".join(names) + "\n")
    half = classes // 2
    return {"train": (half * per_class, half), "test": ((classes - half) * per_class,
                                                        classes - half)}


def make_cars(root: Path, painter: Painter, classes: int, per_class: int) -> dict:
    from scipy.io import savemat

    base = root / "cars196"
    fields = ["relative_im_path", "bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "test"]
    records = []
    n = 0
    for c in range(classes):
        for j in range(per_class):
            n += 1
            rel = f"car_ims/{n:06d}.jpg"
            _save(painter, c, base / rel)
            records.append((rel, 1, 1, 60, 60, c + 1, j % 2))
    annos = np.empty((1, len(records)), dtype=[(f, "O") for f in fields])
    for i, rec in enumerate(records):
        for f, v in zip(fields, rec, strict=True):
            kind = np.uint8 if f == "test" else np.int32
            annos[0, i][f] = np.array([v]) if isinstance(v, str) else np.array([[v]], kind)
    savemat(str(base / "cars_annos.mat"), {"annotations": annos,
                                           "class_names": np.array([f"Replica {c + 1}" for c in
                                                                    range(classes)], dtype="O")})
    half = classes // 2
    return {"train": (half * per_class, half), "test": ((classes - half) * per_class,
                                                        classes - half)}


def make_sop(root: Path, painter: Painter, classes: int, per_class: int) -> dict:
    base = root / "Stanford_Online_Products"
    rows: dict[str, list[str]] = {"train": [], "test": []}
    half = classes // 2
    n = 0
    for c in range(classes):
        part = "train" if c < half else "test"
        superclass = c % 12 + 1
        for j in range(per_class):
            n += 1
            rel = f"replica{superclass}_final/{c + 1}_{j}.JPG"
            _save(painter, c, base / rel)
            rows[part].append(f"{len(rows[part]) + 1} {c + 1} {superclass} {rel}")
    for part, file in (("train", "Ebay_train.txt"), ("test", "Ebay_test.txt")):
        (base / file).write_text("image_id class_id super_class_id path\n"
                                 + "\n".join(rows[part]) + "\n")
    return {"train": (half * per_class, half), "test": ((classes - half) * per_class,
                                                        classes - half)}


def make_inshop(root: Path, painter: Painter, classes: int, per_class: int) -> dict:
    base = root / "InShop"
    rows = []
    half = classes // 2
    for c in range(classes):
        item = f"id_{c + 1:08d}"
        for j in range(per_class):
            rel = f"img/WOMEN/Replica/{item}/{j + 1:02d}_{j % 4 + 1}_front.jpg"
            _save(painter, c, base / rel)
            status = "train" if c < half else ("query" if j < per_class // 2 else "gallery")
            rows.append(f"{rel} {item} {status}")
    (base / "Eval").mkdir(parents=True, exist_ok=True)
    (base / "Eval" / "list_eval_partition.txt").write_text(
        f"{len(rows)}\nimage_name item_id evaluation_status\n" + "\n".join(rows) + "\n")
    q = per_class // 2
    return {"train": (half * per_class, half), "query": ((classes - half) * q, classes - half),
            "gallery": ((classes - half) * (per_class - q), classes - half)}


MAKERS = {"cub200": make_cub, "cars196": make_cars, "sop": make_sop, "inshop": make_inshop}


def make(name: str, root: str | Path, data_dir: str | Path, classes: int | None = None,
         per_class: int = 8, seed: int = 0) -> dict:
    """Write the replica of ``name`` under ``root``; returns {part: (images, classes)}."""
    classes = classes or DEFAULT_CLASSES[name]
    painter = Painter(data_dir, classes, seed)
    return MAKERS[name](Path(root), painter, classes, per_class)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("root", help="the data root to write the layouts under")
    p.add_argument("--datasets", nargs="+", default=list(MAKERS), choices=list(MAKERS))
    p.add_argument("--classes", type=int, help="classes per dataset (default: "
                   + ", ".join(f"{k} {v}" for k, v in DEFAULT_CLASSES.items()) + ")")
    p.add_argument("--per-class", type=int, default=8, help="images per class (8)")
    p.add_argument("--data-dir", default=os.environ.get("DMLRUN_DATA_DIR", "data"),
                   help="where MNIST's raw files are (default: DMLRUN_DATA_DIR)")
    args = p.parse_args()
    for name in args.datasets:
        counts = make(name, args.root, args.data_dir, args.classes, args.per_class)
        print(f"{name}: " + ", ".join(f"{part} {n} images of {c} classes"
                                      for part, (n, c) in counts.items()))


if __name__ == "__main__":
    main()
