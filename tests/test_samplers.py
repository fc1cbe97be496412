import pytest
import torch

from dmlrun.data.samplers import PairSampler, PKSampler, TripletSampler
from dmlrun.errors import ConfigError


def labels_uneven():
    # 4 classes of sizes 30, 50, 7, 90
    return torch.cat([torch.full((n,), c) for c, n in enumerate([30, 50, 7, 90])])


def test_pk_batches_are_class_balanced():
    labels = labels_uneven()
    ep = PKSampler(p=3, k=5).epoch(labels, torch.Generator().manual_seed(0))
    assert ep.indices.shape == (len(labels) // 15, 15)
    assert ep.tuples is None
    for row in ep.indices:
        counts = torch.bincount(labels[row], minlength=4)
        assert sorted(counts.tolist()) == [0, 5, 5, 5]
        assert len(row.unique()) == 15  # no repeats within a batch (classes have >= k items)


def test_pk_is_seeded_and_covers_data():
    labels = labels_uneven()
    a = PKSampler(3, 5).epoch(labels, torch.Generator().manual_seed(7)).indices
    b = PKSampler(3, 5).epoch(labels, torch.Generator().manual_seed(7)).indices
    c = PKSampler(3, 5).epoch(labels, torch.Generator().manual_seed(8)).indices
    assert torch.equal(a, b) and not torch.equal(a, c)
    # within a class, items are drawn without replacement until the class is used up
    big = a.flatten()[labels[a.flatten()] == 3]
    assert len(big.unique()) == min(len(big), 90)


def test_pk_rejects_bad_shapes():
    with pytest.raises(ConfigError, match="k >= 2"):
        PKSampler(p=4, k=1)
    with pytest.raises(ConfigError, match="sampler.p=5"):
        PKSampler(p=5, k=2).epoch(labels_uneven(), torch.Generator())


def test_pairs_half_positive_half_negative():
    labels = labels_uneven()
    ep = PairSampler(pairs_per_batch=10, positive_fraction=0.5, batches_per_epoch=6).epoch(
        labels, torch.Generator().manual_seed(0))
    assert ep.indices.shape == (6, 20)
    a1, p, a2, n = ep.tuples
    assert len(a1) == len(a2) == 5
    for row in ep.indices:
        lab = labels[row]
        assert (lab[a1] == lab[p]).all() and (row[a1] != row[p]).all()
        assert (lab[a2] != lab[n]).all()


def test_triplets_valid():
    labels = labels_uneven()
    ep = TripletSampler(triplets_per_batch=8).epoch(labels, torch.Generator().manual_seed(0))
    a, p, n = ep.tuples
    for row in ep.indices:
        lab = labels[row]
        assert (lab[a] == lab[p]).all() and (lab[a] != lab[n]).all() and (row[a] != row[p]).all()
