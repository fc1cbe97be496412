"""Relational distillation (losses/relational.py; semi.distill)."""

import itertools
import math

import pytest
import torch

from dmlrun.losses.relational import relational_distance_loss
from dmlrun.train import DistillTerm


def loop_rkd(student: torch.Tensor, teacher: torch.Tensor) -> float:
    """RKD-D written out pair by pair, in float64 (Park et al. 2019, eq. 5 with the Huber
    loss of threshold 1)."""
    pairs = list(itertools.permutations(range(len(student)), 2))

    def dist(x, i, j):
        return math.sqrt(sum((float(a) - float(b)) ** 2 for a, b in zip(x[i], x[j], strict=True)))

    ds = [dist(student, i, j) for i, j in pairs]
    dt = [dist(teacher, i, j) for i, j in pairs]
    mu_s, mu_t = sum(ds) / len(ds), sum(dt) / len(dt)
    total = 0.0
    for s, t in zip(ds, dt, strict=True):
        e = abs(s / mu_s - t / mu_t)
        total += 0.5 * e * e if e < 1 else e - 0.5
    return total / len(pairs)


def test_relational_loss_matches_the_pairwise_loop():
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(9, 4, generator=g), torch.randn(9, 6, generator=g)
    student[0] *= 8  # far points: distances past the Huber threshold too
    value = relational_distance_loss(student, teacher)
    assert value.item() == pytest.approx(loop_rkd(student, teacher), rel=1e-5)
    assert value.item() > 0.01


def test_relational_loss_ignores_rotation_scale_and_shift_only():
    g = torch.Generator().manual_seed(1)
    teacher = torch.randn(30, 5, generator=g)
    q, _ = torch.linalg.qr(torch.randn(5, 5, generator=g))
    similar = 7.0 * teacher @ q + 3.0
    assert relational_distance_loss(similar, teacher).item() < 1e-6
    warped = similar.clone()
    warped[:, 0] *= 3.0  # stretched along one axis: no longer the same geometry
    assert relational_distance_loss(warped, teacher).item() > 1e-3


def test_relational_loss_reaches_only_the_student():
    g = torch.Generator().manual_seed(2)
    student = torch.randn(12, 3, generator=g, requires_grad=True)
    teacher = torch.randn(12, 8, generator=g, requires_grad=True)
    # a repeated image (zero distance) leaves the gradient finite
    relational_distance_loss(torch.cat([student, student[:2]]),
                             torch.cat([teacher, teacher[:2]])).backward()
    assert teacher.grad is None and torch.isfinite(student.grad).all()
    assert student.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="same B >= 2"):
        relational_distance_loss(student[:3], teacher[:4])


def test_distill_term_looks_up_the_targets_of_its_images_and_weights_them():
    g = torch.Generator().manual_seed(3)
    targets = torch.randn(50, 6, generator=g)
    emb = torch.randn(10, 2, generator=g)
    ids = torch.randperm(50, generator=g)[:10]
    term = DistillTerm(targets, weight=4.0)
    assert term(emb, ids).item() == pytest.approx(
        4.0 * relational_distance_loss(emb, targets[ids]).item(), rel=1e-6)
