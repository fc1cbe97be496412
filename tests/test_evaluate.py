"""Retrieval metrics against brute force and pytorch-metric-learning's AccuracyCalculator."""

import pytest
import torch

from dmlrun.distances import (
    CosineDistance,
    Distance,
    DotProductDistance,
    EuclideanDistance,
    SquaredEuclideanDistance,
)
from dmlrun.metrics import retrieval_metrics


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


@pytest.mark.parametrize("n, classes", [(500, 10), (600, 150)])  # 150: the symmetric search
def test_matches_pml_accuracy_calculator(n, classes):
    pytest.importorskip("faiss")
    pytest.importorskip("pytorch_metric_learning")
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

    emb, labels = random_set(n, 8, classes, 4)
    if classes > 10:  # 4 items a class: AccuracyCalculator leaves out items alone in a class
        labels = torch.arange(n) % classes
        emb = torch.randn(n, 8, generator=torch.Generator().manual_seed(4)) + \
            (labels % 9)[:, None] * 0.3
    emb = emb.float()
    include = ("precision_at_1", "r_precision", "mean_average_precision_at_r")
    # k="max_bin_count": what pytorch-metric-learning documents for R-precision and MAP@R
    calc = AccuracyCalculator(include=include, device=torch.device("cpu"), k="max_bin_count")
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


def test_nmi_ami_of_thousands_of_classes_match_scikit_learn():
    """Stanford Online Products tests on 11,316 classes of 2 to 12 images (here 3,000, as
    scikit-learn's AMI takes 40 s at SOP's size; ours 0.01 s): the scores work from the
    non-zero cells and the distinct row and column sums, not a dense table (whose
    expected-MI terms, one per cell and count, took GBs)."""
    from sklearn.metrics import adjusted_mutual_info_score, normalized_mutual_info_score

    from dmlrun.clustering import adjusted_mutual_info, normalized_mutual_info

    g = torch.Generator().manual_seed(0)
    sizes = torch.randint(2, 13, (3000,), generator=g)
    a = torch.repeat_interleave(torch.arange(3000), sizes)
    b = torch.where(torch.rand(len(a), generator=g) < 0.5, a,
                    torch.randint(0, 3000, (len(a),), generator=g))
    assert normalized_mutual_info(a, b) == pytest.approx(
        normalized_mutual_info_score(a.numpy(), b.numpy()), abs=1e-8)
    assert adjusted_mutual_info(a, b) == pytest.approx(
        adjusted_mutual_info_score(a.numpy(), b.numpy()), abs=1e-8)


def test_kmeans_recovers_separated_clusters():
    from dmlrun.clustering import kmeans, normalized_mutual_info

    g = torch.Generator().manual_seed(1)
    centres = torch.randn(6, 5, generator=g) * 20
    labels = torch.arange(6).repeat_interleave(100)
    x = centres[labels] + torch.randn(600, 5, generator=g)
    assert normalized_mutual_info(kmeans(x, 6), labels) == pytest.approx(1.0)


def test_kmeans_pp_seeding_draws_the_same_centres_as_the_plain_formula():
    """The chunked, buffered seeding must draw exactly what the one-line formula draws
    (the documented NMI / AMI figures rest on those draws), also when the points do not
    fill the last chunk."""
    from dmlrun.clustering import _kmeans_pp

    def plain(x, k, g):
        first = int(torch.randint(len(x), (1,), generator=g))
        centres, closest = [x[first]], ((x - x[first]) ** 2).sum(1)
        for _ in range(1, k):
            probs = closest.cpu().double()
            idx = int(torch.multinomial(probs / probs.sum(), 1, generator=g))
            centres.append(x[idx])
            closest = torch.minimum(closest, ((x - x[idx]) ** 2).sum(1))
        return torch.stack(centres)

    x = torch.randn(5000, 24, generator=torch.Generator().manual_seed(3)) * 3
    for chunk in (4096, 333):
        got = _kmeans_pp(x, 60, torch.Generator().manual_seed(7), chunk=chunk)
        assert torch.equal(got, plain(x, 60, torch.Generator().manual_seed(7)))
    # every point a centre: the distances reach zero and the draws still stay distinct
    small = x[:40]
    got = _kmeans_pp(small, 40, torch.Generator().manual_seed(0), chunk=16)
    assert len({tuple(r.tolist()) for r in got}) == 40


def test_evaluate_embeddings_has_every_metric():
    from dmlrun.metrics import METRIC_NAMES, evaluate_embeddings

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


# --- the thresholded neighbour search against the former top-k code, made tie-stable ------


