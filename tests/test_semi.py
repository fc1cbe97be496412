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


SEMI = [*TINY, "trainer.epoch_plots=false", "evaluation.baselines=false",
        "semi=propagation", "dataset.labeled_per_class=10", "sampler.k=10",
        "semi.warmup_epochs=1", "semi.refresh_every=1"]


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
    assert state["semi"]["epoch_no"] == state["epoch"]  # the pseudo-labels are saved
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


def test_auto_graph_starts_on_pixels_and_switches_when_the_model_beats_them():
    truth = torch.arange(4).repeat_interleave(10)
    labeled = pick_labeled(truth, 2, 0)
    spaces = []

    def method(features, labeled, labels, num_classes):
        return LabelPropagation(k=3)(features, labeled, labels, num_classes)

    from dmlrun.data.samplers import PKSampler

    semi = SemiSupervision(truth, labeled, 4, PKSampler(4, 2), method, warmup_epochs=0,
                           refresh_every=1, p=4, k=2, graph="auto", pixel_val_p1=0.9)
    feats = torch.randn(40, 3) + truth[:, None] * 4.0

    def features(space):
        spaces.append(space)
        return feats

    g = torch.Generator().manual_seed(0)
    semi.next_epoch(features, g)
    assert semi.observe(0.85) is None  # not better than raw pixels yet
    semi.next_epoch(features, g)
    assert "learned features" in semi.observe(0.95)
    semi.next_epoch(features, g)
    assert spaces == ["pixels", "embedding"]  # the pixels' pseudo-labels are computed once
    assert semi.quality["pseudo_from_pixels"] == 0.0
    state = semi.state_dict()
    fresh = SemiSupervision(truth, labeled, 4, PKSampler(4, 2), method, graph="auto")
    fresh.load_state_dict(state)
    assert fresh.space == "embedding"  # a resumed run keeps the switch
    with pytest.raises(ValueError, match="semi.graph"):
        SemiSupervision(truth, labeled, 4, PKSampler(4, 2), method, graph="umap")
