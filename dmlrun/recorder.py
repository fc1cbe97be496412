"""The run folder's bookkeeping, in one place: what a checkpoint holds (written by
``save``, read back by ``restore``), the per-epoch and per-step records, and the best
epoch so far.

    run_dir/checkpoints/last.pt   every epoch: the training state + the best epoch so far
    run_dir/checkpoints/best.pt   the epoch with the best validation ``monitor`` (with
                                  ``select="last"``: the last epoch with a finite one)
    run_dir/metrics.jsonl         one record per epoch
    run_dir/steps.jsonl           one line per training step (``train.STEP_FIELDS``)
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from dmlrun import checkpoint
from dmlrun.config import RUN_MARKERS, resume_command_for, saved_overrides
from dmlrun.errors import ConfigError, UserError
from dmlrun.train import STEP_FIELDS

# Settings a resumed run may change: where files go and how the loop runs, not what trains.
CONFIG_KEYS_FREE_ON_RESUME = ("trainer", "paths", "hydra")
# ... except these trainer settings, which change the result.
TRAINER_KEYS_FIXED_ON_RESUME = ("max_epochs", "channels_last", "amp", "select")
MAX_DIFFERENCES_SHOWN = 6


def _differences(key: str, then: Any, now: Any) -> list[str]:
    """``"key: A in the run, B now"`` for every leaf under ``key`` that differs."""
    if isinstance(then, dict) and isinstance(now, dict):
        return [d for k in sorted(set(then) | set(now), key=str)
                for d in _differences(f"{key}.{k}", then.get(k), now.get(k))]
    return [] if then == now else [f"{key}: {then} in the run, {now} now"]


@dataclass
class TrainingState:
    """Everything a checkpoint restores to continue training exactly: the trained
    modules, the optimizer and scheduler, and the random generators."""

    model: nn.Module
    loss: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any  # an LRScheduler or None
    sampler_rng: torch.Generator
    task: Any = None  # the run's task.Task (its own state, e.g. labels it assigned)
    # a train.WeightAverage, or None. Checkpoints are written while the averaged weights
    # are in the model (so "model" is what was validated and is tested), and "ema" then
    # holds the model's own weights; loading swaps them back to train on.
    ema: Any = None

    def state_dict(self) -> dict[str, Any]:
        return {
            "task": self.task.state_dict() if self.task is not None else None,
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "model": self.model.state_dict(),
            "loss": self.loss.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "sampler_rng": self.sampler_rng.get_state(),
            "torch_rng": torch.get_rng_state(),
            "python_rng": random.getstate(),
            # augmentation on the GPU draws from the CUDA generators
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized()
            else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.loss.load_state_dict(state.get("loss", {}))
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.sampler_rng.set_state(state["sampler_rng"])
        if self.task is not None:
            if state.get("task") is None and self.task.state_dict() is not None:
                raise UserError("the checkpoint holds no state of this run's task (it was "
                                "written by another task or an older dmlrun), so the run "
                                "cannot continue exactly; start a new run")
            self.task.load_state_dict(state.get("task"))
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
            self.ema.swap()  # the model's own weights back in the model
        torch.set_rng_state(state["torch_rng"])
        random.setstate(state["python_rng"])
        if state.get("cuda_rng") is not None and torch.cuda.is_available():
            for index, cuda_state in enumerate(state["cuda_rng"][:torch.cuda.device_count()]):
                torch.cuda.set_rng_state(cuda_state, index)


def check_new_run_dir(run_dir: Path) -> None:
    """Refuse to train into a folder that already holds a run's results."""
    taken = [p for p in RUN_MARKERS if (run_dir / p).exists()]
    if taken:
        raise UserError(
            f"run folder {run_dir} already holds a run ({', '.join(taken)}); refusing to "
            "overwrite it. Choose another folder with hydra.run.dir=<dir>."
        )


def check_resumable(resume: Path, run_dir: Path | None = None) -> None:
    """A resumed run continues in its own folder, from last.pt, and only if unfinished."""
    if run_dir is not None and resume.resolve() != run_dir.resolve():
        raise UserError(f"trainer.resume={resume} but the run folder is {run_dir}; resume "
                        "writes into the folder it continues (leave hydra.run.dir unset)")
    if not (resume / "checkpoints" / "last.pt").is_file():
        raise UserError(f"trainer.resume={resume}: no checkpoints/last.pt there to continue "
                        "from")
    if (resume / "summary.json").exists():
        raise UserError(f"trainer.resume={resume}: that run has finished (summary.json); "
                        "nothing to resume. Start a new run instead.")


def _truncate_jsonl(path: Path, last_epoch: int) -> list[dict]:
    """Keep the records of epochs <= ``last_epoch`` (a kill may leave later ones)."""
    if not path.exists():
        return []
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    rows = [r for r in rows if r["epoch"] <= last_epoch]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(path)
    return rows


