"""`loss=triplet miner=hard` on real MNIST: plain batch-hard (one override away) collapses
from a random start and says so; the shipped default (growing mining pools, warm-up)
trains instead: the loss falls under the margin and the gap between negative and positive
distances grows. Also the learning-rate warm-up itself."""

import json

import pytest

from dmlrun.losses import TripletLoss
from dmlrun.miners import HardMiner
from dmlrun.run import run
from dmlrun.train import StepConfig, train_epoch, warmup_factor
from tests.conftest import TINY, compose_cfg, rate_recording_setup, run_cli

SHORT = [o for o in TINY if not o.startswith(("sampler.batches_per_epoch", "trainer.max_"))] + [
    "dataset.train_size=3000", "sampler.k=10", "sampler.batches_per_epoch=100",
    "trainer.max_epochs=2",
    "trainer.epoch_plots=false", "evaluation.baselines=false", "loss=triplet", "miner=hard",
    # the hard-mining recipe as measured in docs/results.md: the plain convnet, no warp
    "model=convnet", "augment=none"]
PLAIN = ["miner.pool_k=null"]


def short_run(tmp_path, data_dir, caplog, extra):
    cfg = compose_cfg(SHORT + [f"paths.data_dir={data_dir}"] + extra)
    with caplog.at_level("WARNING"):
        summary = run(cfg, tmp_path / "run")
    folder = tmp_path / "run"
    epochs = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
    steps = [json.loads(x) for x in (folder / "steps.jsonl").read_text().splitlines()]
    return summary, epochs, steps, caplog.text


def test_plain_batch_hard_collapses_and_warns(tmp_path, data_dir, caplog):
    summary, epochs, steps, log = short_run(tmp_path, data_dir, caplog, PLAIN)
    assert steps[0]["inverted"] > 0.5  # most hardest negatives are closer than the positive
    assert epochs[-1]["neg_distance"] < 0.05 * steps[0]["neg_distance"]  # shrunk to a point
    assert epochs[-1]["train_loss"] == pytest.approx(1.0, abs=0.01)  # stuck at the margin
    assert "collapsed" in log or "stuck at the margin" in log


def test_default_hard_mining_trains(tmp_path, data_dir, caplog):
    cfg = compose_cfg(SHORT)
    assert cfg.miner.pool_k == 2 and cfg.miner.grow  # loss_miner/triplet_hard.yaml
    summary, epochs, steps, log = short_run(tmp_path, data_dir, caplog, [])
    assert "collapsed" not in log and "stuck at the margin" not in log
    # the mean over all triplets (the loss optimised is over active ones) ends well under
    # the margin, and most triplets no longer have their negative closer than the positive
    assert epochs[-1]["train_tuple_loss"] < 0.5 * cfg.loss.margin
    gap = [s["neg_distance"] - s["pos_distance"] for s in steps]
    assert sum(gap[-10:]) / 10 > 5 * sum(gap[:10]) / 10 > 0
    assert epochs[-1]["inverted_fraction"] < 0.5
    assert summary["test"]["precision_at_1"] > 0.8


def test_warmup_rises_linearly_per_step_and_hands_back_the_scheduled_rate():
    assert warmup_factor(0, 1, 0, 10) == 1.0
    assert [warmup_factor(0.5, 1, s, 10) for s in range(6)] == [0.2, 0.4, 0.6, 0.8, 1, 1]
    assert warmup_factor(2, 2, 4, 10) == pytest.approx(0.75)
    split, model, opt, epoch = rate_recording_setup()
    cfg = StepConfig(progress_bar=False, warmup_epochs=2)
    for epoch_no in (1, 2, 3):
        train_epoch(model, TripletLoss(), HardMiner(), opt, split, epoch, cfg,
                    epoch_no=epoch_no)
        assert opt.param_groups[0]["lr"] == 0.01  # the scheduler's rate, untouched
    assert opt.seen == pytest.approx([0.01 * i / 8 for i in range(1, 9)] + [0.01] * 4)


def test_the_log_names_the_specialisation_and_the_mining(tmp_path):
    res = run_cli(["loss=triplet", "miner=hard", "dataset.train_size=1000",
                   "dataset.val_size=200", "dataset.test_size=300", "dataset.download=false",
                   "sampler.batches_per_epoch=2", "trainer.max_epochs=1",
                   "trainer.epoch_plots=false", "evaluation.baselines=false",
                   f"hydra.run.dir={tmp_path}/r"], cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    log = (tmp_path / "r" / "dmlrun.log").read_text()
    assert "configs/loss_miner/triplet_hard.yaml" in log
    assert "configs/loss_miner_optimizer/triplet_hard_adam.yaml" in log
    assert "pool_k=2, grow=True, max_inverted=0.1" in log and "lr 0.003" in log
