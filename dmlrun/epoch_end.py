"""After each epoch: checkpoint and record it, log it with its warnings, and decide on
early stopping (``EpochEnd``)."""

from __future__ import annotations

import logging
from typing import Any

from dmlrun import distributed
from dmlrun.distributed import Ranks
from dmlrun.recorder import Recorder, TrainingState
from dmlrun.task import Task

log = logging.getLogger("dmlrun")

COLLAPSE_RATIO = 0.01  # class distances this small a fraction of the start: collapsed


class EpochEnd:
    """After each epoch: the main process checkpoints and records it, logs it with the
    loss's warnings, and decides on early stopping; every process follows."""

    def __init__(self, recorder: Recorder, training: TrainingState, task: Task, logger: Any,
                 patience: int | None, ranks: Ranks) -> None:
        self.recorder, self.training, self.task, self.logger = recorder, training, task, logger
        self.patience, self.ranks = patience, ranks

    def __call__(self, record: dict) -> bool:
        """Returns True to stop early."""
        return distributed.broadcast(self._main(record) if self.ranks.main else False)

    def _main(self, record: dict) -> bool:
        self.task.end_epoch(record)
        self.recorder.save(record, self.training)
        if self.logger is not None:
            self.logger.log_epoch(record)
        for warning in self._warnings(record):
            log.warning("epoch %d: %s", record["epoch"], warning)
        log.info(
            "epoch %d: loss %.4g, %.0f tuples/step (%.0f%% active), val P@1 %.4f, MAP@R %.4f, "
            "%.0f samples/s, %.1fs; d(pos) %.3g, d(neg) %.3g", record["epoch"],
            record["train_loss"], record["tuples_per_step"], 100 * record["active_fraction"],
            record["val_precision_at_1"], record["val_map_at_r"], record["samples_per_s"],
            record["epoch_seconds"], record["pos_distance"], record["neg_distance"])
        best = self.recorder.best["epoch"]
        if self.patience is not None and record["epoch"] - best >= self.patience:
            log.info("early stop: no val %s gain for %d epochs", self.recorder.monitor,
                     self.patience)
            return True
        return False

    def _warnings(self, record: dict) -> list[str]:
        reference = self.recorder.first_neg_distance
        found = []
        if record["neg_distance"] < COLLAPSE_RATIO * reference:
            found.append(
                f"the embeddings have collapsed: the mean distance between classes is "
                f"{record['neg_distance']:.3g}, "
                f"{100 * record['neg_distance'] / reference:.2g}% of the untrained network's "
                f"{reference:.3g}. Lower optimizer.lr, mine in small, growing pools "
                "(miner.pool_k=2 miner.grow=true) or use miner=semihard.")
        return found + self.training.loss.epoch_warnings(record, reference)
