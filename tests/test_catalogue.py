"""The loss, miner and distance catalogue against pytorch-metric-learning (same inputs, same
hyper-parameters, 1e-5) and, for LMNN, against a brute-force loop."""

import itertools
import math

import pytest
import torch
from pytorch_metric_learning import distances as pd
from pytorch_metric_learning import losses as pl
from pytorch_metric_learning import miners as pm
from pytorch_metric_learning import reducers as pr

from dmlrun.distances import (
    CosineDistance,
    DotProductDistance,
    EuclideanDistance,
    SquaredEuclideanDistance,
)
from dmlrun.losses import (
    ArcFaceLoss,
    CosFaceLoss,
    LiftedStructureLoss,
    LMNNLoss,
    MarginLoss,
    MultiSimilarityLoss,
    NPairsLoss,
    NTXentLoss,
    ProxyAnchorLoss,
    ProxyNCALoss,
    SupConLoss,
)
from dmlrun.miners import (
    BatchAllMiner,
    DistanceWeightedMiner,
    HardMiner,
    MultiSimilarityMiner,
    PairMarginMiner,
)
from dmlrun.tuples import all_triplets, label_masks

TOL = {"rtol": 1e-5, "atol": 1e-5}


def batch(n=24, d=8, classes=4, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % classes
    emb = torch.randn(n, d, generator=g, dtype=dtype) + 0.8 * torch.nn.functional.one_hot(
        labels, d).to(dtype)
    return emb.requires_grad_(True), labels


def both_grads(ours, ref, emb, labels, *args):
    """Loss values and embedding gradients of our loss and pml's on the same batch."""
    e1, e2 = emb.detach().clone().requires_grad_(), emb.detach().clone().requires_grad_()
    a = ours(e1, labels, *args)
    b = ref(e2, labels, *args)
    a.backward()
    b.backward()
    return a, b, e1.grad, e2.grad


def check(ours, ref, emb, labels, *args):
    a, b, ga, gb = both_grads(ours, ref, emb, labels, *args)
    torch.testing.assert_close(a, b.to(a.dtype), **TOL)
    torch.testing.assert_close(ga, gb, **TOL)
    assert a.item() > 0 and ga.abs().sum() > 0  # the case is not trivially zero


# --- distances ---------------------------------------------------------------------------

def test_distances_against_pml():
    x, _ = batch()
    x = x.detach()
    y = x[:7] * 0.5
    torch.testing.assert_close(EuclideanDistance(normalize=True).pairwise(x, y),
                               pd.LpDistance(normalize_embeddings=True)(x, y), **TOL)
    torch.testing.assert_close(SquaredEuclideanDistance().pairwise(x, y),
                               pd.LpDistance(normalize_embeddings=False, power=2)(x, y), **TOL)
    torch.testing.assert_close(DotProductDistance().similarity(x, y),
                               pd.DotProductSimilarity(normalize_embeddings=False)(x, y), **TOL)
    torch.testing.assert_close(CosineDistance().similarity(x, y),
                               pd.CosineSimilarity()(x, y), **TOL)
    # distances are "smaller is closer" everywhere, and paired matches the diagonal
    for dist in (EuclideanDistance(True), SquaredEuclideanDistance(), DotProductDistance(),
                 CosineDistance()):
        torch.testing.assert_close(dist.paired(x[:7], y), dist.pairwise(x[:7], y).diagonal())
        torch.testing.assert_close(dist.similarity(x, y), dist.offset - dist.pairwise(x, y))


# --- pair and triplet losses against pml -------------------------------------------------

@pytest.mark.parametrize("mined", [False, True])
def test_multi_similarity_matches_pml(mined):
    emb, labels = batch()
    ours = MultiSimilarityLoss(CosineDistance(), alpha=2, beta=50, base=0.5)
    ref = pl.MultiSimilarityLoss(alpha=2, beta=50, base=0.5, reducer=pr.MeanReducer())
    args = (MultiSimilarityMiner(CosineDistance(), 0.1)(emb, labels).indices,) if mined else ()
    check(ours, ref, emb, labels, *args)


def test_margin_loss_matches_pml_with_learned_per_class_beta():
    emb, labels = batch()
    ours = MarginLoss(EuclideanDistance(), margin=0.2, beta=1.2, nu=0.1, learn_beta=True,
                      num_classes=4).double()
    ref = pl.MarginLoss(margin=0.2, beta=1.2, nu=0.1, learn_beta=True, num_classes=4,
                        distance=pd.LpDistance(normalize_embeddings=False))
    ref.beta.data = ref.beta.data.double()
    check(ours, ref, emb, labels)
    triplets = HardMiner()(emb, labels).indices
    check(ours, ref, emb, labels, triplets)
    # beta is a parameter and gets a gradient
    ours.zero_grad()
    ours(emb, labels).backward()
    assert ours.beta.grad is not None and ours.beta.grad.abs().sum() > 0


def test_lifted_structure_matches_pml():
    emb, labels = batch()
    check(LiftedStructureLoss(EuclideanDistance(), neg_margin=1.0, pos_margin=0.0),
          pl.LiftedStructureLoss(neg_margin=1, pos_margin=0, reducer=pr.MeanReducer(),
                                 distance=pd.LpDistance(normalize_embeddings=False)),
          emb, labels)


def test_npairs_matches_pml():
    emb, labels = batch()
    unnormalised = pd.DotProductSimilarity(normalize_embeddings=False)
    check(NPairsLoss(DotProductDistance()), pl.NPairsLoss(distance=unnormalised), emb * 0.3,
          labels)
    check(NPairsLoss(CosineDistance()), pl.NPairsLoss(), emb, labels)  # pml's default
    # Sohn's L2 penalty on the embeddings adds reg * mean squared norm
    e = emb.detach()
    plain = NPairsLoss(DotProductDistance())(e, labels)
    reg = NPairsLoss(DotProductDistance(), embedding_reg=0.01)(e, labels)
    a, p = torch.tensor([0, 1, 2, 3]), torch.tensor([4, 5, 6, 7])
    norms = torch.cat([e[a], e[p]]).pow(2).sum(1).mean()
    torch.testing.assert_close(reg - plain, 0.01 * norms)


def test_supcon_and_ntxent_match_pml():
    emb, labels = batch()
    check(SupConLoss(CosineDistance(), temperature=0.1), pl.SupConLoss(temperature=0.1),
          emb, labels)
    check(NTXentLoss(CosineDistance(), temperature=0.07), pl.NTXentLoss(temperature=0.07),
          emb, labels)
    pairs = PairMarginMiner(CosineDistance(), 0.3, 0.9)(emb, labels).indices
    check(NTXentLoss(CosineDistance(), temperature=0.5), pl.NTXentLoss(temperature=0.5),
          emb, labels, pairs)


# --- proxy and classification losses: copy pml's initial weights, compare -----------------

def _copy_proxies(ours, proxies):
    ours.proxies.data = proxies.detach().clone().to(ours.proxies.dtype)
    return ours


def test_proxy_nca_matches_pml():
    emb, labels = batch(dtype=torch.float32)
    ref = pl.ProxyNCALoss(num_classes=4, embedding_size=8, softmax_scale=3)
    ours = _copy_proxies(ProxyNCALoss(4, 8, softmax_scale=3), ref.proxies)
    check(ours, ref, emb, labels)


def test_proxy_anchor_matches_pml():
    emb, labels = batch(dtype=torch.float32)
    ref = pl.ProxyAnchorLoss(num_classes=6, embedding_size=8, margin=0.1, alpha=32)
    ours = _copy_proxies(ProxyAnchorLoss(6, 8, margin=0.1, alpha=32), ref.proxies)
    check(ours, ref, emb, labels)  # classes 4 and 5 absent: their positive terms are empty
    e = emb.detach().clone()
    a, b = ours(e, labels), ref(e, labels)
    a.backward()
    b.backward()
    torch.testing.assert_close(ours.proxies.grad, ref.proxies.grad, **TOL)


@pytest.mark.parametrize("ours_cls,ref_cls,margin", [(ArcFaceLoss, pl.ArcFaceLoss, 28.6),
                                                     (CosFaceLoss, pl.CosFaceLoss, 0.35)])
def test_margin_softmax_matches_pml(ours_cls, ref_cls, margin):
    emb, labels = batch(dtype=torch.float32)
    ref = ref_cls(num_classes=4, embedding_size=8, margin=margin, scale=16)
    ours = _copy_proxies(ours_cls(4, 8, margin=margin, scale=16), ref.W.T)
    check(ours, ref, emb, labels)


# --- LMNN -------------------------------------------------------------------------------

def lmnn_loop(emb, labels, k, mu, margin):
    """Weinberger & Saul, written out with loops: pull target neighbours, hinge on impostors."""
    n = len(labels)
    d2 = lambda i, j: ((emb[i] - emb[j]) ** 2).sum()  # noqa: E731
    per_anchor = []
    for i in range(n):
        same = [j for j in range(n) if j != i and labels[j] == labels[i]]
        if not same:
            continue
        targets = sorted(same, key=lambda j: d2(i, j).item())[:k]
        pull = sum(d2(i, j) for j in targets)
        push = 0.0
        for j in targets:
            for l_ in range(n):
                if labels[l_] != labels[i]:
                    push = push + torch.clamp(margin + d2(i, j) - d2(i, l_), min=0)
        per_anchor.append((1 - mu) * pull + mu * push)
    return torch.stack(per_anchor).mean()


@pytest.mark.parametrize("k,mu,margin", [(1, 0.5, 1.0), (3, 0.3, 0.5), (10, 0.8, 2.0)])
def test_lmnn_matches_loop(k, mu, margin):
    emb, labels = batch(n=14, d=3, classes=3)
    got = LMNNLoss(EuclideanDistance(), k=k, mu=mu, margin=margin)(emb, labels)
    torch.testing.assert_close(got, lmnn_loop(emb, labels, k, mu, margin))


def test_lmnn_loss_falls_when_an_impostor_moves_away():
    # anchor 0 and its target neighbour 1 (class 0); impostor 2 (class 1) sits between
    emb = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.5, 0.1], [5.0, 5.0]], dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 1])
    loss = LMNNLoss(EuclideanDistance(), k=1, mu=0.5, margin=1.0)
    before = loss(emb, labels)
    moved = emb.clone()
    moved[2] = torch.tensor([0.5, 2.0])  # impostor farther from both class-0 points
    after = loss(moved, labels)
    assert after < before
    # and the gradient on the impostor pushes it away from the anchor
    e = emb.clone().requires_grad_()
    loss(e, labels).backward()
    away = e[2].detach() - e[0].detach()
    assert (-e.grad[2] @ away) > 0


