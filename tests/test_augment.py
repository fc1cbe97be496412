"""Augmentation on the device: per-image parameters, shape and range kept, and the warp
does what its parameters say."""

import torch

from dmlrun.augment import RandomAffine
from tests.conftest import compose_cfg


def centre_of_mass(x: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) -> (B, 2) (x, y) in pixels."""
    h, w = x.shape[-2:]
    ys, xs = torch.meshgrid(torch.arange(h, dtype=x.dtype), torch.arange(w, dtype=x.dtype),
                            indexing="ij")
    mass = x.sum((1, 2, 3))
    return torch.stack([(x[:, 0] * xs).sum((1, 2)) / mass,
                        (x[:, 0] * ys).sum((1, 2)) / mass], 1)


def blob(n: int) -> torch.Tensor:
    x = torch.zeros(n, 1, 28, 28)
    x[:, :, 10:18, 11:17] = 1.0
    return x


def test_each_image_draws_its_own_parameters_and_keeps_shape_and_range():
    x = blob(16)
    y = RandomAffine()(x, torch.Generator().manual_seed(0))
    assert y.shape == x.shape and y.min() >= 0 and y.max() <= 1
    flat = y.flatten(1)
    assert len({tuple(r.round(decimals=4).tolist()) for r in flat}) == 16  # all different
    theta = RandomAffine().matrices(16, 28, 28, torch.device("cpu"),
                                    torch.Generator().manual_seed(0))
    assert theta.shape == (16, 2, 3) and theta.std(0).min() > 0


def test_identity_parameters_change_nothing():
    x = torch.rand(3, 1, 28, 28)
    torch.testing.assert_close(RandomAffine(0, 0, (1, 1), 0)(x), x, atol=1e-5, rtol=0)


def test_a_shift_moves_the_image_by_at_most_its_pixels():
    x = blob(64)
    y = RandomAffine(degrees=0, shift=3, scale=(1, 1), shear=0)(
        x, torch.Generator().manual_seed(1))
    moved = centre_of_mass(y) - centre_of_mass(x)
    assert moved.abs().max() <= 3.05 and moved.abs().max() > 1.5
    assert (y.sum((1, 2, 3)) - x.sum((1, 2, 3))).abs().max() < 1.0  # mass kept (no crop)


def test_scaling_up_grows_the_blob_and_rotation_keeps_its_mass():
    x = blob(8)
    big = RandomAffine(0, 0, (1.5, 1.5), 0)(x)
    assert big.sum((1, 2, 3)).mean() > 1.8 * x.sum((1, 2, 3)).mean()
    turned = RandomAffine(45, 0, (1, 1), 0)(x, torch.Generator().manual_seed(2))
    assert torch.allclose(turned.sum((1, 2, 3)), x.sum((1, 2, 3)), rtol=0.05)


def test_elastic_distortion_differs_per_image_and_the_configs_build():
    x = blob(4)
    g = torch.Generator().manual_seed(3)
    a = RandomAffine(0, 0, (1, 1), 0, elastic_alpha=2.0)(x, g)
    assert not torch.allclose(a[0], a[1]) and a.shape == x.shape
    from dmlrun.assemble import validate_config

    for option in ("affine", "elastic"):
        parts = validate_config(compose_cfg([f"augment={option}"]))
        assert isinstance(parts.augment, RandomAffine)
    assert validate_config(compose_cfg(["augment=none"])).augment is None
