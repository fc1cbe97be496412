"""The image benchmarks (CUB-200-2011, Cars196, SOP, In-Shop) on replicas of their official
layouts, the ImageNet transforms, and torchvision backbones with pretrained weights read
from a TORCH_HOME the tests prepare (no network)."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dmlrun.data.benchmarks import OFFICIAL, load_benchmark
from dmlrun.data.transforms import ImageNetTransform
from dmlrun.errors import ConfigError, UserError
from dmlrun.metrics import evaluate_embeddings
from dmlrun.models.backbone import TorchvisionEmbedder
from tests.conftest import DATA_DIR, run_cli

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import make_replicas  # noqa: E402

NAMES = ("cub200", "cars196", "sop", "inshop")


@pytest.fixture(scope="module")
def replicas(tmp_path_factory, data_dir):
    root = tmp_path_factory.mktemp("replicas")
    counts = {name: make_replicas.make(name, root, DATA_DIR, per_class=6) for name in NAMES}
    return root, counts


@pytest.mark.parametrize("name", NAMES)
def test_each_replica_parses_with_exact_counts_and_disjoint_classes(replicas, name):
    root, counts = replicas
    data = load_benchmark(name, str(root), ImageNetTransform(32), fold=1, workers=0)
    train_n, train_c = counts[name]["train"]
    assert len(data.train) + len(data.val) == train_n
    train_cls, val_cls = set(data.train.labels.tolist()), set(data.val.labels.tolist())
    test_cls = set(data.test.labels.tolist())
    assert len(train_cls) + len(val_cls) == train_c
    assert len(val_cls) == len(np.array_split(np.arange(train_c), 4)[1])  # fold 1 of 4
    assert not (train_cls & val_cls) and not (test_cls & (train_cls | val_cls))
    assert train_cls == set(range(data.num_classes))  # 0..C-1, as proxy losses want
    if name == "inshop":
        assert data.test.query_count == counts[name]["query"][0]
        assert len(data.test) == counts[name]["query"][0] + counts[name]["gallery"][0]
    else:
        assert data.test.query_count is None
        assert (len(data.test), len(test_cls)) == counts[name]["test"]
    image = data.train.take(torch.tensor([0]))
    assert image.shape == (1, 3, 32, 32) and image.dtype == torch.uint8
    # plots and reports name classes as the dataset does, not by their label positions
    assert len(data.class_names) == train_c + len(test_cls)
    first_test = {"cub200": "101.Replica_101", "cars196": "Replica 99", "sop": "61",
                  "inshop": "id_00000051"}[name]
    assert first_test in {data.class_names[c] for c in test_cls}


def test_replica_counts_differ_from_the_official_ones_and_say_so(replicas, caplog):
    root, _ = replicas
    with caplog.at_level("WARNING", logger="dmlrun"):
        load_benchmark("cub200", str(root), ImageNetTransform(32), workers=0)
    assert f"the official set has {OFFICIAL['cub200']['train'][0]}" in caplog.text


def test_missing_and_malformed_files_are_named(replicas, tmp_path):
    root, _ = replicas
    with pytest.raises(UserError, match=r"CUB_200_2011/images.txt is missing.*caltech"):
        load_benchmark("cub200", str(tmp_path), ImageNetTransform(32))
    bad = tmp_path / "InShop" / "Eval"
    bad.mkdir(parents=True)
    (bad / "list_eval_partition.txt").write_text("2\nimage_name item_id evaluation_status\n"
                                                 "img/a.jpg id_00000001\n")
    with pytest.raises(UserError, match=r"list_eval_partition.txt line 3 is malformed"):
        load_benchmark("inshop", str(tmp_path), ImageNetTransform(32))
    gone = tmp_path / "sop"
    (gone / "Stanford_Online_Products").mkdir(parents=True)
    for f in ("Ebay_train.txt", "Ebay_test.txt"):
        (gone / "Stanford_Online_Products" / f).write_text(
            "image_id class_id super_class_id path\n1 1 1 x_final/1_0.JPG\n")
    with pytest.raises(UserError, match=r"2 image files listed are missing, e.g. .*1_0.JPG"):
        load_benchmark("sop", str(gone), ImageNetTransform(32))
    (gone / "Stanford_Online_Products" / "x_final").mkdir()
    (gone / "Stanford_Online_Products" / "x_final" / "1_0.JPG").write_bytes(b"")
    (gone / "Stanford_Online_Products" / "Ebay_test.txt").write_text(
        "image_id class_id super_class_id path\n1 2 1 x_final/2_0.JPG\n")
    with pytest.raises(UserError, match=r"1 image file listed is missing, e.g. .*2_0.JPG"):
        load_benchmark("sop", str(gone), ImageNetTransform(32))
    with pytest.raises(ConfigError, match="dataset.fold=4"):
        load_benchmark("cub200", str(root), ImageNetTransform(32), fold=4)


def test_a_missing_dataset_is_one_message_and_exit_2(tmp_path):
    res = run_cli(["dataset=cub200", "model=resnet18", "model.weights=null",
                   f"paths.data_dir={tmp_path}", f"hydra.run.dir={tmp_path / 'run'}"],
                  cwd=tmp_path)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "CUB_200_2011/images.txt is missing" in res.stderr


def test_missing_weights_offline_are_one_message_and_exit_2(replicas, tmp_path):
    root, _ = replicas
    res = run_cli(["dataset=cub200", "model=resnet18", f"paths.data_dir={root}",
                   f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path,
                  env_extra={"TORCH_HOME": str(tmp_path / "torch")}, timeout=120)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "resnet18-f37072fd.pth" in res.stderr and str(tmp_path / "torch") in res.stderr
    assert not (tmp_path / "run").exists()  # refused before the run folder was made


def test_query_gallery_metrics_equal_pytorch_metric_learning():
    pml = pytest.importorskip("pytorch_metric_learning.utils.accuracy_calculator")
    g = torch.Generator().manual_seed(0)
    q_labels = torch.randint(0, 30, (300,), generator=g)
    r_labels = torch.cat([torch.arange(30), torch.randint(0, 30, (270,), generator=g)])
    emb = torch.randn(600, 8, generator=g) + torch.cat([q_labels, r_labels])[:, None] * 0.2
    labels = torch.cat([q_labels, r_labels])
    ours = evaluate_embeddings(emb, labels, query_count=300)
    calc = pml.AccuracyCalculator(include=("precision_at_1", "r_precision",
                                           "mean_average_precision_at_r"), k="max_bin_count")
    theirs = calc.get_accuracy(emb[:300], q_labels, emb[300:], r_labels)
    assert ours["precision_at_1"] == pytest.approx(theirs["precision_at_1"], abs=1e-6)
    assert ours["r_precision"] == pytest.approx(theirs["r_precision"], abs=1e-6)
    assert ours["map_at_r"] == pytest.approx(theirs["mean_average_precision_at_r"], abs=1e-6)


def test_imagenet_transform_is_random_only_for_training(tmp_path):
    path = tmp_path / "x.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 80, 3), np.uint8)).save(path)
    t = ImageNetTransform(32)
    assert t.resize == 37  # 32 x 256 / 224
    assert np.array_equal(t(path), t(path)) and t(path).shape == (3, 32, 32)
    a = t(path, np.random.default_rng(5))
    assert np.array_equal(a, t(path, np.random.default_rng(5)))
    assert not np.array_equal(a, t(path, np.random.default_rng(6)))
    rng = np.random.default_rng(1)
    for h, w in ((37, 60), (300, 40), (37, 37)):
        top, left, ch, cw = t.crop_box(h, w, rng)
        assert top >= 0 and top + ch <= h and left >= 0 and left + cw <= w


def test_frozen_batchnorm_keeps_its_statistics_through_a_step(tmp_path):
    import torchvision

    torch.manual_seed(0)
    weights = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), weights)
    for freeze in (True, False):
        model = TorchvisionEmbedder("resnet18", weights=str(weights), embedding_dim=8,
                                    freeze_bn=freeze).train()
        bn = model.trunk.bn1
        before = bn.running_mean.clone()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        model(torch.rand(4, 3, 32, 32)).sum().backward()
        opt.step()
        assert torch.equal(bn.running_mean, before) == freeze
        assert bn.training == (not freeze) and model.embedding.training
    scratch = TorchvisionEmbedder("resnet18", weights=None, embedding_dim=8, freeze_bn=True)
    assert not scratch.freeze_bn  # random weights: BatchNorm learns its statistics


def test_pretrained_weights_load_from_torch_home_and_from_a_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    reference = TorchvisionEmbedder("resnet18", weights=None, embedding_dim=8).trunk
    with pytest.raises(UserError, match=r"put resnet18-f37072fd.pth .* into .*torch/hub/"
                                        r"checkpoints"):
        TorchvisionEmbedder("resnet18", weights="IMAGENET1K_V1", embedding_dim=8)
    import torchvision

    net = torchvision.models.resnet18()
    folder = tmp_path / "torch" / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    torch.save(net.state_dict(), folder / "resnet18-f37072fd.pth")
    torch.save(net.state_dict(), tmp_path / "mine.pth")
    for weights in ("IMAGENET1K_V1", "DEFAULT", str(tmp_path / "mine.pth")):
        model = TorchvisionEmbedder("resnet18", weights=weights, embedding_dim=8)
        assert torch.equal(model.trunk.conv1.weight, net.conv1.weight)
        assert not torch.equal(model.trunk.conv1.weight, reference.conv1.weight)
    with pytest.raises(ConfigError, match="resnet18 offers IMAGENET1K_V1"):
        TorchvisionEmbedder("resnet18", weights="IMAGENET9K", embedding_dim=8)


def test_trunk_learning_rate_is_its_own_group():
    model = TorchvisionEmbedder("resnet18", weights=None, embedding_dim=8, trunk_lr=1e-5)
    groups = model.parameter_groups()
    assert groups[0]["lr"] == 1e-5 and "lr" not in groups[1]
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_bninception_takes_rgb_in_0_1_and_its_published_weights(tmp_path, monkeypatch):
    pytest.importorskip("pretrainedmodels")
    from dmlrun.models.backbone import BNInceptionEmbedder

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(UserError, match=r"put bn_inception-52deb4733.pth .* into .*checkpoints"):
        BNInceptionEmbedder(embedding_dim=8)
    from pretrainedmodels.models.bninception import BNInception

    torch.manual_seed(0)
    source = BNInception(num_classes=1000)
    # the published file keeps BatchNorm weights as (1, C)
    state = {k: v[None] if k.endswith("bn.weight") else v for k, v in
             source.state_dict().items()}
    folder = tmp_path / "torch" / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    torch.save(state, folder / "bn_inception-52deb4733.pth")
    model = BNInceptionEmbedder(embedding_dim=8).eval()
    assert torch.equal(model.trunk.conv1_7x7_s2.weight, source.conv1_7x7_s2.weight)
    x = torch.rand(2, 3, 96, 96)
    # inside: BGR in 0-255 minus (104, 117, 128), as the weights expect
    bgr = x.flip(1) * 255 - torch.tensor([104.0, 117.0, 128.0]).view(1, 3, 1, 1)
    with torch.no_grad():
        want = model.embedding(model.trunk(bgr))
        assert torch.allclose(model(x), torch.nn.functional.normalize(want), atol=1e-4)


@pytest.mark.parametrize("preset", ["mlrc_cub200", "mlrc_cars196", "mlrc_sop", "roth_cub200",
                                    "roth_cars196", "roth_sop"])
def test_benchmark_presets_compose_as_their_papers_describe(preset):
    from tests.conftest import compose_cfg

    cfg = compose_cfg([f"experiment={preset}"])
    assert cfg.dataset.name == preset.split("_")[1] and cfg.model.freeze_bn
    assert cfg.model.embedding_dim == 128 and cfg.model.l2_normalize
    if preset.startswith("mlrc"):
        assert cfg.model._target_.endswith("BNInceptionEmbedder")
        assert cfg.optimizer._target_ == "torch.optim.RMSprop" and cfg.optimizer.lr == 1e-6
        assert (cfg.sampler.p, cfg.sampler.k, cfg.sampler.batches_per_epoch) == (8, 4, 100)
        assert cfg.transform.crop_size == 227 and cfg.trainer.monitor == "map_at_r"
        assert not cfg.evaluation.clustering
    else:
        assert cfg.model.arch == "resnet50" and cfg.optimizer.lr == 1e-5
        assert (cfg.sampler.p, cfg.sampler.k) == (56, 2) and cfg.trainer.max_epochs == 150


def _small_run(root: Path, out: Path, dataset: str, extra: list[str]) -> dict:
    res = run_cli([f"dataset={dataset}", "model=resnet18", "model.weights=null",
                   "transform.crop_size=32", "sampler.p=8", "sampler.k=4",
                   "sampler.batches_per_epoch=3", "trainer.max_epochs=2", "dataset.workers=1",
                   "trainer.device=cpu", "trainer.progress_bar=false", f"paths.data_dir={root}",
                   f"hydra.run.dir={out}", *extra], cwd=out.parent)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads((out / "summary.json").read_text())


@pytest.fixture(scope="module")
def cub_run(replicas, tmp_path_factory):
    """A short CUB-replica run, validating on fold 0."""
    root, _ = replicas
    out = tmp_path_factory.mktemp("cub") / "fold0"
    return out, _small_run(root, out, "cub200", ["dataset.fold=0"])


def test_a_cub_replica_run_leaves_the_usual_folder_with_colour_plots(cub_run):
    run_dir, summary = cub_run
    assert {f"recall_at_{k}" for k in (1, 2, 4, 8)} <= set(summary["test"])
    assert (run_dir / "report.html").stat().st_size > 0
    gallery = np.asarray(Image.open(run_dir / "plots" / "gallery.png").convert("RGB"))
    spread = gallery.astype(int).max(2) - gallery.astype(int).min(2)
    assert (spread > 60).mean() > 0.01  # coloured pixels, not grey


@pytest.mark.slow
def test_fold_models_are_graded_alone_and_concatenated(cub_run, replicas, tmp_path,
                                                        monkeypatch):
    from dmlrun.folds import grade_folds

    root, _ = replicas
    cub_folds = [cub_run, (tmp_path / "fold1", _small_run(root, tmp_path / "fold1", "cub200",
                                                          ["dataset.fold=1"]))]
    monkeypatch.setenv("DMLRUN_DATA_DIR", str(root))
    result = grade_folds([str(run) for run, _ in cub_folds], device="cpu")
    for run, summary in cub_folds:
        assert result["folds"][str(run)] == summary["test"]  # each as its run graded it
    assert result["concatenated_dim"] == 256
    p1 = [s["test"]["precision_at_1"] for _, s in cub_folds]
    assert result["fold_mean"]["precision_at_1"]["mean"] == pytest.approx(sum(p1) / 2)
    assert 0 <= result["concatenated"]["map_at_r"] <= 1


def test_an_inshop_replica_run_grades_query_against_gallery(replicas, tmp_path):
    root, counts = replicas
    summary = _small_run(root, tmp_path / "run", "inshop", ["evaluation.clustering=false"])
    assert "nmi" not in summary["test"] and "nmi" not in summary["baselines"]["untrained"]
    ks = {f"recall_at_{k}" for k in (1, 10, 20, 30, 40)}  # In-Shop's Recall@K
    assert ks <= set(summary["test"]) and ks <= set(summary["baselines"]["raw_pixels"])
    assert "recall_at_2" not in summary["test"]
    page = (tmp_path / "run" / "report.html").read_text()
    assert "<th>R@40</th>" in page
    queries = counts["inshop"]["query"][0]
    protocol = f"{queries} queries against a gallery of {counts['inshop']['gallery'][0]}"
    assert summary["test_protocol"] == protocol and f"Test metrics ({protocol})" in page
    # per-class figures are the queries' own, as the test metrics grade them
    per_class = summary["per_class"].values()
    assert sum(c["n"] for c in per_class) == queries
    assert sum(c["precision_at_1"] * c["n"] for c in per_class) / queries == pytest.approx(
        summary["test"]["precision_at_1"])
    res = run_cli([str(tmp_path / "run"), f"paths.data_dir={root}", "--output",
                   str(tmp_path / "eval.json")], cwd=tmp_path,
                  exe=[sys.executable, "-m", "dmlrun.evaluate_cli"])
    assert res.returncode == 0, res.stderr[-2000:]
    graded = json.loads((tmp_path / "eval.json").read_text())
    assert graded["metrics"] == summary["test"]
    assert graded["n"] == counts["inshop"]["query"][0] + counts["inshop"]["gallery"][0]
    # an image file searched against an index of the split it is in reads as the run read
    # it (shorter side resized, centre crop: not a squash to the square), so it finds itself
    from dmlrun.index import Index

    index = Index.build(tmp_path / "run", ["dataset=inshop", "split=test",
                                           f"paths.data_dir={root}"], tmp_path / "index",
                        device="cpu", progress=False)
    first = index.source(0)[0].split.paths[0]
    hits = index.search_files([first], k=1)
    assert hits.indices[0, 0] == 0 and float(hits.distances[0, 0]) < 1e-4