def test_lmnn_zero_once_impostors_clear_the_margin():
    emb = torch.tensor([[0.0, 0.0], [0.1, 0.0], [10.0, 0.0], [10.1, 0.0]], dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 1])
    out = LMNNLoss(EuclideanDistance(), k=1, mu=1.0, margin=1.0).compute(emb, labels)
    assert out.loss.item() == 0.0 and out.active.item() == 0 and out.tuples.item() == 8


# --- miners against pml -------------------------------------------------------------------

def as_set(indices):
    return set(zip(*(t.tolist() for t in indices), strict=True))


def test_batch_all_matches_pml_triplet_margin_miner():
    emb, labels = batch()
    for margin in (0.1, 1.0):
        ours = BatchAllMiner(EuclideanDistance(), margin)(emb, labels).indices
        ref = pm.TripletMarginMiner(margin=margin, type_of_triplets="all",
                                    distance=pd.LpDistance(normalize_embeddings=False))(
            emb, labels)
        assert as_set(ours) == as_set(ref) and len(ours[0]) > 0
    # margin 0 keeps only triplets whose negative is closer than the positive
    a, p, n = BatchAllMiner(EuclideanDistance(), 0.0)(emb, labels).indices
    d = EuclideanDistance().pairwise(emb, emb)
    assert (d[a, p] > d[a, n]).all() and len(a) < len(all_triplets(labels)[0])


