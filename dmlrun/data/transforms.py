"""How an image file becomes the uint8 (C, S, S) array a model sees: a ``transform`` (the
config group of that name) is called as ``transform(path, rng)`` while decoding, in the
DataLoader workers of a streamed split. ``rng`` is a ``numpy.random.Generator`` for a
training image and None for evaluation (no randomness).

- ``Resize`` (``transform=mnist``): grey or RGB, resized to S x S, for training and
  evaluation alike (the behaviour of in-memory datasets).
- ``ImageNetTransform`` (``transform=imagenet``): what ImageNet-pretrained backbones are
  trained and graded with in the metric-learning literature. Training: the shorter side
  resized to ``resize`` (default ``crop_size`` x 256 / 224), a random crop of ``scale`` of
  the area and an aspect ratio in ``ratio`` resized to ``crop_size``, flipped left-right
  half the time. Evaluation: the shorter side resized to ``resize``, the centre
  ``crop_size`` square.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from dmlrun.data.streaming import decode_image
from dmlrun.errors import UserError


class Resize:
    """Grey (1) or RGB (3) ``channels``, resized to ``size`` x ``size``; no randomness."""

    def __init__(self, size: int, channels: int = 1) -> None:
        if size < 1 or channels not in (1, 3):
            raise ValueError(f"need size >= 1 and channels 1 or 3, got {size}, {channels}")
        self.size, self.channels = int(size), int(channels)

    def __call__(self, path: str | Path, rng: np.random.Generator | None = None) -> np.ndarray:
        return decode_image(path, self.size, self.channels)


class ImageNetTransform:
    """RGB; training: resize, random resized crop, horizontal flip; evaluation: resize,
    centre crop. Output (3, crop_size, crop_size) uint8."""

    channels = 3

    def __init__(self, crop_size: int = 224, resize: int | None = None,
                 scale: Sequence[float] = (0.16, 1.0),
                 ratio: Sequence[float] = (3 / 4, 4 / 3), flip: bool = True) -> None:
        if resize is None:  # the usual 256 for 224, in proportion for other crops
            resize = round(crop_size * 256 / 224)
        if not 0 < crop_size <= resize:
            raise ValueError(f"need 0 < crop_size <= resize, got {crop_size}, {resize}")
        if not 0 < scale[0] <= scale[1] <= 1 or not 0 < ratio[0] <= ratio[1]:
            raise ValueError(f"need 0 < scale[0] <= scale[1] <= 1 and 0 < ratio[0] <= ratio[1],"
                             f" got {list(scale)}, {list(ratio)}")
        self.size, self.resize = int(crop_size), int(resize)
        self.scale, self.ratio, self.flip = tuple(scale), tuple(ratio), bool(flip)

    def __call__(self, path: str | Path, rng: np.random.Generator | None = None) -> np.ndarray:
        # imported here, not with the module: transform=mnist builds this module too, and
        # importing torchvision costs seconds
        import torchvision.transforms.functional as TF

        try:
            with Image.open(path) as img:
                img = img.convert("RGB")
        except (OSError, ValueError, SyntaxError) as exc:
            raise UserError(f"cannot read image {path}: {exc}") from exc
        img = TF.resize(img, self.resize, interpolation=TF.InterpolationMode.BILINEAR)
        if rng is None:
            img = TF.center_crop(img, [self.size, self.size])
        else:
            top, left, h, w = self.crop_box(img.height, img.width, rng)
            img = TF.resized_crop(img, top, left, h, w, [self.size, self.size],
                                  interpolation=TF.InterpolationMode.BILINEAR)
            if self.flip and rng.random() < 0.5:
                img = TF.hflip(img)
        return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1).copy()

    def crop_box(self, height: int, width: int, rng: np.random.Generator
                 ) -> tuple[int, int, int, int]:
        """(top, left, h, w) of a random crop covering ``scale`` of the area with an aspect
        ratio in ``ratio`` (log-uniform); after 10 misses, the centre crop of the nearest
        allowed ratio (torchvision's RandomResizedCrop rule)."""
        area = height * width
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target = area * rng.uniform(*self.scale)
            aspect = math.exp(rng.uniform(*log_ratio))
            w = round(math.sqrt(target * aspect))
            h = round(math.sqrt(target / aspect))
            if 0 < w <= width and 0 < h <= height:
                return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), \
                    h, w
        aspect = width / height
        if aspect < self.ratio[0]:
            w, h = width, round(width / self.ratio[0])
        elif aspect > self.ratio[1]:
            h, w = height, round(height * self.ratio[1])
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w