def sorted_reference(q, ql, r=None, rl=None, distance=None, recall_ks=(1, 2, 4, 8), knn_k=5,
                     chunk_size=1024):
    """The former implementation of retrieval_metrics, its top-k replaced by a full stable
    sort: neighbours by distance, equal distances by reference index."""
    distance = distance if distance is not None else EuclideanDistance()
    loo = r is None
    if loo:
        r, rl = q, ql
    classes, ref_counts = torch.unique(rl, return_counts=True)
    count_of = torch.zeros(int(classes.max()) + 1, dtype=torch.long)
    count_of[classes] = ref_counts
    q_in_ref = (ql >= 0) & (ql < len(count_of))
    r_all = torch.where(q_in_ref, count_of[ql.clamp(0, len(count_of) - 1)], 0) - int(loo)
    r_all = r_all.clamp_min(0)
    k_max = min(max(int(r_all.max()), max(recall_ks), knn_k), len(r) - int(loo))
    totals = dict.fromkeys(("p1", "rp", "map", "knn", *recall_ks), 0.0)
    ref_classes, ref_ids = torch.unique(rl, return_inverse=True)
    ranks = torch.arange(1, k_max + 1)
    for start in range(0, len(q), chunk_size):
        qc, qlc, rc = q[start:start + chunk_size], ql[start:start + chunk_size], \
            r_all[start:start + chunk_size]
        dist = distance.pairwise(qc, r)
        if loo:
            rows = torch.arange(len(qc))
            dist[rows, rows + start] = float("inf")
        nn_idx = dist.sort(dim=1, stable=True).indices[:, :k_max]
        hits = rl[nn_idx] == qlc[:, None]
        totals["p1"] += hits[:, 0].sum().item()
        votes = torch.zeros(len(qc), len(ref_classes))
        votes.scatter_add_(1, ref_ids[nn_idx[:, :knn_k]], torch.ones(len(qc), min(knn_k, k_max)))
        totals["knn"] += (ref_classes[votes.argmax(1)] == qlc).sum().item()
        for k in recall_ks:
            totals[k] += hits[:, :k].any(1).sum().item()
        rel = hits & (ranks[None, :] <= rc[:, None])
        has_r, r_safe = rc > 0, rc.clamp_min(1).double()
        totals["rp"] += (rel.sum(1).double() / r_safe)[has_r].sum().item()
        ap = (rel.cumsum(1).double() / ranks[None, :] * rel).sum(1) / r_safe
        totals["map"] += ap[has_r].sum().item()
    n, n_r = len(q), max(int((r_all > 0).sum()), 1)
    out = {"precision_at_1": totals["p1"] / n, "r_precision": totals["rp"] / n_r,
           "map_at_r": totals["map"] / n_r, "knn_accuracy": totals["knn"] / n}
    out.update({f"recall_at_{k}": totals[k] / n for k in recall_ks})
    return out


class ManhattanDistance(Distance):
    """Not a built-in: retrieval_metrics must call its pairwise as it is."""

    def _pairwise(self, x, y):
        return torch.cdist(x, y, p=1)


