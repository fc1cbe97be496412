"""The real ``dmlrun`` command end to end on a small MNIST subset, and its error exits."""

import csv
import json
import math
import re
import sys

import pytest
import torch

import dmlrun
from dmlrun.data.idx import load_mnist
from dmlrun.losses import ProxyAnchorLoss
from dmlrun.metrics import embed, retrieval_metrics
from dmlrun.run import run
from tests.conftest import TINY, compose_cfg, run_cli


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, data_dir):
    run_dir = tmp_path_factory.mktemp("e2e") / "run"
    res = run_cli(TINY + [f"hydra.run.dir={run_dir}"], cwd=run_dir.parent)
    assert res.returncode == 0, res.stderr[-3000:]
    return run_dir


def test_run_folder_has_every_file(finished_run):
    d = finished_run
    for rel in [".hydra/config.yaml", ".hydra/overrides.yaml", ".hydra/hydra.yaml", "dmlrun.log",
                "checkpoints/last.pt", "checkpoints/best.pt", "metrics.jsonl", "summary.json",
                "plots/embedding.png", "plots/curves.png", "plots/epochs/epoch_001.png",
                "plots/epochs/epoch_002.png", "plots/epochs/embedding.gif"]:
        assert (d / rel).is_file() and (d / rel).stat().st_size > 0, rel
    lines = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in lines] == [1, 2]
    for rec in lines:
        for key in ("train_loss", "mined_per_step", "tuples_per_step", "active_fraction",
                    "val_precision_at_1", "val_map_at_r", "epoch_seconds", "samples_per_s"):
            assert key in rec, key
        # the default's hard miner in growing pools: one triplet per anchor with a positive
        # in its pool (240 of the 10 x 25 in pools of 2 per class, all 250 in the whole batch)
        assert 240 <= rec["mined_per_step"] <= 250
    summary = json.loads((d / "summary.json").read_text())
    assert summary["choices"]["loss"] == "triplet_soft" and summary["choices"]["miner"] == "hard"
    # the default tests its last epoch (trainer.select=last)
    assert summary["select"] == "last" and summary["best_epoch"] == 2
    assert 0.0 <= summary["test"]["precision_at_1"] <= 1.0
    assert summary["val"]["precision_at_1"] == lines[-1]["val_precision_at_1"]
    assert summary["embedding_dim"] == 2 and summary["device"] == "cpu"
    assert set(summary["baselines"]) == {"untrained", "raw_pixels"}
    for row in (summary["test"], *summary["baselines"].values()):
        assert {"nmi", "ami", "knn_accuracy", "map_at_r", "recall_at_8"} <= set(row)
    # raw pixels are a strong MNIST baseline for 1-NN; the untrained 2-D net is not
    assert summary["baselines"]["raw_pixels"]["precision_at_1"] > 0.8
    assert "val_nmi" in lines[0] and "val_knn_accuracy" in lines[0]
    log = (d / "dmlrun.log").read_text()
    assert "epoch 1" in log
    # the specialisation files Hydra applied to this combination are named
    for path in ("loss_miner/triplet_soft_hard.yaml", "experiment_dataset/default_mnist.yaml"):
        assert f"settings for this combination from configs/{path}" in log, path


def test_load_embedder_reproduces_test_metrics(finished_run, data_dir):
    model = dmlrun.load_embedder(finished_run)
    assert not model.training
    data = load_mnist(str(data_dir), val_size=500, train_size=1500, test_size=800,
                      download=False, seed=0)
    x = data.test.images[:4].float() / 255
    assert model(x).shape == (4, 2)
    emb = embed(model, data.test.images)
    summary = json.loads((finished_run / "summary.json").read_text())
    got = retrieval_metrics(emb, data.test.labels)["precision_at_1"]
    assert got == pytest.approx(summary["test"]["precision_at_1"], abs=1e-9)
    # a checkpoint file works too
    ckpt_model = dmlrun.load_embedder(finished_run / "checkpoints" / "last.pt")
    assert ckpt_model(x).shape == (4, 2)


