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


def loop_pool_mining(emb, labels, per_class):
    """{anchor: (hardest positive, hardest negative)} within pools of ``per_class``
    images per class (pool = position among the class's items // per_class)."""
    seen: dict[int, int] = {}
    pool = []
    for lab in labels.tolist():
        pool.append(seen.get(lab, 0) // per_class)
        seen[lab] = seen.get(lab, 0) + 1
    picks = {}
    for a in range(len(labels)):
        d = (emb - emb[a]).norm(dim=1)
        mates = [j for j in range(len(labels)) if pool[j] == pool[a] and j != a]
        pos = [j for j in mates if labels[j] == labels[a]]
        neg = [j for j in mates if labels[j] != labels[a]]
        if pos and neg:
            picks[a] = (max(pos, key=lambda j: d[j]), min(neg, key=lambda j: d[j]))
    return picks


def pk_batch(seed=3, classes=4, k=6, dim=2):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(classes).repeat(k)[torch.randperm(classes * k, generator=g)]
    return torch.randn(classes * k, dim, generator=g), labels


def test_hard_miner_pools_match_loop():
    emb, labels = pk_batch()
    expected = {(a, p, n) for a, (p, n) in loop_pool_mining(emb, labels, 2).items()}
    res = HardMiner(pool_k=2)(emb, labels)
    assert as_set(res.indices) == expected
    assert as_set(res.indices) != as_set(HardMiner()(emb, labels).indices)
    with pytest.raises(ValueError, match="pool_k"):
        HardMiner(pool_k=1)
    # without pools, grow has nothing to grow: plain batch-hard
    assert as_set(HardMiner(grow=True)(emb, labels).indices) == as_set(
        HardMiner()(emb, labels).indices)


def loop_grow(emb, labels, pool_k, max_inverted):
    """The largest pool in the chain pool_k, 2 pool_k, ... (until one covers the batch)
    whose hardest triplets are at most ``max_inverted`` inverted."""
    picked = loop_pool_mining(emb, labels, pool_k)
    size = 2 * pool_k
    while size < 2 * len(labels):
        larger = loop_pool_mining(emb, labels, size)
        inverted = [(emb[a] - emb[n]).norm() < (emb[a] - emb[p]).norm()
                    for a, (p, n) in larger.items()]
        if sum(inverted) / len(inverted) > max_inverted:
            break
        picked, size = larger, 2 * size
    return {(a, p, n) for a, (p, n) in picked.items()}


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("max_inverted", [0.3, 0.6])
@pytest.mark.parametrize("spread", [1.0, 1.2, 1.5])
def test_growing_pools_match_loop(seed, max_inverted, spread):
    # overlapping clusters: across these cases the chosen pools hold 2, 4, 8 and all 9
    # images per class
    emb, labels = pk_batch(seed, classes=4, k=9)
    emb = emb * spread + torch.tensor([[4.0, 0], [0, 4.0], [-4.0, 0], [0, -4.0]])[labels]
    got = as_set(HardMiner(pool_k=2, grow=True, max_inverted=max_inverted)(emb, labels).indices)
    assert got == loop_grow(emb, labels, 2, max_inverted)


@pytest.mark.parametrize("seed", range(4))
def test_growing_pools_match_loop_with_uneven_classes(seed):
    # classes of 3, 5 and 12 images: the pool sizes stop at the largest class (16), the
    # picks are those of the chain up to the batch size
    g = torch.Generator().manual_seed(seed)
    labels = torch.tensor([0] * 3 + [1] * 5 + [2] * 12)[torch.randperm(20, generator=g)]
    emb = torch.randn(20, 2, generator=g) * 1.2 + torch.tensor(
        [[3.0, 0], [0, 3.0], [-3.0, 0]])[labels]
    for max_inverted in (0.2, 0.5):
        got = HardMiner(pool_k=2, grow=True, max_inverted=max_inverted)(emb, labels).indices
        assert as_set(got) == loop_grow(emb, labels, 2, max_inverted)


def test_growing_pools_reach_the_whole_batch_when_classes_separate():
    emb, labels = pk_batch(0, classes=4, k=9)
    emb = emb * 0.1 + 10 * torch.eye(4)[labels][:, :2] - 10 * torch.eye(4)[labels][:, 2:4]
    whole = as_set(HardMiner()(emb, labels).indices)
    assert as_set(HardMiner(pool_k=2, grow=True)(emb, labels).indices) == whole
    # an untrained-like batch (no structure) stays in the smallest pools
    noise, _ = pk_batch(1, classes=4, k=9)
    small = {(a, p, n) for a, (p, n) in loop_pool_mining(noise, labels, 2).items()}
    assert as_set(HardMiner(pool_k=2, grow=True)(noise, labels).indices) == small
