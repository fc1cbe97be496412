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


def test_knn_accuracy_matches_scikit_learn():
    from sklearn.neighbors import KNeighborsClassifier

    q, ql = random_set(150, 3, 5, 5)
    r, rl = random_set(400, 3, 5, 6)
    for k in (1, 4, 7):
        ours = retrieval_metrics(q, ql, r, rl, knn_k=k)["knn_accuracy"]
        clf = KNeighborsClassifier(n_neighbors=k).fit(r.numpy(), rl.numpy())
        ref = float((clf.predict(q.numpy()) == ql.numpy()).mean())
        assert ours == pytest.approx(ref, abs=1e-4), k


def test_knn_leave_one_out_matches_scikit_learn():
    from sklearn.neighbors import KNeighborsClassifier

    emb, labels = random_set(300, 4, 6, 7)
    k = 5
    clf = KNeighborsClassifier(n_neighbors=k).fit(emb.numpy(), labels.numpy())
    idx = clf.kneighbors(return_distance=False)  # excludes each point itself
    votes = torch.nn.functional.one_hot(labels[torch.from_numpy(idx)], 6).sum(1)
    ref = (votes.argmax(1) == labels).double().mean().item()
    assert retrieval_metrics(emb, labels, knn_k=k)["knn_accuracy"] == pytest.approx(ref, abs=1e-4)


def test_nmi_ami_match_scikit_learn():
    from sklearn.metrics import adjusted_mutual_info_score, normalized_mutual_info_score

    from dmlrun.clustering import adjusted_mutual_info, normalized_mutual_info

    g = torch.Generator().manual_seed(0)
    for n, ka, kb in [(40, 3, 4), (2000, 10, 10), (5000, 10, 13)]:
        a = torch.randint(0, ka, (n,), generator=g)
        noise = torch.randint(0, kb, (n,), generator=g)
        b = torch.where(torch.rand(n, generator=g) < 0.6, a, noise)
        assert normalized_mutual_info(a, b) == pytest.approx(
            normalized_mutual_info_score(a.numpy(), b.numpy()), abs=1e-4)
        assert adjusted_mutual_info(a, b) == pytest.approx(
            adjusted_mutual_info_score(a.numpy(), b.numpy()), abs=1e-4)


def test_kmeans_recovers_separated_clusters():
    from dmlrun.clustering import kmeans, normalized_mutual_info

    g = torch.Generator().manual_seed(1)
    centres = torch.randn(6, 5, generator=g) * 20
    labels = torch.arange(6).repeat_interleave(100)
    x = centres[labels] + torch.randn(600, 5, generator=g)
    assert normalized_mutual_info(kmeans(x, 6), labels) == pytest.approx(1.0)


def test_evaluate_embeddings_has_every_metric():
    from dmlrun.evaluate import METRIC_NAMES, evaluate_embeddings

    emb, labels = random_set(200, 3, 4, 8)
    out = evaluate_embeddings(emb, labels)
    assert set(out) == set(METRIC_NAMES)
    assert all(0.0 <= v <= 1.0 for k, v in out.items() if k != "ami")


def test_tsne_and_pca_projection():
    from dmlrun.plots import project_2d

    emb, _ = random_set(120, 6, 3, 9)
    pts, how = project_2d(emb.float(), "pca")
    assert pts.shape == (120, 2) and "PCA of 6-D" in how
    pts, how = project_2d(emb.float(), "tsne")
    assert pts.shape == (120, 2) and "t-SNE" in how
    with pytest.raises(ValueError, match="pca or tsne"):
        project_2d(emb.float(), "umap")
