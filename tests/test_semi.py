"""Semi-supervised pseudo-labelling on synthetic clusters, and a short real run."""

import json

import pytest
import torch

from dmlrun.errors import ConfigError
from dmlrun.run import run
from dmlrun.semi import (
    KMeansPseudoLabeler,
    LabelPropagation,
    SemiSupervision,
    pick_labeled,
    pseudo_label_quality,
)
from tests.conftest import TINY, compose_cfg


def blobs(n_per=200, classes=5, dim=8, spread=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=g) * 3
    truth = torch.arange(classes).repeat_interleave(n_per)
    emb = centres[truth] + spread * torch.randn(len(truth), dim, generator=g)
    return emb, truth


@pytest.mark.parametrize("method", [KMeansPseudoLabeler(keep_fraction=0.5, knn_agreement=3),
                                    KMeansPseudoLabeler(clusters_per_class=3),
                                    LabelPropagation(k=10, keep_fraction=0.5)])
def test_pseudo_labels_recover_clusters(method):
    emb, truth = blobs()
    labeled = pick_labeled(truth, 2, seed=0)
    out = method(emb, labeled, truth[labeled], 5)
    q = pseudo_label_quality(out, truth, labeled)
    assert q["pseudo_accuracy"] > 0.97 and q["pseudo_kept_accuracy"] > 0.99
    assert 0.3 < q["pseudo_kept_fraction"] <= 1.0
    assert torch.equal(out.labels[labeled], truth[labeled]) and not out.keep[labeled].any()


def test_pseudo_labels_keep_the_most_confident_half():
    emb, truth = blobs(spread=1.5)  # overlapping clusters: some pseudo-labels are wrong
    labeled = pick_labeled(truth, 2, seed=0)
    out = KMeansPseudoLabeler(keep_fraction=0.5)(emb, labeled, truth[labeled], 5)
    q = pseudo_label_quality(out, truth, labeled)
    assert q["pseudo_kept_fraction"] == pytest.approx(0.5, abs=0.02)
    assert q["pseudo_kept_accuracy"] > q["pseudo_accuracy"]


def test_pick_labeled_is_seeded_and_per_class():
    truth = torch.arange(10).repeat(30)
    a, b, c = pick_labeled(truth, 3, 0), pick_labeled(truth, 3, 0), pick_labeled(truth, 3, 1)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.bincount(truth[a]).tolist() == [3] * 10
    with pytest.raises(ValueError, match="fewer than"):
        pick_labeled(truth, 31, 0)


def test_semi_run_writes_pseudo_label_diagnostics(tmp_path, data_dir):
    cfg = compose_cfg(TINY + [f"paths.data_dir={data_dir}", "trainer.epoch_plots=false",
                              "evaluation.baselines=false", "semi=kmeans",
                              "dataset.labeled_per_class=10", "sampler.k=10",
                              "trainer.max_epochs=3", "semi.warmup_epochs=1",
                              "semi.refresh_every=1"])
    run(cfg, tmp_path / "run")
    recs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert "pseudo_accuracy" not in recs[0]  # warm-up epoch on labels only
    for r in recs[1:]:
        assert 0 < r["pseudo_kept_fraction"] < 1 and 0 < r["pseudo_accuracy"] <= 1
    labeled = json.loads((tmp_path / "run" / "labeled_indices.json").read_text())
    assert len(labeled["indices"]) == 100 and labeled["labeled_per_class"] == 10
    assert (tmp_path / "run" / "plots" / "pseudo_labels.png").stat().st_size > 0


def test_semi_method_without_unlabeled_images_is_refused(tmp_path, data_dir):
    cfg = compose_cfg(TINY + [f"paths.data_dir={data_dir}", "semi=propagation"])
    with pytest.raises(ConfigError, match="dataset.labeled_per_class"):
        run(cfg, tmp_path / "run")


# propagation with confidence weights, the two-view term and augmentation: every random
# draw a run makes
SEMI = [*TINY, "trainer.epoch_plots=false", "evaluation.baselines=false",
        "semi=propagation_views", "semi.views.batch=32", "augment=affine",
        "semi.method.weights=true",
        "dataset.labeled_per_class=10", "sampler.k=10", "semi.warmup_epochs=1",
        "semi.refresh_every=1"]