class Recorder:
    """Writes a run folder epoch by epoch and reads it back on resume. Only the main
    process writes; every process restores its training state."""

    def __init__(self, run_dir: Path, monitor: str, config: dict[str, Any],
                 select: str = "best") -> None:
        self.dir = run_dir
        self.ckpt_dir = run_dir / "checkpoints"
        self.metrics_path = run_dir / "metrics.jsonl"
        self.steps_path = run_dir / "steps.jsonl"
        self.monitor = monitor
        self.select = select
        self.config = config  # the resolved config, stored in every checkpoint
        self.best = {"epoch": 0, "value": float("-inf")}
        # mean different-class distance at the run's first step: the collapse reference
        self.first_neg_distance: float | None = None

    def write_steps(self, epoch: int, steps: torch.Tensor) -> list[dict]:
        """Append an epoch's (steps, len(STEP_FIELDS)) per-step values to steps.jsonl;
        returns the rows written."""
        rows = [{"epoch": epoch, "step": i, **dict(zip(STEP_FIELDS, row, strict=True))}
                for i, row in enumerate(steps.tolist(), 1)]
        with open(self.steps_path, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        return rows

    def save(self, record: dict[str, Any], training: TrainingState) -> bool:
        """Checkpoint the epoch (best.pt when it improves the monitored metric, or with
        ``select="last"`` whenever that is finite; last.pt always) and append its record
        to metrics.jsonl. Returns True for a new best."""
        if self.first_neg_distance is None:
            self.first_neg_distance = record["first_neg_distance"]
        state = {"epoch": record["epoch"], **training.state_dict(), "config": self.config,
                 "metrics": record}
        value = record[f"val_{self.monitor}"]
        improved = value > self.best["value"] or (self.select == "last" and math.isfinite(value))
        if improved:
            self.best.update(epoch=record["epoch"], value=value)
            checkpoint.save_checkpoint(self.ckpt_dir / "best.pt", state)
        checkpoint.save_checkpoint(self.ckpt_dir / "last.pt", {**state, "best": dict(self.best)})
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        return improved

    def restore(self, cfg: DictConfig, training: TrainingState, device: torch.device,
                main: bool) -> tuple[int, list[dict]]:
        """Load last.pt into ``training`` after checking that the config matches the
        run's own. The main process also cuts records of later epochs (a kill may leave
        them) from the jsonl files. Returns the first epoch to train and the records of
        the epochs done."""
        state = checkpoint.load_checkpoint(self.ckpt_dir / "last.pt", map_location=device)
        self._check_same_config(cfg, state["config"])
        training.load_state_dict(state)
        self.best.update(state["best"])
        last = int(state["epoch"])
        if not main:
            return last + 1, []
        done = _truncate_jsonl(self.metrics_path, last)
        if not done or done[-1]["epoch"] != last:  # killed before the line was written
            done.append(state["metrics"])
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(state["metrics"]) + "\n")
        _truncate_jsonl(self.steps_path, last)
        self.first_neg_distance = done[0]["first_neg_distance"]
        return last + 1, done

    def _check_same_config(self, cfg: DictConfig, then: dict[str, Any]) -> None:
        now = OmegaConf.to_container(cfg, resolve=True)
        differ = [d for k in sorted(set(now) | set(then)) if k not in CONFIG_KEYS_FREE_ON_RESUME
                  for d in _differences(k, then.get(k), now.get(k))]
        differ += [d for k in TRAINER_KEYS_FIXED_ON_RESUME
                   for d in _differences(f"trainer.{k}", then["trainer"].get(k),
                                         now["trainer"].get(k))]
        if differ:
            shown = "; ".join(differ[:MAX_DIFFERENCES_SHOWN]) + (
                f"; and {len(differ) - MAX_DIFFERENCES_SHOWN} more"
                if len(differ) > MAX_DIFFERENCES_SHOWN else "")
            raise ConfigError(f"trainer.resume: the config differs from the run's own: "
                              f"{shown}. Resume with the run's own settings: "
                              f"{resume_command_for(self.dir, saved_overrides(self.dir))}")

    def best_state(self, device: torch.device) -> dict[str, Any]:
        """best.pt; UserError when no epoch gave finite validation metrics."""
        if self.best["epoch"] == 0:
            raise UserError(
                "no epoch gave finite validation metrics (the model diverged), so there is no "
                f"best checkpoint to test; lower optimizer.lr. Per-epoch records: "
                f"{self.metrics_path}")
        return checkpoint.load_checkpoint(self.ckpt_dir / "best.pt", map_location=device)

    def step_rows(self) -> list[dict]:
        """Every line of steps.jsonl."""
        if not self.steps_path.exists():
            return []
        return [json.loads(x) for x in self.steps_path.read_text().splitlines() if x.strip()]