@pytest.mark.parametrize("dist,ref_dist,margins", [
    (EuclideanDistance(), pd.LpDistance(normalize_embeddings=False), (3.5, 4.0)),
    (EuclideanDistance(normalize=True), pd.LpDistance(), (0.8, 1.2)),
])
def test_pair_margin_miner_matches_pml(dist, ref_dist, margins):
    emb, labels = batch()
    ours = PairMarginMiner(dist, *margins)(emb, labels).indices
    ref = pm.PairMarginMiner(pos_margin=margins[0], neg_margin=margins[1],
                             distance=ref_dist)(emb, labels)
    assert [t.tolist() for t in ours] == [t.tolist() for t in ref]
    assert len(ours[0]) > 0 and len(ours[2]) > 0


def test_multi_similarity_miner_matches_pml():
    emb, labels = batch()
    for eps in (0.05, 0.3):
        ours = MultiSimilarityMiner(CosineDistance(), eps)(emb, labels).indices
        ref = pm.MultiSimilarityMiner(epsilon=eps)(emb, labels)
        assert as_set(ours[:2]) == as_set(ref[:2]) and as_set(ours[2:]) == as_set(ref[2:])
        assert len(ours[0]) > 0


def test_distance_weighted_weights_match_pml(monkeypatch):
    import pytorch_metric_learning.miners.distance_weighted_miner as dwm

    emb, labels = batch(d=4, dtype=torch.float32)
    emb = emb.detach()
    seen = {}

    def capture(labels, ref_labels=None, t_per_anchor=None, weights=None):
        seen["w"] = weights
        return (torch.zeros(0, dtype=torch.long),) * 3

    monkeypatch.setattr(dwm.lmu, "get_random_triplet_indices", capture)
    pm.DistanceWeightedMiner(cutoff=0.5, nonzero_loss_cutoff=1.4)(emb, labels)
    miner = DistanceWeightedMiner(EuclideanDistance(normalize=True), 0.5, 1.4)
    ours = miner.weights(miner.distance.pairwise(emb, emb), labels, emb.shape[1])
    ref = torch.nan_to_num(seen["w"], nan=0.0)
    torch.testing.assert_close(ours, ref, **TOL)
    assert (ours.sum(1) > 0).any()


