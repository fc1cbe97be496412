"""Retrieval metrics against brute force and pytorch-metric-learning's AccuracyCalculator."""

import pytest
import torch

from dmlrun.distances import CosineDistance, EuclideanDistance
from dmlrun.evaluate import retrieval_metrics


def brute_force(q, ql, r, rl, loo):
    d = torch.cdist(q, r)
    if loo:
        d.fill_diagonal_(float("inf"))
    p1, rp, mapr, rec = [], [], [], {k: [] for k in (1, 2, 4, 8)}
    for i in range(len(q)):
        order = torch.argsort(d[i])
        if loo:
            order = order[order != i]
        hits = (rl[order] == ql[i]).double()
        p1.append(hits[0])
        for k in rec:
            rec[k].append(hits[:k].max())
        R = int((rl == ql[i]).sum()) - (1 if loo else 0)
        if R == 0:
            continue
        rp.append(hits[:R].mean())
        prec = hits[:R].cumsum(0) / torch.arange(1, R + 1)
        mapr.append((prec * hits[:R]).sum() / R)
    out = {"precision_at_1": torch.stack(p1).mean().item(),
           "r_precision": torch.stack(rp).mean().item(),
           "map_at_r": torch.stack(mapr).mean().item()}
    out.update({f"recall_at_{k}": torch.stack(v).mean().item() for k, v in rec.items()})
    return out


def random_set(n, d, classes, seed):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (n,), generator=g)
    emb = torch.randn(n, d, generator=g, dtype=torch.float64) + labels[:, None] * 0.3
    return emb, labels


@pytest.mark.parametrize("chunk", [7, 1000])
def test_leave_one_out_matches_brute_force(chunk):
    emb, labels = random_set(300, 4, 6, 0)
    got = retrieval_metrics(emb, labels, chunk_size=chunk)
    want = brute_force(emb, labels, emb, labels, loo=True)
    for k, v in want.items():
        assert got[k] == pytest.approx(v, abs=1e-9), k


def test_query_vs_reference_matches_brute_force():
    q, ql = random_set(120, 3, 5, 1)
    r, rl = random_set(250, 3, 5, 2)
    got = retrieval_metrics(q, ql, r, rl, chunk_size=50)
    want = brute_force(q, ql, r, rl, loo=False)
    for k, v in want.items():
        assert got[k] == pytest.approx(v, abs=1e-9), k


def test_perfect_and_singleton_classes():
    emb = torch.tensor([[0.0], [0.1], [10.0], [10.1], [50.0]])
    labels = torch.tensor([0, 0, 1, 1, 2])  # class 2 has no other member
    m = retrieval_metrics(emb, labels)
    assert m["precision_at_1"] == pytest.approx(4 / 5)
    assert m["map_at_r"] == pytest.approx(1.0) and m["r_precision"] == pytest.approx(1.0)


def test_cosine_distance_ignores_scale():
    emb, labels = random_set(100, 5, 4, 3)
    scaled = emb * torch.rand(100, 1, dtype=torch.float64).add(0.5)
    a = retrieval_metrics(emb, labels, distance=CosineDistance())
    b = retrieval_metrics(scaled, labels, distance=CosineDistance())
    assert a == pytest.approx(b)
    assert a != pytest.approx(retrieval_metrics(scaled, labels, distance=EuclideanDistance()))


def test_matches_pml_accuracy_calculator():
    pytest.importorskip("faiss")
    pytest.importorskip("pytorch_metric_learning")
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

    emb, labels = random_set(500, 8, 10, 4)
    emb = emb.float()
    include = ("precision_at_1", "r_precision", "mean_average_precision_at_r")
    calc = AccuracyCalculator(include=include, device=torch.device("cpu"))
    ref = calc.get_accuracy(emb, labels, ref_includes_query=True)
    ours = retrieval_metrics(emb, labels)
    assert ours["precision_at_1"] == pytest.approx(ref["precision_at_1"], abs=1e-4)
    assert ours["r_precision"] == pytest.approx(ref["r_precision"], abs=1e-4)
    assert ours["map_at_r"] == pytest.approx(ref["mean_average_precision_at_r"], abs=1e-4)
