"""Losses against hand-computed values, brute-force loops and pytorch-metric-learning."""

import itertools
import math

import pytest
import torch

from dmlrun.distances import EuclideanDistance
from dmlrun.losses import ContrastiveLoss, TripletLoss
from dmlrun.miners import HardMiner
from dmlrun.tuples import all_pairs, all_triplets


def batch(n=12, d=3, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(n, d, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.arange(n) % classes
    return emb, labels


def contrastive_reference(emb, labels, margin, w, reduction):
    terms = []
    for i, j in itertools.combinations(range(len(labels)), 2):
        d = (emb[i] - emb[j]).norm()
        if labels[i] == labels[j]:
            terms.append(w * d**2)
        else:
            terms.append((1 - w) * torch.clamp(margin - d, min=0) ** 2)
    total = torch.stack(terms)
    return total.sum() if reduction == "sum" else total.mean()


def test_contrastive_hand_computed():
    # Points on a line: 0 and 0.6 same class, 2.0 another class.
    emb = torch.tensor([[0.0, 0.0], [0.6, 0.0], [2.0, 0.0], [1.5, 0.0]])
    labels = torch.tensor([0, 0, 1, 2])
    loss = ContrastiveLoss(EuclideanDistance(), margin=1.0, pos_weight=0.5, reduction="sum")
    # positive pair (0,1): 0.5*0.36; negatives with D<1: (1,3) D=0.9 -> 0.5*0.01,
    # (2,3) D=0.5 -> 0.5*0.25; the rest have D >= 1.
    expected = 0.5 * 0.36 + 0.5 * 0.01 + 0.5 * 0.25
    assert loss(emb, labels).item() == pytest.approx(expected, abs=1e-6)
    mean = ContrastiveLoss(EuclideanDistance(), margin=1.0, reduction="mean")(emb, labels)
    assert mean.item() == pytest.approx(expected / 6, abs=1e-6)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("w,margin", [(0.5, 1.0), (0.3, 2.5)])
def test_contrastive_matches_loop(reduction, w, margin):
    emb, labels = batch()
    loss = ContrastiveLoss(EuclideanDistance(), margin=margin, pos_weight=w, reduction=reduction)
    got = loss(emb, labels)
    torch.testing.assert_close(got, contrastive_reference(emb, labels, margin, w, reduction))
    got.backward()
    assert torch.isfinite(emb.grad).all() and emb.grad.abs().sum() > 0


def test_contrastive_given_pairs_and_triplets():
    emb, labels = batch()
    pairs = all_pairs(labels)
    loss = ContrastiveLoss(reduction="sum")
    torch.testing.assert_close(loss(emb, labels, pairs), loss(emb, labels))
    # a triplet is split into its positive and negative pair
    a, p, n = torch.tensor([0]), torch.tensor([3]), torch.tensor([1])
    d_ap, d_an = (emb[0] - emb[3]).norm(), (emb[0] - emb[1]).norm()
    expected = 0.5 * d_ap**2 + 0.5 * torch.clamp(1 - d_an, min=0) ** 2
    torch.testing.assert_close(loss(emb, labels, (a, p, n)), expected)


def triplet_reference(emb, labels, margin, reduction):
    terms = []
    for a, p, n in itertools.product(range(len(labels)), repeat=3):
        if a != p and labels[a] == labels[p] and labels[a] != labels[n]:
            d_ap, d_an = (emb[a] - emb[p]).norm(), (emb[a] - emb[n]).norm()
            terms.append(torch.clamp(d_ap - d_an + margin, min=0))
    t = torch.stack(terms)
    if reduction == "mean":
        return t.mean()
    return t.sum() / (t > 0).sum()


@pytest.mark.parametrize("reduction", ["mean", "mean_active"])
def test_triplet_all_triplets_matches_loop(reduction):
    emb, labels = batch()
    loss = TripletLoss(EuclideanDistance(), margin=0.7, reduction=reduction)
    got = loss(emb, labels)
    torch.testing.assert_close(got, triplet_reference(emb, labels, 0.7, reduction))
    # dense path equals the index path
    torch.testing.assert_close(loss(emb, labels, all_triplets(labels)), got)
    got.backward()
    assert torch.isfinite(emb.grad).all()


def test_triplet_hand_computed():
    emb = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 0.5]])
    labels = torch.tensor([0, 0, 1])
    # triplets: (0,1,2): 1 - 0.5 + 0.2 = 0.7; (1,0,2): 1 - sqrt(1.25) + 0.2 > 0
    t2 = 1 - math.sqrt(1.25) + 0.2
    loss = TripletLoss(margin=0.2, reduction="mean")
    assert loss(emb, labels).item() == pytest.approx((0.7 + t2) / 2, abs=1e-6)
    out = loss.compute(emb, labels)
    assert out.tuples.item() == 2 and out.active.item() == 2