def test_rerun_into_finished_folder_is_refused(finished_run):
    before = {p: p.read_bytes() for p in [finished_run / "summary.json",
                                          finished_run / "checkpoints" / "best.pt",
                                          finished_run / ".hydra" / "config.yaml",
                                          finished_run / ".hydra" / "overrides.yaml"]}
    # different settings, so that an overwritten .hydra/ would show
    res = run_cli(TINY + ["seed=5", f"hydra.run.dir={finished_run}"], cwd=finished_run.parent)
    assert res.returncode == 2
    assert "already holds a run" in res.stderr and "Traceback" not in res.stderr
    assert all(p.read_bytes() == b for p, b in before.items())


def test_unknown_loss_lists_choices(tmp_path):
    res = run_cli(["loss=nosuchloss", f"hydra.run.dir={tmp_path}/r"], cwd=tmp_path)
    assert res.returncode != 0
    err = res.stderr + res.stdout
    assert "nosuchloss" in err and "contrastive" in err and "triplet" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("override,hint", [
    ("trainer.max_epoch=3", "Did you mean trainer.max_epochs?"),
    ("loss=tripplet", "Did you mean loss=triplet?"),
    ("loss.margn=0.5", "Did you mean loss.margin?"),
    ("lss=triplet", "Did you mean loss?"),
])
def test_typos_get_the_closest_valid_name(tmp_path, override, hint):
    res = run_cli([override, f"hydra.run.dir={tmp_path}/r"], cwd=tmp_path)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.startswith("dmlrun: error:") and hint in res.stderr
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("override", ["lss=triplet", "trainer.max_epoch=3"])
def test_a_typo_is_reported_without_importing_torch(tmp_path, override):
    res = run_cli([override, f"hydra.run.dir={tmp_path}/r"], cwd=tmp_path,
                  exe=[sys.executable, "-X", "importtime", "-m", "dmlrun"])
    assert res.returncode == 2 and "Did you mean" in res.stderr
    imported = [line.rsplit("|", 1)[-1].strip() for line in res.stderr.splitlines()
                if line.startswith("import time:")]
    assert "dmlrun.cli" in imported and "torch" not in imported


def test_triplet_loss_with_pair_sampler_fails_early(tmp_path):
    res = run_cli(["loss=triplet", "sampler=pairs", "miner=none", f"hydra.run.dir={tmp_path}/r"],
                  cwd=tmp_path)
    assert res.returncode == 2
    assert "loss=triplet" in res.stderr and "sampler=pairs" in res.stderr
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_proxy_loss_with_a_miner_fails_early(tmp_path):
    res = run_cli(["loss=proxy_anchor", "distance=cosine", "miner=hard",
                   f"hydra.run.dir={tmp_path}/r"], cwd=tmp_path)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "loss=proxy_anchor" in res.stderr and "miner=hard" in res.stderr
    assert "miner=none" in res.stderr


def test_proxy_run_trains_proxies_and_writes_diagnostics(tmp_path, data_dir):
    cfg = compose_cfg(TINY + [f"paths.data_dir={data_dir}", "trainer.epoch_plots=false",
                              "experiment=proxy_anchor", "evaluation.baselines=false"])
    summary = run(cfg, tmp_path / "run")
    assert 0 <= summary["test"]["precision_at_1"] <= 1
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=False)
    proxies = ckpt["loss"]["proxies"]
    torch.manual_seed(0)  # the run's seed: the same initial proxies
    initial = ProxyAnchorLoss(10, 2).proxies.detach()
    assert proxies.shape == (10, 2) and not torch.allclose(proxies, initial, atol=1e-3)
    groups = ckpt["optimizer"]["param_groups"]
    assert len(groups) == 2 and groups[1]["lr"] == pytest.approx(0.01 * groups[0]["lr"] / 1e-3)
    steps = [json.loads(x) for x in (tmp_path / "run" / "steps.jsonl").read_text().splitlines()]
    assert [(s["epoch"], s["step"]) for s in steps] == [(e, i) for e in (1, 2) for i in range(1, 5)]
    # no miner: "mined" is what the loss was given, in both files
    assert all(s["tuples"] == 2500 and s["mined"] == 2500 and s["loss"] > 0 for s in steps)
    rec = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert rec["mined_per_step"] == 2500 and rec["no_mining_steps"] == 0
    assert rec["neg_distance"] == pytest.approx(sum(s["neg_distance"] for s in steps[4:]) / 4)


