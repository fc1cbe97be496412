"""`loss=triplet miner=hard` on real MNIST: plain batch-hard collapses from a random start
and says so; the shipped default (growing mining pools) trains instead: the loss falls
under the margin and the gap between negative and positive distances grows."""

import json

import pytest

from dmlrun.run import run
from tests.conftest import TINY, compose_cfg

SHORT = [o for o in TINY if not o.startswith(("sampler.batches_per_epoch", "trainer.max_"))] + [
    "dataset.train_size=3000", "sampler.k=10", "sampler.batches_per_epoch=100",
    "trainer.max_epochs=2",
    "trainer.epoch_plots=false", "evaluation.baselines=false", "loss=triplet", "miner=hard"]
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
