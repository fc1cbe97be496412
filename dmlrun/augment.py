"""Data augmentation on the device, per image, for whole batches (``augment`` group).

torchvision's v2 transforms draw one set of parameters per call, so a batched tensor gets
the same rotation for every image; here each image draws its own. The images stay uint8
in memory; a batch is augmented after it becomes float, inside the training step.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


class RandomAffine:
    """Per-image random affine warp of a (B, C, H, W) float batch: rotation in
    +-``degrees``, translation in +-``shift`` pixels, scale in ``scale``, shear in
    +-``shear`` degrees; optionally an elastic distortion (Simard et al. 2003: a random
    displacement field smoothed by a Gaussian of ``elastic_sigma`` pixels, scaled to
    ``elastic_alpha`` pixels). Bilinear sampling, zero padding; output shape and value
    range as the input's.

    Then, with probability ``erase_p`` per image, random erasing (Zhong et al. 2020,
    cutout-like): a rectangle covering a fraction in ``erase_area`` of the image, of
    aspect ratio between 1/3 and 3 (log-uniform), set to 0, the background."""

    def __init__(self, degrees: float = 12.0, shift: float = 2.5,
                 scale: tuple[float, float] = (0.9, 1.1), shear: float = 8.0,
                 elastic_alpha: float = 0.0, elastic_sigma: float = 4.0,
                 erase_p: float = 0.0, erase_area: tuple[float, float] = (0.02, 0.2)) -> None:
        if degrees < 0 or shift < 0 or shear < 0 or elastic_alpha < 0:
            raise ValueError("augment: degrees, shift, shear and elastic_alpha must be >= 0")
        if not 0 < scale[0] <= scale[1]:
            raise ValueError(f"augment.scale must be (low, high) with 0 < low <= high, got "
                             f"{scale}")
        if not 0 <= erase_p <= 1 or not 0 < erase_area[0] <= erase_area[1] <= 1:
            raise ValueError(f"augment: erase_p must be in [0, 1] and erase_area (low, high) "
                             f"with 0 < low <= high <= 1, got {erase_p}, {erase_area}")
        self.degrees, self.shift, self.scale, self.shear = degrees, shift, tuple(scale), shear
        self.elastic_alpha, self.elastic_sigma = elastic_alpha, elastic_sigma
        self.erase_p, self.erase_area = erase_p, tuple(erase_area)

    def matrices(self, n: int, height: int, width: int, device: torch.device,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """(n, 2, 3) affine matrices in affine_grid's normalised coordinates, one per image."""
        u = torch.rand(n, 5, device=device, generator=generator) * 2 - 1  # in [-1, 1)
        angle = torch.deg2rad(u[:, 0] * self.degrees)
        shear = torch.deg2rad(u[:, 1] * self.shear)
        lo, hi = self.scale
        scale = lo + (u[:, 2] + 1) / 2 * (hi - lo)
        tx, ty = u[:, 3] * self.shift * 2 / width, u[:, 4] * self.shift * 2 / height
        cos, sin, zero, one = torch.cos(angle), torch.sin(angle), 0 * angle, 1 + 0 * angle
        rotate = torch.stack([torch.stack([cos, -sin], 1), torch.stack([sin, cos], 1)], 1)
        shear_x = torch.stack([torch.stack([one, torch.tan(shear)], 1),
                               torch.stack([zero, one], 1)], 1)
        forward = rotate @ shear_x * scale[:, None, None]  # image -> warped image
        shift = torch.stack([tx, ty], 1)[:, :, None]
        inverse = torch.linalg.inv(forward)  # affine_grid maps output to input positions
        return torch.cat([inverse, -inverse @ shift], 2)

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None
                 ) -> torch.Tensor:
        n, _, h, w = x.shape
        theta = self.matrices(n, h, w, x.device, generator).to(x.dtype)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        if self.elastic_alpha > 0:
            grid = grid + self._elastic(n, h, w, x, generator)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros",
                          align_corners=False)
        return self._erase(x, generator) if self.erase_p > 0 else x

    def _erase(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        n, _, h, w = x.shape
        u = torch.rand(n, 5, device=x.device, generator=generator)
        lo, hi = self.erase_area
        area = (lo + u[:, 0] * (hi - lo)) * h * w
        aspect = torch.exp((u[:, 1] * 2 - 1) * math.log(3.0))
        eh = torch.sqrt(area * aspect).round().clamp(1, h)
        ew = torch.sqrt(area / aspect).round().clamp(1, w)
        top = (u[:, 2] * (h - eh + 1)).floor()
        left = (u[:, 3] * (w - ew + 1)).floor()
        rows = torch.arange(h, device=x.device)[None, :]
        cols = torch.arange(w, device=x.device)[None, :]
        in_rows = (rows >= top[:, None]) & (rows < (top + eh)[:, None])  # (n, h)
        in_cols = (cols >= left[:, None]) & (cols < (left + ew)[:, None])  # (n, w)
        erase = in_rows[:, :, None] & in_cols[:, None, :] & (u[:, 4] < self.erase_p)[:, None, None]
        return x.masked_fill(erase[:, None], 0.0)

    def _elastic(self, n: int, h: int, w: int, x: torch.Tensor,
                 generator: torch.Generator | None) -> torch.Tensor:
        field = torch.rand(n, 2, h, w, device=x.device, generator=generator).to(x.dtype) * 2 - 1
        radius = max(1, int(math.ceil(3 * self.elastic_sigma)))
        t = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
        kernel = torch.exp(-t**2 / (2 * self.elastic_sigma**2))
        kernel = kernel / kernel.sum()
        field = F.conv2d(field.reshape(-1, 1, h, w), kernel.view(1, 1, 1, -1),
                         padding=(0, radius))
        field = F.conv2d(field, kernel.view(1, 1, -1, 1), padding=(radius, 0))
        field = field.view(n, 2, h, w) * self.elastic_alpha
        # pixels -> normalised coordinates, (n, h, w, 2) as affine_grid's (x, y) order
        scale = torch.tensor([2 / w, 2 / h], device=x.device, dtype=x.dtype)
        return field.permute(0, 2, 3, 1) * scale

    def __repr__(self) -> str:
        return (f"RandomAffine(degrees={self.degrees}, shift={self.shift}, "
                f"scale={self.scale}, shear={self.shear}, elastic_alpha={self.elastic_alpha}, "
                f"erase_p={self.erase_p})")