def test_warnings_for_no_mining_and_collapse(tmp_path, data_dir, monkeypatch, caplog):
    import dmlrun.epoch_end
    import dmlrun.train

    monkeypatch.setattr(dmlrun.train, "NO_MINING_STEPS", 3)
    monkeypatch.setattr(dmlrun.epoch_end, "COLLAPSE_RATIO", 10.0)  # any run counts as collapsed
    cfg = compose_cfg(TINY + [f"paths.data_dir={data_dir}", "trainer.epoch_plots=false",
                              "evaluation.baselines=false", "loss=contrastive",
                              "miner=pair_margin",
                              "miner.pos_margin=1e9", "miner.neg_margin=0"])
    with caplog.at_level("WARNING"):
        run(cfg, tmp_path / "run")
    text = caplog.text
    assert re.search(r"the miner has found no tuples for [34] steps", text)
    assert "the embeddings have collapsed" in text
    rec = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert rec["no_mining_steps"] == 4 and rec["mined_per_step"] == 0 and rec["train_loss"] == 0


def test_missing_data_names_files(tmp_path):
    empty = tmp_path / "nodata"
    res = run_cli(TINY + [f"hydra.run.dir={tmp_path}/r"], cwd=tmp_path,
                  env_extra={"DMLRUN_DATA_DIR": str(empty)})
    assert res.returncode == 2
    assert "train-images-idx3-ubyte" in res.stderr and str(empty) in res.stderr
    assert "DMLRUN_DATA_DIR" in res.stderr and "Traceback" not in res.stderr


def test_early_stopping_stops(tmp_path, data_dir):
    # patience 1 with a learning rate of 0 (and no BatchNorm statistics that would move):
    # no epoch after the first can improve (the default tests its last epoch, where early
    # stopping never fires: select=best here)
    cfg = compose_cfg(TINY + [f"paths.data_dir={data_dir}", "trainer.max_epochs=4",
                              "model=convnet", "trainer.select=best",
                              "trainer.early_stopping_patience=1", "optimizer.lr=0",
                              "evaluation.baselines=false", "scheduler=none"])
    summary = run(cfg, tmp_path / "run")
    assert summary["epochs"] == 2 and summary["best_epoch"] == 1


@pytest.mark.parametrize("overrides", [
    ["loss=triplet", "miner=hard"],
    ["experiment=siamese_pairs"],
    ["loss=triplet", "miner=semihard", "model=mlp", "distance=cosine", "model.embedding_dim=8",
     "optimizer=sgd", "scheduler=step"],
])
def test_other_setups_train_in_process(tmp_path, data_dir, overrides):
    cfg = compose_cfg(TINY + [f"paths.data_dir={data_dir}", "trainer.epoch_plots=false",
                              *overrides])
    summary = run(cfg, tmp_path / "run")
    assert (tmp_path / "run" / "plots" / "embedding.png").is_file()
    assert summary["epochs"] == 2 and torch.isfinite(torch.tensor(summary["test"]["map_at_r"]))


def test_evaluate_command_on_run_folder(finished_run, tmp_path):
    out = tmp_path / "eval.json"
    # on the CPU like the run, so that k-means sums in the same order
    res = run_cli([str(finished_run), "--split", "test", "--output", str(out)], cwd=tmp_path,
                  exe=[sys.executable, "-m", "dmlrun.evaluate_cli"],
                  env_extra={"CUDA_VISIBLE_DEVICES": ""})
    assert res.returncode == 0, res.stderr
    result = json.loads(out.read_text())
    summary = json.loads((finished_run / "summary.json").read_text())
    assert result["n"] == 800 and result["split"] == "test"
    for k in ("precision_at_1", "map_at_r", "nmi"):
        # the run embedded in channels-last layout; float noise may reorder near-ties
        assert result["metrics"][k] == pytest.approx(summary["test"][k], abs=1e-4), k
    # class-disjoint view of the same model, and a refusal to overwrite the output
    res = run_cli([str(finished_run), "dataset.train_classes=[0,1,2,3,4]", "--output", str(out)],
                  cwd=tmp_path, exe=[sys.executable, "-m", "dmlrun.evaluate_cli"])
    assert res.returncode == 2 and "refusing to overwrite" in res.stderr