def tied_set(n, d, classes, seed, dtype=torch.float32, levels=3):
    """Embeddings on a small integer grid (many equal distances, some duplicate points),
    class sizes from 1 up, labels not starting at 0."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (n,), generator=g) * 3 + 5
    labels[:3] = torch.tensor([1, 2, 4])  # three classes with a single member
    emb = torch.randint(0, levels, (n, d), generator=g).to(dtype) + (labels[:, None] % 7 == 0)
    return emb, labels


DISTANCES = [EuclideanDistance(), SquaredEuclideanDistance(), CosineDistance(),
             DotProductDistance(), EuclideanDistance(normalize=True), ManhattanDistance()]


def assert_same(got, want):
    assert set(got) == set(want)
    for k, v in want.items():
        assert got[k] == pytest.approx(v, rel=1e-12, abs=1e-12), k


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("distance", DISTANCES, ids=repr)
def test_leave_one_out_with_ties_matches_sorted_reference(distance, dtype):
    emb, labels = tied_set(400, 3, 7, 0, dtype)
    for chunk in (64, 1024):
        got = retrieval_metrics(emb, labels, distance=distance, chunk_size=chunk)
        assert_same(got, sorted_reference(emb, labels, distance=distance, chunk_size=chunk))


@pytest.mark.parametrize("distance", DISTANCES, ids=repr)
def test_query_vs_reference_with_ties_matches_sorted_reference(distance):
    q, ql = tied_set(150, 4, 9, 1)
    r, rl = tied_set(500, 4, 6, 2)  # some query labels are not in the reference
    assert not torch.isin(ql, rl).all()
    kw = {"distance": distance, "recall_ks": (1, 3, 10), "knn_k": 7, "chunk_size": 40}
    assert_same(retrieval_metrics(q, ql, r, rl, **kw), sorted_reference(q, ql, r, rl, **kw))


@pytest.mark.parametrize("distance", [EuclideanDistance(), CosineDistance()], ids=repr)
def test_sampled_threshold_matches_sorted_reference(distance):
    """Above 4096 references the candidates come from a sampled threshold."""
    emb, labels = tied_set(4500, 4, 5, 3, levels=4)
    emb[::2] += torch.rand(2250, 4, generator=torch.Generator().manual_seed(0))
    got = retrieval_metrics(emb, labels, distance=distance, chunk_size=700)
    assert_same(got, sorted_reference(emb, labels, distance=distance, chunk_size=700))


@pytest.mark.parametrize("threshold", ["too low", "infinite"])
def test_any_threshold_gives_the_same_metrics(monkeypatch, threshold):
    """A sampled threshold below the k-th distance is redone exactly; one above it only
    costs time."""
    import dmlrun.search as ev

    def fake(dist, k):
        return dist.min(1).values if threshold == "too low" else torch.full((len(dist),), 1e30)

    emb, labels = tied_set(300, 3, 4, 4)
    want = retrieval_metrics(emb, labels, chunk_size=50)
    monkeypatch.setattr(ev, "_threshold", fake)
    assert_same(retrieval_metrics(emb, labels, chunk_size=50), want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_generic_sort_matches_packed_keys(monkeypatch, dtype):
    """The path GPUs take (two stable sorts) against the CPU's packed keys."""
    import dmlrun.search as ev

    emb, labels = tied_set(500, 3, 6, 5, dtype)
    q, ql = tied_set(60, 3, 6, 6, dtype)
    want = [retrieval_metrics(emb, labels, distance=d) for d in DISTANCES[:4]]
    want.append(retrieval_metrics(q, ql, emb, labels, chunk_size=16))
    monkeypatch.setattr(ev, "_leading_cpu", ev._leading)
    got = [retrieval_metrics(emb, labels, distance=d) for d in DISTANCES[:4]]
    got.append(retrieval_metrics(q, ql, emb, labels, chunk_size=16))
    for a, b in zip(got, want, strict=True):
        assert a == b