def test_distance_weighted_samples_follow_the_weights():
    emb, labels = batch(n=12, d=3, classes=3, dtype=torch.float32)
    miner = DistanceWeightedMiner(EuclideanDistance(normalize=True), 0.5, 1.9,
                                  generator=torch.Generator().manual_seed(0))
    w = miner.weights(miner.distance.pairwise(emb, emb), labels, 3)
    counts = torch.zeros_like(w)
    for _ in range(400):
        a, p, n = miner(emb.detach(), labels).indices
        assert (labels[a] == labels[p]).all() and (labels[a] != labels[n]).all()
        counts.index_put_((a, n), torch.ones(len(a)), accumulate=True)
    freq = counts / counts.sum(1, keepdim=True).clamp_min(1)
    rows = w.sum(1) > 0
    assert (freq[rows] - w[rows]).abs().max() < 0.06
    pos, _ = label_masks(labels)
    assert miner(emb.detach(), labels).mined.item() == int((pos & rows[:, None]).sum())


def test_distance_weighted_refuses_unnormalised_distance():
    with pytest.raises(ValueError, match="normalize=true"):
        DistanceWeightedMiner(EuclideanDistance())


def test_each_loss_trains_a_step_without_nan():
    """Every loss, with and without mined tuples where it takes them, gives finite
    gradients on a float32 batch."""
    emb, labels = batch(dtype=torch.float32)
    losses = [MultiSimilarityLoss(CosineDistance()), MarginLoss(), LiftedStructureLoss(),
              NPairsLoss(DotProductDistance()), SupConLoss(CosineDistance()),
              NTXentLoss(CosineDistance()), ProxyNCALoss(4, 8), ProxyAnchorLoss(4, 8),
              ArcFaceLoss(4, 8), CosFaceLoss(4, 8), LMNNLoss()]
    for loss in losses:
        e = emb.detach().clone().requires_grad_()
        out = loss.compute(e, labels)
        out.loss.backward()
        assert math.isfinite(out.loss.item()) and torch.isfinite(e.grad).all(), loss
        if "triplets" in loss.accepts:
            trip = HardMiner()(e.detach(), labels).indices
            assert math.isfinite(loss(e, labels, trip).item()), loss
        if not loss.accepts:
            with pytest.raises(ValueError, match="no mined tuples"):
                loss(e, labels, HardMiner()(e.detach(), labels).indices)


def test_lifted_loop_reference():
    """The vectorised lifted structure loss against the formula written with loops."""
    emb, labels = batch(n=9, d=3, classes=3)
    m = 1.0
    d = lambda i, j: (emb[i] - emb[j]).norm()  # noqa: E731
    terms = []
    for i, j in itertools.permutations(range(9), 2):
        if labels[i] != labels[j]:
            continue
        negs = [m - d(i, n) for n in range(9) if labels[n] != labels[i]] + \
               [m - d(j, n) for n in range(9) if labels[n] != labels[j]]
        terms.append(torch.clamp(torch.logsumexp(torch.stack(negs), 0) + d(i, j), min=0) ** 2 / 2)
    ref = torch.stack(terms).mean()
    torch.testing.assert_close(LiftedStructureLoss(EuclideanDistance())(emb, labels), ref)
