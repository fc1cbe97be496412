"""class_loss: a class-level term summed with the tuple loss (WithAuxiliaryLoss)."""

import pytest
import torch
import torch.nn.functional as F

from dmlrun.assemble import param_groups
from dmlrun.components import build_components
from dmlrun.distances import SquaredEuclideanDistance
from dmlrun.losses import ProxyNCALoss, TripletLoss
from dmlrun.losses.combined import WithAuxiliaryLoss
from dmlrun.miners import HardMiner
from tests.conftest import compose_cfg


def _batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(24, 2, generator=g, requires_grad=True), torch.arange(24) % 4


def test_sum_is_the_tuple_loss_plus_the_weighted_proxy_term_in_value_and_gradient():
    emb, labels = _batch()
    main = TripletLoss(margin=0.0, soft=True)
    aux = ProxyNCALoss(4, 2, SquaredEuclideanDistance(False), softmax_scale=1.0)
    combined = WithAuxiliaryLoss(main, aux, weight=0.5)
    triplets = HardMiner()(emb.detach(), labels).indices
    out = combined.compute(emb, labels, triplets)
    (grad,) = torch.autograd.grad(out.loss, emb)
    # by hand: softplus(d_ap - d_an) over the mined triplets; -log softmax(-||x - p||^2)
    a, p, n = triplets
    d = torch.cdist(emb, emb)
    soft = F.softplus(d[a, p] - d[a, n]).mean()
    logits = -torch.cdist(emb, aux.proxies) ** 2
    nca = F.cross_entropy(logits, labels)
    expected = soft + 0.5 * nca
    (want,) = torch.autograd.grad(expected, emb)
    torch.testing.assert_close(out.loss, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, want, rtol=1e-4, atol=1e-6)
    # tuple counts come from the tuple loss
    assert int(out.tuples) == len(a)
    assert combined.plot_margin() == main.plot_margin()
    assert combined.margin == 0.0 and combined.soft  # the run reads these from its loss


def test_weight_zero_is_the_tuple_loss_alone():
    emb, labels = _batch(1)
    main = TripletLoss(margin=1.0)
    combined = WithAuxiliaryLoss(main, ProxyNCALoss(4, 2), weight=0.0)
    torch.testing.assert_close(combined(emb, labels), main(emb, labels))


def test_an_auxiliary_that_takes_tuples_or_a_negative_weight_is_refused():
    with pytest.raises(ValueError, match="whole batch"):
        WithAuxiliaryLoss(TripletLoss(), TripletLoss())
    with pytest.raises(ValueError, match="weight"):
        WithAuxiliaryLoss(TripletLoss(), ProxyNCALoss(4, 2), weight=-1.0)


def test_class_loss_group_wraps_the_loss_and_its_proxies_train_at_their_own_rate():
    cfg = compose_cfg(["class_loss=proxy_nca", "model.embedding_dim=2"])
    parts = build_components(cfg)
    assert isinstance(parts.loss, WithAuxiliaryLoss)
    assert isinstance(parts.loss.main, TripletLoss) and parts.loss.main.soft
    assert parts.loss.auxiliary.proxies.shape == (10, 2)
    groups = param_groups(torch.nn.Linear(3, 2), parts.loss)
    assert groups[-1]["params"][0] is parts.loss.auxiliary.proxies
    assert groups[-1]["lr"] == cfg.class_loss.auxiliary.param_lr
    # class_loss=none leaves the loss as the loss group built it
    assert isinstance(build_components(compose_cfg([])).loss, TripletLoss)