def test_naming_the_runs_own_dataset_keeps_its_hold_out(finished_run):
    from dmlrun.evaluate_cli import evaluate_checkpoint

    own = evaluate_checkpoint(finished_run, split="val", device="cpu")
    named = evaluate_checkpoint(finished_run, ["dataset=mnist"], split="val", device="cpu")
    # the run's 500 held-out images, not a fresh config's hold-out drawn over its training
    # images
    assert own["n"] == named["n"] == 500
    assert named["metrics"] == own["metrics"]
    capped = evaluate_checkpoint(finished_run, ["dataset=mnist", "dataset.test_size=300"],
                                 device="cpu")
    assert capped["n"] == 300 and capped["overrides"] == ["dataset=mnist", "dataset.test_size=300"]


def test_evaluate_command_bad_path(tmp_path):
    res = run_cli([str(tmp_path / "missing.pt")], cwd=tmp_path,
                  exe=[sys.executable, "-m", "dmlrun.evaluate_cli"])
    assert res.returncode == 2 and "checkpoint not found" in res.stderr
    assert "Traceback" not in res.stderr


def test_sweep_2x2x3_summary_matches_hand_computation(tmp_path, data_dir):
    """A real 2 (losses) x 2 (miners) x 3 (seeds) sweep, then dmlrun-summarize."""
    import statistics

    from scipy.stats import t

    from dmlrun.summarize import main as summarize_main

    res = run_cli(["-m", *TINY, "sampler.batches_per_epoch=2", "trainer.max_epochs=1",
                   "trainer.epoch_plots=false", "evaluation.baselines=false",
                   "loss=contrastive,triplet", "miner=easy_hard,semihard", "seed=0,1,2",
                   f"paths.multirun_dir={tmp_path}/multirun"], cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    summaries = sorted((tmp_path / "multirun").glob("*/*/*/summary.json"))
    assert len(summaries) == 12
    assert all("loss-" in p.parent.name and "seed-" in p.parent.name for p in summaries)
    (sweep,) = {p.parent.parent for p in summaries}
    by_group: dict = {}
    for p in summaries:
        s = json.loads(p.read_text())
        key = (s["choices"]["loss"], s["choices"]["miner"])
        by_group.setdefault(key, []).append(s["test"]["precision_at_1"])
    assert summarize_main([str(sweep)]) == 0
    rows = list(csv.DictReader((sweep / "summary.csv").read_text().splitlines()))
    assert len(rows) == 4
    for r in rows:
        values = by_group[(r["loss"], r["miner"])]
        assert int(r["test.precision_at_1 n"]) == 3
        mean, sd = statistics.mean(values), statistics.stdev(values)
        assert float(r["test.precision_at_1 mean"]) == pytest.approx(mean)
        assert float(r["test.precision_at_1 ci95"]) == pytest.approx(
            t.ppf(0.975, 2) * sd / math.sqrt(3))
    for f in ("summary.md", "comparison.png", "embeddings.png"):
        assert (sweep / f).stat().st_size > 0


@pytest.mark.parametrize("bad,match", [
    ("model.embedding_dim=0", "cannot build model=.*embedding_dim >= 1"),
    ("optimizer.lr=abc", "cannot build optimizer="),
    ("loss.margin=-1", "cannot build loss=.*margin.*>= 0"),
    ("trainer.monitor=accuracy", "trainer.monitor must be one of precision_at_1"),
])
def test_bad_values_raise_config_error(tmp_path, data_dir, bad, match):
    from dmlrun.errors import ConfigError

    cfg = compose_cfg(TINY + [f"paths.data_dir={data_dir}", bad])
    with pytest.raises(ConfigError, match=match):
        run(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.slow
def test_a_compiled_run_trains_and_saves_plain_weights(tmp_path, data_dir):
    cfg = compose_cfg(TINY + [f"paths.data_dir={data_dir}", "trainer.epoch_plots=false",
                              "evaluation.baselines=false", "trainer.compile=default"])
    summary = run(cfg, tmp_path / "run")
    assert summary["test"]["precision_at_1"] > 0.3
    state = torch.load(tmp_path / "run" / "checkpoints" / "best.pt", weights_only=False)
    assert not any(k.startswith("_orig_mod") for k in state["model"])
    assert dmlrun.load_embedder(tmp_path / "run")(torch.zeros(1, 1, 28, 28)).shape == (1, 2)