def test_a_resumed_semi_run_equals_an_uninterrupted_one(tmp_path, data_dir):
    """Killed (SIGKILL) after its first epoch, with pseudo-labels refreshed every epoch,
    and resumed: the same records and test metrics as a run never stopped."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from tests.conftest import DATA_DIR, run_cli

    args = [*SEMI, "trainer.max_epochs=3", "sampler.batches_per_epoch=12"]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    res = run_cli([*args, f"hydra.run.dir={whole}"], cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    env = {**os.environ, "DMLRUN_DATA_DIR": str(DATA_DIR)}
    proc = subprocess.Popen([sys.executable, "-m", "dmlrun", *args,
                             f"hydra.run.dir={killed}"], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = killed / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not (
            metrics.exists() and metrics.read_text().count("\n") >= 1):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "summary.json").exists()
    state = torch.load(killed / "checkpoints" / "last.pt", weights_only=False)
    assert state["task"]["epoch_no"] == state["epoch"]  # the pseudo-labels are saved
    res = run_cli([*args, f"trainer.resume={killed}"], cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    timing = {"train_seconds", "samples_per_s", "epoch_seconds"}

    def records(d):
        rows = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if k not in timing} for r in rows]

    assert records(killed) == records(whole)
    a = json.loads((whole / "summary.json").read_text())
    b = json.loads((killed / "summary.json").read_text())
    assert a["test"] == b["test"] and a["best_epoch"] == b["best_epoch"]


def test_a_two_process_semi_run_writes_one_folder(tmp_path, data_dir):
    from tests.conftest import run_cli

    res = run_cli([*SEMI, "trainer.max_epochs=2", "trainer.devices=2"], cwd=tmp_path,
                  timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    (run_dir,) = list((tmp_path / "outputs").glob("*/*"))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["processes"] == 2
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert "pseudo_accuracy" in rows[1]  # rank 0's pseudo-labels, shared with rank 1


def test_auto_graph_starts_on_pixels_and_switches_when_the_model_labels_val_better():
    truth = torch.arange(4).repeat_interleave(10)
    val_truth = torch.arange(4).repeat_interleave(2)
    labeled = pick_labeled(truth, 2, 0)
    train = truth[:, None] * 4.0 + 0.1 * torch.randn(40, 3, generator=torch.Generator()
                                                     .manual_seed(0))
    wrong = (val_truth + 1) % 4  # validation points placed in another class's cluster

    def val_points(right: torch.Tensor) -> torch.Tensor:
        return torch.where(right, val_truth, wrong)[:, None] * 4.0 + torch.zeros(8, 3)

    calls = []

    def features(space):
        calls.append(space)
        if space == "pixels":  # half the validation images sit in their own class
            return torch.cat([train, val_points(torch.arange(8) % 2 == 0)])
        # the model's features: none right at first, all right from the second comparison
        good = calls.count("embedding") > 1
        return torch.cat([train, val_points(torch.full((8,), good))])

    from dmlrun.data.samplers import PKSampler

    semi = SemiSupervision(truth, labeled, 4, PKSampler(4, 2), LabelPropagation(k=3),
                           warmup_epochs=0, refresh_every=1, p=4, k=2, graph="auto",
                           val_truth=val_truth)
    g = torch.Generator().manual_seed(0)
    semi.next_epoch(features, g)
    assert calls == ["pixels"]  # the untrained network of epoch 1 is not compared
    assert "pseudo_val_accuracy_features" not in semi.quality
    assert semi.quality["pseudo_val_accuracy"] == 0.5
    assert semi.quality["pseudo_from_pixels"] == 1.0
    for _ in range(2):
        semi.next_epoch(features, g)
        assert semi.space == "pixels" or semi.epoch_no == 3
    assert semi.quality["pseudo_val_accuracy"] == 1.0
    assert "learned features" in semi.take_note() and semi.take_note() is None
    semi.next_epoch(features, g)
    # the pixels' pseudo-labels are computed once; after the switch only the model's
    assert calls == ["pixels", "embedding", "embedding", "embedding"]
    assert semi.quality["pseudo_from_pixels"] == 0.0
    assert len(semi.labels) == 40 and torch.equal(semi.labels, truth)
    state = semi.state_dict()
    fresh = SemiSupervision(truth, labeled, 4, PKSampler(4, 2), LabelPropagation(),
                            graph="auto", val_truth=val_truth)
    fresh.load_state_dict(state)
    assert fresh.space == "embedding"  # a resumed run keeps the switch
    with pytest.raises(ValueError, match="semi.graph"):
        SemiSupervision(truth, labeled, 4, PKSampler(4, 2), LabelPropagation(), graph="umap")


def test_a_teachers_graph_is_read_once():
    truth = torch.arange(4).repeat_interleave(10)
    labeled = pick_labeled(truth, 2, 0)
    calls = []

    def features(space):
        calls.append(space)
        return truth[:, None] * 4.0 + 0.1 * torch.randn(40, 3, generator=torch.Generator()
                                                        .manual_seed(0))

    from dmlrun.data.samplers import PKSampler

    semi = SemiSupervision(truth, labeled, 4, PKSampler(4, 2), LabelPropagation(k=3),
                           warmup_epochs=0, refresh_every=1, p=4, k=2, graph="teachers")
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        semi.next_epoch(features, g)
    assert calls == ["teachers"] and semi.space == "teachers"
    assert torch.equal(semi.labels, truth) and semi.quality["pseudo_from_pixels"] == 0.0


def rkd_to_teachers(student, teachers) -> float:
    """Relational distillation loss between a run's embedding of 500 training images and
    its teachers' (unit-length, side by side), in batches of 100."""
    import torch.nn.functional as F

    from dmlrun.data.idx import read_idx
    from dmlrun.embedder import RunEmbedding
    from dmlrun.losses.relational import relational_distance_loss
    from tests.conftest import DATA_DIR

    images = read_idx(DATA_DIR / "MNIST" / "raw" / "train-images-idx3-ubyte")[:500, None]
    ours = RunEmbedding(student, device="cpu")(images)
    theirs = torch.cat([F.normalize(RunEmbedding(t, device="cpu")(images), dim=1)
                        for t in teachers], dim=1)
    return sum(relational_distance_loss(ours[i:i + 100], theirs[i:i + 100]).item()
               for i in range(0, 500, 100)) / 5