def test_packed_keys_order_signed_zeros_negatives_and_ties():
    from dmlrun.search import _leading, _leading_cpu

    values = [0.0, -0.0, -1.5, 2.0, -0.0, float("inf"), -1.5, 1e-30, -1e-30, 2.0, 0.0, -3e38]
    dist = torch.tensor([values, values[::-1]], dtype=torch.float32)
    flat = torch.arange(dist.numel())
    bounds = torch.tensor([0, len(values), 2 * len(values)])
    want = torch.sort(dist, dim=1, stable=True).indices
    assert torch.equal(_leading_cpu(dist, flat, bounds, len(values)), want)
    assert torch.equal(_leading(dist, flat, bounds, len(values)), want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("distance", DISTANCES[:5] + [SquaredEuclideanDistance(normalize=True),
                                                      DotProductDistance(normalize=True),
                                                      CosineDistance(normalize=True)], ids=repr)
def test_chunk_distances_are_pairwise_bit_for_bit(distance, dtype):
    from dmlrun.search import _chunk_pairwise

    g = torch.Generator().manual_seed(7)
    ref = torch.randn(333, 16, generator=g, dtype=dtype) * 3
    ref[:5] = ref[5:10]  # duplicates: distances clamped to the minimum
    queries = torch.cat([ref[:40], torch.randn(60, 16, generator=g, dtype=dtype)])
    pairwise = _chunk_pairwise(distance, ref)
    for chunk in (queries[:64], queries[64:], queries[:64]):  # buffers reused, then smaller
        assert torch.equal(pairwise(chunk), distance.pairwise(chunk, ref))


def test_singletons_and_absent_labels_against_brute_force():
    emb, labels = tied_set(200, 2, 5, 8, torch.float64, levels=50)
    emb = emb + torch.randn(200, 2, generator=torch.Generator().manual_seed(1), dtype=emb.dtype)
    got = retrieval_metrics(emb, labels)
    want = brute_force(emb, labels, emb, labels, loo=True)
    for k, v in want.items():
        assert got[k] == pytest.approx(v, abs=1e-12), k


@pytest.mark.parametrize("seed", [0, 1])
def test_per_query_results_average_to_the_retrieval_metrics(seed):
    """The same search as retrieval_metrics: P@1 and MAP@R are the means of the per-query
    hits and APs, also where distances tie (an integer grid) and a class has one item."""
    from dmlrun.metrics import per_query

    g = torch.Generator().manual_seed(seed)
    emb = torch.randint(0, 4, (600, 2), generator=g).float()  # many exact ties
    labels = torch.randint(0, 5, (600,), generator=g)
    labels[0] = 9  # a class of one: no AP
    pq = per_query(emb, labels)
    ref = retrieval_metrics(emb, labels)
    assert pq.hit1.double().mean().item() == pytest.approx(ref["precision_at_1"], abs=1e-12)
    assert pq.ap[~pq.ap.isnan()].mean().item() == pytest.approx(ref["map_at_r"], abs=1e-12)
    assert pq.ap[0].isnan() and not pq.ap[1:].isnan().any()
    d = torch.cdist(emb, emb).fill_diagonal_(float("inf"))
    # the nearest other item: the smallest distance, the smallest index among ties
    assert torch.equal(pq.nearest, torch.stack([torch.nonzero(row == row.min())[0, 0]
                                                for row in d]))
    # queries (the first 200) against a gallery (the rest), as In-Shop is graded
    pq = per_query(emb, labels, query_count=200)
    ref = retrieval_metrics(emb[:200], labels[:200], emb[200:], labels[200:])
    assert len(pq.hit1) == 200
    assert pq.hit1.double().mean().item() == pytest.approx(ref["precision_at_1"], abs=1e-12)
    assert pq.ap[~pq.ap.isnan()].mean().item() == pytest.approx(ref["map_at_r"], abs=1e-12)
    assert pq.ap[0].isnan()  # class 9 has no gallery item
    d = torch.cdist(emb[:200], emb[200:])
    assert torch.equal(pq.nearest, 200 + torch.stack([torch.nonzero(row == row.min())[0, 0]
                                                      for row in d]))


@pytest.mark.parametrize("distance", [EuclideanDistance(), SquaredEuclideanDistance(),
                                      CosineDistance(), DotProductDistance()])
def test_the_symmetric_search_for_small_classes_equals_the_row_search(distance, monkeypatch):
    """Classes of a few items (R <= SMALL_K) take the symmetric block search; on many
    blocks, with exact ties (integer points) and negative distances (dot), it finds the
    same neighbours in the same order as the row-by-row search."""
    from dmlrun import metrics, search

    g = torch.Generator().manual_seed(3)
    labels = torch.arange(700) % 175  # classes of 4, as in Stanford Online Products
    emb = torch.randint(-2, 3, (700, 3), generator=g).float()
    monkeypatch.setattr(search, "SYMMETRIC_BLOCK", 96)
    fast = retrieval_metrics(emb, labels, distance=distance)
    per_fast = metrics.per_query(emb, labels, distance)
    monkeypatch.setattr(search, "SMALL_K", 0)
    slow = retrieval_metrics(emb, labels, distance=distance)
    per_slow = metrics.per_query(emb, labels, distance)
    assert fast == slow
    assert torch.equal(per_fast.nearest, per_slow.nearest)
    monkeypatch.setattr(search, "SMALL_K", 32)  # an index searched with all its items
    nn, _ = search.nearest_neighbours(emb, emb, 1, distance, exclude=torch.arange(700))
    assert torch.equal(nn[:, 0], per_fast.nearest)
    assert torch.equal(per_fast.hit1, per_slow.hit1)
    if isinstance(distance, EuclideanDistance):  # and against brute force, without ties
        emb = torch.randn(700, 3, generator=g) + (labels % 7)[:, None] * 0.5
        monkeypatch.setattr(search, "SMALL_K", 32)
        got = retrieval_metrics(emb, labels, distance=distance)
        want = brute_force(emb, labels, emb, labels, loo=True)
        for k, v in want.items():
            assert got[k] == pytest.approx(v, abs=1e-9), k


def test_embeddings_do_not_depend_on_the_evaluation_batch():
    """trainer.eval_batch_size only sets how many images go through at once: with the
    model in eval mode (BatchNorm on its running statistics) each image's embedding is the
    same whatever else is in its batch."""
    from dmlrun.data.dataset import Split
    from dmlrun.metrics import embed_split
    from dmlrun.models.convnet import ConvNet

    g = torch.Generator().manual_seed(0)
    model = ConvNet(embedding_dim=8, channels=(8, 16), batch_norm=True, pool_first=True)
    model.train()
    model(torch.rand(64, 1, 28, 28, generator=g))  # running statistics away from 0 / 1
    images = torch.randint(0, 256, (700, 1, 28, 28), dtype=torch.uint8, generator=g)
    split = Split(images, torch.zeros(700, dtype=torch.long))
    small, large = embed_split(model, split, 256), embed_split(model, split, 2048)
    assert small.shape == (700, 8) and model.training  # its mode is given back
    torch.testing.assert_close(small, large, rtol=1e-5, atol=1e-6)