def test_triplet_rejects_pairs():
    emb, labels = batch()
    with pytest.raises(ValueError, match="triplets"):
        TripletLoss()(emb, labels, all_pairs(labels))


@pytest.mark.parametrize("loss", [ContrastiveLoss(), TripletLoss()])
def test_no_valid_tuples_gives_connected_zero(loss):
    emb = torch.randn(4, 2, requires_grad=True)
    labels = torch.arange(4)  # no positives at all
    if isinstance(loss, ContrastiveLoss):
        labels = torch.zeros(4, dtype=torch.long)  # contrastive: no negatives, has positives
        empty = tuple(torch.zeros(0, dtype=torch.long) for _ in range(4))
        out = loss(emb, labels, empty)
    else:
        out = loss(emb, labels)
    assert out.item() == 0.0
    out.backward()
    assert emb.grad is not None and (emb.grad == 0).all()


pml = pytest.importorskip("pytorch_metric_learning")


@pytest.mark.parametrize("reduction", ["mean", "mean_active"])
def test_triplet_matches_pytorch_metric_learning(reduction):
    from pytorch_metric_learning import distances, losses, miners, reducers

    emb, labels = batch(n=32, d=8, classes=4, seed=3)
    reducer = reducers.MeanReducer() if reduction == "mean" else reducers.AvgNonZeroReducer()
    # pml L2-normalises by default; compare on raw embeddings
    lp = distances.LpDistance(normalize_embeddings=False)
    ref_loss = losses.TripletMarginLoss(margin=0.3, reducer=reducer, distance=lp)
    ours = TripletLoss(margin=0.3, reduction=reduction)
    torch.testing.assert_close(ours(emb, labels), ref_loss(emb, labels), atol=1e-5, rtol=1e-5)
    # with mined triplets (batch-hard) too
    hard = HardMiner()(emb, labels).indices
    ref_hard = miners.BatchHardMiner(distance=lp)(emb, labels)
    torch.testing.assert_close(ours(emb, labels, hard), ref_loss(emb, labels, ref_hard),
                               atol=1e-5, rtol=1e-5)



def push_reference(emb, labels, margin):
    """Loop reference of ``inverted="push"``: the plain hinge, but max(0, margin - D(a, n))
    on triplets whose negative is closer than the positive."""
    terms = []
    for a, p, n in itertools.product(range(len(labels)), repeat=3):
        if a != p and labels[a] == labels[p] and labels[a] != labels[n]:
            d_ap, d_an = (emb[a] - emb[p]).norm(), (emb[a] - emb[n]).norm()
            terms.append(_push_term(d_ap, d_an, margin))
    return torch.stack(terms).mean()


def _push_term(d_ap, d_an, margin):
    if d_an < d_ap:
        return torch.clamp(margin - d_an, min=0)
    return torch.clamp(d_ap - d_an + margin, min=0)


def test_triplet_push_matches_loop_in_value_and_gradient():
    emb, labels = batch(n=12, d=2)
    loss = TripletLoss(margin=0.5, inverted="push")
    got = loss(emb, labels)
    grad = torch.autograd.grad(got, emb)[0]
    ref = push_reference(emb, labels, 0.5)
    ref_grad = torch.autograd.grad(ref, emb)[0]
    torch.testing.assert_close(got, ref)
    torch.testing.assert_close(grad, ref_grad)
    # not the plain hinge: the batch has inverted triplets
    assert got < TripletLoss(margin=0.5)(emb, labels)
    # mined triplets take the same path
    mined = HardMiner()(emb, labels).indices
    a, p, n = mined
    assert ((emb[a] - emb[n]).norm(dim=1) < (emb[a] - emb[p]).norm(dim=1)).any()
    got_mined = loss(emb, labels, mined)
    ref_mined = _mined_push(emb, mined, 0.5)
    torch.testing.assert_close(got_mined, ref_mined)
    torch.testing.assert_close(torch.autograd.grad(got_mined, emb)[0],
                               torch.autograd.grad(ref_mined, emb)[0])