def test_a_student_labels_from_its_teachers_embeddings(tmp_path, data_dir):
    """Teachers with the student's labeled images (dataset.split_seed) make its graph;
    a teacher that kept other labels, or no checkpoint, is refused."""
    base = [*TINY, f"paths.data_dir={data_dir}", "trainer.epoch_plots=false",
            "evaluation.baselines=false", "semi=propagation", "dataset.labeled_per_class=10",
            "sampler.k=10", "semi.warmup_epochs=0", "semi.refresh_every=1"]
    teachers = []
    for seed in (1, 2):
        teachers.append(tmp_path / f"teacher{seed}")
        run(compose_cfg([*base, f"seed={seed}", "dataset.split_seed=7",
                         "model.embedding_dim=16"]), teachers[-1])
    picks = [json.loads((t / "labeled_indices.json").read_text()) for t in teachers]
    assert picks[0] == picks[1] and picks[0]["seed"] == 7
    from dmlrun.evaluate_cli import evaluate_checkpoint

    # dmlrun-evaluate splits the data as the run did: the same validation images
    graded = evaluate_checkpoint(teachers[0], split="val", device="cpu")["metrics"]
    summary = json.loads((teachers[0] / "summary.json").read_text())
    assert graded["precision_at_1"] == summary["val"]["precision_at_1"]
    student = [*base, "seed=3", "dataset.split_seed=7", "semi.graph=teachers",
               f"semi.teachers=[{teachers[0]},{teachers[1]}]"]
    run(compose_cfg(student), tmp_path / "student")
    recs = [json.loads(x)
            for x in (tmp_path / "student" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["pseudo_from_pixels"] == 0.0 for r in recs)
    assert all(0.5 < r["pseudo_accuracy"] <= 1 for r in recs)
    assert "the teachers' embeddings" in (tmp_path / "student" / "dmlrun.log").read_text()
    # distilling the teachers' geometry: the student's distances follow theirs more closely
    longer = [*student, "sampler.batches_per_epoch=10"]
    run(compose_cfg(longer), tmp_path / "longer")
    run(compose_cfg([*longer, "semi.distill=1000"]), tmp_path / "distilled")
    assert rkd_to_teachers(tmp_path / "distilled", teachers) < \
        0.6 * rkd_to_teachers(tmp_path / "longer", teachers)  # 0.41 measured
    # two processes: each rank's image indices are gathered with its embeddings
    from tests.conftest import run_cli

    two = run_cli([*longer, "semi.distill=1000",
                   "trainer.devices=2", f"hydra.run.dir={tmp_path / 'two'}"],
                  cwd=tmp_path, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    assert rkd_to_teachers(tmp_path / "two", teachers) < \
        0.6 * rkd_to_teachers(tmp_path / "longer", teachers)
    with pytest.raises(ConfigError, match="set semi.graph=teachers"):
        run(compose_cfg([*base, "semi.distill=1"]), tmp_path / "no_teachers")
    for bad in ("semi.teachers=null", "semi.graph=auto"):  # one without the other
        with pytest.raises(ConfigError, match="semi.teachers is read only then"):
            run(compose_cfg([*student, bad]), tmp_path / "half")
    with pytest.raises(ConfigError, match="kept the labels of other images"):
        run(compose_cfg([*student, "dataset.split_seed=8"]), tmp_path / "other_picks")
    (teachers[1] / "checkpoints" / "best.pt").unlink()
    (teachers[1] / "checkpoints" / "last.pt").unlink()
    with pytest.raises(ConfigError, match="no checkpoints/best.pt"):
        run(compose_cfg(student), tmp_path / "no_checkpoint")


def test_knn_indices_match_brute_force():
    from dmlrun.semi import knn_indices

    x = torch.randn(300, 7, generator=torch.Generator().manual_seed(0))
    d, idx = knn_indices(x, x, 5, exclude_self=True, chunk=64)
    full = torch.cdist(x, x).fill_diagonal_(float("inf"))
    ref = full.topk(5, dim=1, largest=False)
    assert torch.equal(idx, ref.indices)
    torch.testing.assert_close(d, ref.values, rtol=1e-4, atol=1e-4)
    # queries against another set, more queries than a chunk (one buffer, a short last chunk)
    d, idx = knn_indices(x[:150], x[150:], 3, exclude_self=False, chunk=64)
    ref = torch.cdist(x[:150], x[150:]).topk(3, dim=1, largest=False)
    assert torch.equal(idx, ref.indices)
    torch.testing.assert_close(d, ref.values, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("width, block", [(1000, 128), (1024, 64), (37, 8), (600, 100)])
def test_smallest_in_rows_equals_topk(width, block):
    """The block-minima search returns what topk returns, columns included: rows with
    distinct values (one answer) and rows with equal values planted among their nearest
    (where topk's own pick among equals must be kept)."""
    from dmlrun.semi.labels import smallest_in_rows

    g = torch.Generator().manual_seed(width)
    d = torch.rand(64, width, generator=g)
    low = d.topk(6, dim=1, largest=False)
    d[:8].scatter_(1, low.indices[:8, 4:6], 0.001)  # a tie at the 5th and 6th smallest
    d[8:16].scatter_(1, low.indices[8:16, 1:3], 0.0005)  # a tie inside the first five
    d[16:24, -5:] = -1.0 - 0.01 * torch.arange(5)  # the smallest in the short last block
    beside = (low.indices[24:32, :1] ^ 1).clamp_max(width - 1)  # in the smallest's block
    d[24:32].scatter_(1, beside, float("nan"))  # a NaN hides that block's minimum
    for k in (1, 5):
        values, columns = smallest_in_rows(d, k, block=block)
        ref = d.topk(k, dim=1, largest=False)
        assert torch.equal(values, ref.values)
        assert torch.equal(columns, ref.indices)


def test_pca_keeps_the_distances_of_data_in_a_subspace():
    from dmlrun.semi import pca

    g = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(40, 3, generator=g))[0]  # a 3-D subspace of 40-D
    x = torch.randn(500, 3, generator=g) @ basis.T + 5.0
    z = pca(x, 3)
    assert z.shape == (500, 3)
    torch.testing.assert_close(torch.pdist(z), torch.pdist(x), rtol=1e-3, atol=1e-3)
    assert pca(x, 64) is x  # already narrow enough
    assert torch.equal(pca(x, 3), z)  # seeded: the same axes every call


def test_label_propagation_recovers_clusters_with_and_without_pca_and_balancing():
    emb, truth = blobs(spread=0.6, dim=30)
    labeled = pick_labeled(truth, 2, seed=0)
    for prop in (LabelPropagation(pca_dims=5), LabelPropagation(pca_dims=None, balance=False)):
        q = pseudo_label_quality(prop(emb, labeled, truth[labeled], 5), truth, labeled)
        assert q["pseudo_accuracy"] > 0.97 and q["pseudo_kept_fraction"] == 1.0


def test_penultimate_features_are_what_the_last_layer_reads():
    from dmlrun.data.dataset import Split
    from dmlrun.evaluation import penultimate_features
    from dmlrun.models.convnet import ConvNet
    from dmlrun.semi import feature_layer

    model = ConvNet(embedding_dim=2, hidden_dim=32)
    images = torch.randint(0, 256, (50, 1, 28, 28), dtype=torch.uint8)
    split = Split(images, torch.zeros(50, dtype=torch.long))
    feats = penultimate_features(model, split, batch_size=16)
    assert feats.shape == (50, 32)
    from dmlrun.metrics import embed_split

    torch.testing.assert_close(model.head[-1](feats), embed_split(model, split, 16))
    assert feature_layer("auto", 2) == "penultimate" and feature_layer("auto", 64) == "output"
    assert feature_layer("output", 2) == "output"
    with pytest.raises(ValueError, match="semi.features"):
        feature_layer("last", 2)


def test_two_views_of_an_image_are_each_others_positive():
    """The views term sees each image twice; with an augmentation that changes nothing,
    its loss is NT-Xent on the doubled batch labelled by image."""
    from dmlrun.losses.supcon import NTXentLoss
    from dmlrun.models.convnet import ConvNet
    from dmlrun.train import StepConfig, ViewsTerm, views_loss

    model = ConvNet(embedding_dim=8, hidden_dim=32)
    images = torch.randint(0, 256, (6, 1, 28, 28), dtype=torch.uint8)
    ids = torch.tensor([4, 9, 1, 7, 0, 3])
    loss = NTXentLoss(temperature=0.5)
    cfg = StepConfig(views=ViewsTerm(loss, lambda x: x, weight=0.5))
    got = views_loss(model, images, ids, cfg)
    doubled = torch.cat([images, images]).float() / 255  # embedded as one batch, as there
    want = loss(model(doubled), torch.cat([ids, ids]))
    torch.testing.assert_close(got, 0.5 * want)
    # a real augmentation makes the two views differ, so the loss is not the identity's
    from dmlrun.augment import RandomAffine

    cfg.views.augment = RandomAffine(degrees=30)
    assert not torch.allclose(views_loss(model, images, ids, cfg), got)


def test_views_batches_draw_every_training_image_before_repeating():
    from dmlrun.data.samplers import PKSampler

    truth = torch.arange(5).repeat(40)  # 200 images
    labeled = pick_labeled(truth, 2, 0)
    semi = SemiSupervision(truth, labeled, 5, PKSampler(5, 2, batches_per_epoch=15), None,
                           views_batch=20)
    epoch = semi.next_epoch(lambda space: None, torch.Generator().manual_seed(0))
    views = epoch.views
    assert views.shape == (15, 20)
    first = views.flatten()[:200]
    assert torch.equal(first.sort().values, torch.arange(200))


def test_semi_table_gives_mean_sd_and_each_seed(tmp_path):
    import subprocess
    import sys

    from tests.conftest import REPO

    p1 = {"labeled_only": [0.5, 0.6, 0.7], "semi_propagation": [0.95, 0.97, 0.96]}
    for tag, values in p1.items():
        for seed, v in enumerate(values):
            d = tmp_path / tag / f"d2_s{seed}"
            d.mkdir(parents=True)
            (d / "summary.json").write_text(json.dumps({
                "tag": tag, "embedding_dim": 2, "seed": seed, "wall_seconds": 120.0,
                "test": {"precision_at_1": v, "map_at_r": v / 2, "nmi": v / 3},
                "baselines": {"raw_pixels": {"precision_at_1": 0.9558, "map_at_r": 0.31,
                                             "nmi": 0.4325}}}))
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "semi_table.py"),
                          str(tmp_path)], capture_output=True, text=True, check=True).stdout
    rows = {line.split(" | ")[0].strip("| "): line for line in out.splitlines()[2:]}
    assert "0.6000 ± 0.1000" in rows["labeled_only"]  # mean ± sample sd of 0.5, 0.6, 0.7
    assert "| 0.9500, 0.9700, 0.9600 | 0.4750, 0.4850, 0.4800 |" in rows["semi_propagation"]
    assert "| 2.0 |" in rows["semi_propagation"]  # minutes per run
    assert rows["raw pixels"].startswith("| raw pixels | 784 | 0.9558 | 0.3100 | 0.4325")
    assert out.splitlines()[0].count("|") == rows["raw pixels"].count("|")


