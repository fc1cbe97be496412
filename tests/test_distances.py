import pytest
import torch

from dmlrun.distances import CosineDistance, EuclideanDistance, SquaredEuclideanDistance


@pytest.fixture
def xy():
    g = torch.Generator().manual_seed(0)
    return torch.randn(7, 5, generator=g, dtype=torch.float64), torch.randn(
        4, 5, generator=g, dtype=torch.float64)


def test_euclidean_matches_cdist(xy):
    x, y = xy
    d = EuclideanDistance().pairwise(x, y)
    assert d.shape == (7, 4)
    torch.testing.assert_close(d, torch.cdist(x, y))
    torch.testing.assert_close(EuclideanDistance().paired(x[:4], y), (x[:4] - y).norm(dim=1))


def test_squared_is_square_of_euclidean(xy):
    x, y = xy
    torch.testing.assert_close(SquaredEuclideanDistance().pairwise(x, y), torch.cdist(x, y) ** 2)
    torch.testing.assert_close(SquaredEuclideanDistance().paired(x[:4], y),
                               ((x[:4] - y) ** 2).sum(1))


def test_cosine_distance(xy):
    x, y = xy
    expected = 1 - torch.nn.functional.cosine_similarity(x[:, None], y[None], dim=2)
    torch.testing.assert_close(CosineDistance().pairwise(x, y), expected)
    torch.testing.assert_close(CosineDistance().paired(x[:4], y), expected.diagonal()[:4])


def test_euclidean_gradient_finite_for_identical_points():
    x = torch.ones(3, 2, requires_grad=True)
    EuclideanDistance().pairwise(x, x).sum().backward()
    assert torch.isfinite(x.grad).all()
