"""Augmentation on the device: per-image parameters, shape and range kept, and the warp
does what its parameters say."""

import pytest
import torch

from dmlrun.augment import RandomAffine
from dmlrun.data.dataset import Split
from dmlrun.data.samplers import PKSampler
from dmlrun.losses import TripletLoss
from dmlrun.miners import HardMiner
from dmlrun.models import MLP
from dmlrun.train import StepConfig, fit
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



def test_random_erasing_zeroes_one_rectangle_of_the_asked_area_in_the_asked_share():
    x = torch.ones(4000, 1, 28, 28)
    y = RandomAffine(0, 0, (1, 1), 0, erase_p=0.5, erase_area=(0.05, 0.2))(
        x, torch.Generator().manual_seed(4))
    erased = 1 - y.mean((1, 2, 3))
    hit = erased > 1e-3  # the identity warp itself moves values by float rounding only
    assert abs(hit.float().mean().item() - 0.5) < 0.04  # 4,000 draws: sd 0.008
    # rounding the sides to whole pixels moves the area a little either way
    assert erased[hit].min() > 0.03 and erased[hit].max() < 0.24
    assert abs(erased[hit].mean().item() - 0.125) < 0.01
    # one axis-aligned rectangle: the zeroed pixels fill their bounding box
    zero = y[hit][:50, 0] < 0.5
    rows, cols = zero.any(2), zero.any(1)
    assert torch.equal(zero.sum((1, 2)), rows.sum(1) * cols.sum(1))
    untouched = RandomAffine(0, 0, (1, 1), 0, erase_p=0.0)(x)
    torch.testing.assert_close(untouched, x, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="erase"):
        RandomAffine(erase_p=1.5)

@pytest.mark.parametrize("no_aug, start, per_epoch", [(0, 1, [4, 4, 4]), (1, 1, [4, 4, 0]),
                                                      (2, 1, [4, 0, 0]), (1, 3, [0])])
def test_the_last_no_aug_epochs_train_on_the_images_as_they_are(no_aug, start, per_epoch):
    """trainer.no_aug_epochs: the warp runs on every step of the earlier epochs and on none
    of the last ones, counted from the run's last epoch (so a resumed run agrees)."""
    g = torch.Generator().manual_seed(0)
    split = Split(torch.randint(0, 256, (60, 1, 28, 28), dtype=torch.uint8, generator=g),
                  torch.arange(6).repeat(10))
    model = MLP(embedding_dim=2, hidden_dims=(8,))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    calls: list[int] = []

    def augment(x: torch.Tensor) -> torch.Tensor:
        calls.append(len(x))
        return x

    counts: list[int] = []

    def on_epoch_end(record: dict) -> bool:
        counts.append(len(calls) - sum(counts))
        return False

    cfg = StepConfig(progress_bar=False, augment=augment, no_aug_epochs=no_aug, max_epochs=3)
    fit(model, TripletLoss(), HardMiner(), opt, None,
        lambda: PKSampler(p=3, k=4, batches_per_epoch=4).epoch(split.labels, g), split,
        lambda epoch_no: {}, on_epoch_end, 3, cfg, start_epoch=start)
    assert counts == per_epoch
    assert set(calls) <= {12}  # whole batches of 3 x 4 images


def test_the_default_recipe_trains_its_last_epoch_unwarped():
    assert compose_cfg([]).trainer.no_aug_epochs == 1
    assert compose_cfg(["experiment=contrastive"]).trainer.no_aug_epochs == 0