def test_confidence_weights_favour_sure_pseudo_labels():
    """Entropy weights (Iscen et al. 2019): points between two clusters weigh less than
    points inside one, and the weighted draw takes the heavy ones more often."""
    from dmlrun.semi import weighted_pk_batches

    emb, truth = blobs(spread=2.0)  # overlapping clusters: about 5% labelled wrong
    labeled = pick_labeled(truth, 2, seed=0)
    out = LabelPropagation(k=10, weights=True, pca_dims=None)(emb, labeled,
                                                               truth[labeled], 5)
    w = out.weight
    assert w.shape == truth.shape and (w >= 0).all() and (w <= 1).all()
    assert (w[labeled] == 1).all()
    right = out.labels == truth
    assert w[right].mean() > w[~right].mean() + 0.1  # wrong ones are the unsure ones
    q = pseudo_label_quality(out, truth, labeled)
    assert q["pseudo_weighted_accuracy"] > q["pseudo_accuracy"]
    g = torch.Generator().manual_seed(0)
    idx = weighted_pk_batches(out.labels, w, 5, 10, 400, g)
    assert idx.shape == (400, 50)
    for b in range(3):  # class by class: K members of one pseudo-class per slot
        assert all(len(torch.unique(out.labels[idx[b, s * 10:(s + 1) * 10]])) == 1
                   for s in range(5))
    drawn = torch.bincount(idx.flatten(), minlength=len(truth)).float()
    for c in range(5):  # classes are drawn alike; within one, sure members more often
        members = out.labels == c
        assert torch.corrcoef(torch.stack([w[members], drawn[members]]))[0, 1] > 0.3
    assert LabelPropagation()(emb, labeled, truth[labeled], 5).weight is None


@pytest.mark.parametrize("override, message", [
    ("semi.graph=umap",
     "semi.graph must be one of embedding, pixels, auto, teachers, got 'umap'"),
    ("semi.refresh_every=0", "semi.refresh_every must be >= 1, got 0"),
    ("semi.warmup_epochs=-1", "semi.warmup_epochs must be >= 0, got -1"),
    ("semi.refresh_every=abc", "semi.refresh_every must be an integer or null, got 'abc'"),
])
def test_bad_semi_settings_are_config_errors_before_any_data(override, message):
    from dmlrun.assemble import check_config
    from dmlrun.errors import ConfigError
    from tests.conftest import compose_cfg

    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_config(compose_cfg(["experiment=semi_propagation", override]))
