"""Miners on constructed batches with known answers, and against pytorch-metric-learning."""

import itertools

import pytest
import torch

from dmlrun.losses import ContrastiveLoss, TripletLoss
from dmlrun.miners import HardMiner, RandomMiner, SemiHardMiner
from dmlrun.tuples import triplets_to_pairs


def line_batch():
    # 1-D positions (as 2-D points); classes 0 and 1 interleaved so hardest tuples are clear.
    x = torch.tensor([0.0, 1.0, 3.0, 1.2, 2.5, 6.0])
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    return torch.stack([x, torch.zeros_like(x)], 1), labels


def as_set(indices):
    return set(zip(*(t.tolist() for t in indices), strict=True))


def test_hard_miner_known_answer():
    emb, labels = line_batch()
    a, p, n = HardMiner()(emb, labels).indices
    got = {ai: (pi, ni) for ai, pi, ni in zip(a.tolist(), p.tolist(), n.tolist(), strict=True)}
    # anchor 0 (x=0): farthest positive x=3 (idx 2), closest negative x=1.2 (idx 3)
    assert got[0] == (2, 3)
    # anchor 1 (x=1): farthest positive x=3 (2); closest negative x=1.2 (3)
    assert got[1] == (2, 3)
    # anchor 2 (x=3): farthest positive x=0 (0); closest negative x=2.5 (4)
    assert got[2] == (0, 4)
    # anchor 5 (x=6): farthest positive x=1.2 (3); closest negative x=3 (2)
    assert got[5] == (3, 2)
    assert len(a) == 6


def test_hard_miner_skips_anchors_without_positive():
    emb = torch.randn(5, 2)
    labels = torch.tensor([0, 0, 1, 1, 2])  # class 2 has a single member
    a, _, _ = HardMiner()(emb, labels).indices
    assert sorted(a.tolist()) == [0, 1, 2, 3]


def test_semihard_matches_brute_force():
    g = torch.Generator().manual_seed(1)
    emb = torch.randn(20, 3, generator=g)
    labels = torch.arange(20) % 4
    margin = 0.5
    res = SemiHardMiner(margin=margin)(emb, labels)
    d = torch.cdist(emb, emb)
    expected = {
        (a, p, n)
        for a, p, n in itertools.product(range(20), repeat=3)
        if a != p and labels[a] == labels[p] and labels[a] != labels[n]
        and d[a, p] < d[a, n] <= d[a, p] + margin
    }
    assert as_set(res.indices) == expected
    assert res.mined.item() == len(expected) > 0


def test_random_miner_valid_tuples():
    torch.manual_seed(0)
    emb = torch.randn(30, 2)
    labels = torch.arange(30) % 3
    a, p, n = RandomMiner()(emb, labels).indices
    assert len(a) == 30
    assert (labels[a] == labels[p]).all() and (a != p).all() and (labels[a] != labels[n]).all()


def test_hard_miner_pairs_for_pair_losses():
    emb, labels = line_batch()
    triplets = HardMiner()(emb, labels).indices
    a1, p, a2, n = triplets_to_pairs(triplets)
    assert (labels[a1] == labels[p]).all() and (labels[a2] != labels[n]).all()
    # one hardest positive and one hardest negative pair per anchor
    assert len(a1) == len(a2) == 6
    e = emb.clone().requires_grad_(True)
    ContrastiveLoss()(e, labels, triplets).backward()
    assert torch.isfinite(e.grad).all()


def test_miner_runs_without_gradient():
    emb = torch.randn(8, 2, requires_grad=True)
    labels = torch.arange(8) % 2
    res = HardMiner()(emb, labels)
    assert all(not t.requires_grad and t.dtype == torch.long for t in res.indices)
    TripletLoss()(emb, labels, res.indices).backward()


pml = pytest.importorskip("pytorch_metric_learning")


def test_hard_miner_matches_pml_batch_hard():
    from pytorch_metric_learning import distances, miners

    lp = distances.LpDistance(normalize_embeddings=False)
    g = torch.Generator().manual_seed(2)
    emb = torch.randn(40, 6, generator=g)
    labels = torch.arange(40) % 5
    ref = miners.BatchHardMiner(distance=lp)(emb, labels)
    assert as_set(HardMiner()(emb, labels).indices) == as_set(ref)


def test_semihard_matches_pml_triplet_margin_miner():
    from pytorch_metric_learning import distances, miners

    lp = distances.LpDistance(normalize_embeddings=False)
    g = torch.Generator().manual_seed(3)
    emb = torch.randn(32, 4, generator=g)
    labels = torch.arange(32) % 4
    ref = miners.TripletMarginMiner(margin=0.4, type_of_triplets="semihard",
                                   distance=lp)(emb, labels)
    assert as_set(SemiHardMiner(margin=0.4)(emb, labels).indices) == as_set(ref)


def test_easy_positive_hard_negative_known_answer():
    emb, labels = line_batch()
    a, p, n = HardMiner(positive="easiest")(emb, labels).indices
    got = {ai: (pi, ni) for ai, pi, ni in zip(a.tolist(), p.tolist(), n.tolist(), strict=True)}
    assert got[0] == (1, 3)  # x=0: closest positive x=1, closest negative x=1.2
    assert got[2] == (1, 4)  # x=3: closest positive x=1, closest negative x=2.5
    assert got[5] == (4, 2)  # x=6: closest positive x=2.5, closest negative x=3


def test_pml_batch_easy_hard_miner_agrees():
    from pytorch_metric_learning import distances, miners

    lp = distances.LpDistance(normalize_embeddings=False)
    g = torch.Generator().manual_seed(4)
    emb = torch.randn(30, 5, generator=g)
    labels = torch.arange(30) % 3
    ref = miners.BatchEasyHardMiner(pos_strategy="easy", neg_strategy="hard", distance=lp)
    a1, p, a2, n = ref(emb, labels)
    ref_triplets = {(int(x), int(y), int(z)) for x, y, z in zip(a1, p, n, strict=True)}
    assert as_set(HardMiner(positive="easiest")(emb, labels).indices) == ref_triplets


def test_semihard_blocks_give_the_same_triplets():
    g = torch.Generator().manual_seed(6)
    emb = torch.randn(40, 2, generator=g)
    labels = torch.arange(40) % 4
    whole = SemiHardMiner(margin=0.5)(emb, labels).indices
    small = SemiHardMiner(margin=0.5)
    small.max_grid = 40 * 40 * 3  # three anchors per block
    assert as_set(small(emb, labels).indices) == as_set(whole)