def _mined_push(emb, triplets, margin):
    terms = []
    for a, p, n in zip(*(t.tolist() for t in triplets), strict=True):
        terms.append(_push_term((emb[a] - emb[p]).norm(), (emb[a] - emb[n]).norm(), margin))
    return torch.stack(terms).mean()


@pytest.mark.parametrize("inverted,shrinks", [("hinge", True), ("push", False)])
def test_inverted_triplets_reward_shrinking_only_under_the_plain_hinge(inverted, shrinks):
    """The collapse of batch-hard: when every mined triplet is inverted, scaling all
    embeddings by s lowers the plain hinge (d loss / d s > 0: shrink) towards the
    margin; with ``push`` the loss only asks the negatives to move away (d / d s < 0)."""
    margin = 2.0
    emb = torch.tensor([[0.0, 0.0], [3.0, 0.0], [1.0, 0.5], [2.0, -0.5]], dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 1])  # every anchor's negatives are closer than its positive
    s = torch.ones((), dtype=torch.float64, requires_grad=True)
    loss_fn = TripletLoss(margin=margin, inverted=inverted)
    triplets = HardMiner()(emb, labels).indices
    loss = loss_fn(emb * s, labels, triplets)
    if inverted == "hinge":
        assert loss.item() > margin  # above the margin: inverted on average
    (slope,) = torch.autograd.grad(loss, s)
    assert (slope.item() > 0) == shrinks


def test_soft_margin_matches_loop():
    emb, labels = batch(n=9, d=2)
    terms = [torch.nn.functional.softplus((emb[a] - emb[p]).norm() - (emb[a] - emb[n]).norm())
             for a, p, n in itertools.product(range(9), repeat=3)
             if a != p and labels[a] == labels[p] and labels[a] != labels[n]]
    loss = TripletLoss(margin=0.0, soft=True)
    got, ref = loss(emb, labels), torch.stack(terms).mean()
    torch.testing.assert_close(got, ref)
    torch.testing.assert_close(torch.autograd.grad(got, emb)[0], torch.autograd.grad(ref, emb)[0])
    assert loss.compute(emb, labels).active == len(terms)  # softplus is never zero


def test_triplet_epoch_warnings_name_collapse_and_inflation():
    loss = TripletLoss(margin=1.0)
    healthy = {"active_fraction": 0.3, "train_loss": 0.4, "neg_distance": 5.0,
               "inverted_fraction": 0.05}
    assert loss.epoch_warnings(healthy, 0.03) == []
    collapsed = {"active_fraction": 1.0, "train_loss": 1.0005, "neg_distance": 0.001,
                 "inverted_fraction": 1.0}
    assert "stuck at the margin" in loss.epoch_warnings(collapsed, 0.03)[0]
    early = {**collapsed, "neg_distance": 0.05}  # at the margin, but distances growing
    assert loss.epoch_warnings(early, 0.03) == []
    inflated = {"active_fraction": 0.01, "train_loss": 0.0002, "neg_distance": 700.0,
                "inverted_fraction": 1.0}
    assert "outgrown the margin" in loss.epoch_warnings(inflated, 0.03)[0]


def test_each_loss_says_which_margin_the_distance_plot_draws():
    from dmlrun.losses.margin import MarginLoss
    from dmlrun.losses.multi_similarity import MultiSimilarityLoss
    from dmlrun.retrieval_plots import loss_margin

    assert loss_margin(TripletLoss(margin=0.3)) == pytest.approx(0.3)
    assert loss_margin(ContrastiveLoss(margin=0.7)) == pytest.approx(0.7)
    assert loss_margin(MarginLoss()) is None  # around a learned boundary, not one margin
    assert loss_margin(MultiSimilarityLoss()) is None
    assert loss_margin(torch.nn.MSELoss()) is None  # a loss from elsewhere
