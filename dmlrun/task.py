"""What differs between kinds of run, behind one interface: the task.

The runner (``run.py``) knows a run's life: processes, signals, resume, checkpoints,
epochs, validation, the test. It does not know what an epoch's batches are made of; the
task does. ``configs/task/`` holds one config per task, naming its class
(``_target_``); ``SupervisedTask`` (task=supervised, every training label in the
sampler's batches) is the default and lives here, the others in their own modules.

A task is built from config before any data loads (where it checks its settings), is
started once the data is there, and is then asked, epoch by epoch:

    task = TaskClass(cfg, settings, world)   # checks, builds what needs no data
    task.start(context)                      # the data, the model, the run folder
    task.train_split()                       # the images and labels the loop trains on
    task.next_epoch(rng, main)               # the epoch's batches (every process's)
    task.step_options()                      # extra terms of each step (train.StepConfig)
    task.end_epoch(record)                   # the main process adds to the epoch record
    task.state_dict() / load_state_dict()    # what a checkpoint keeps of it
    task.write_plots(history, plot_dir)      # its own plots, after the test

To add a task: subclass ``Task``, declare its config group in ``schema`` (a dataclass of
``settings.setting`` fields) if it has settings, and add configs/task/<name>.yaml.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from hydra.utils import get_class
from omegaconf import DictConfig

from dmlrun.data.dataset import Split, TensorDataset
from dmlrun.data.samplers import Epoch
from dmlrun.errors import ConfigError
from dmlrun.settings import Settings


@dataclass
class TaskContext:
    """What a task may use once the data has loaded. ``embed(split)`` gives the (N, D)
    embeddings of a split's images as the run grades them; ``features(split)`` the (N, F)
    inputs of the model's last linear layer."""

    data: TensorDataset
    sampler: Any
    model: torch.nn.Module
    run_dir: Path
    main: bool
    embed: Callable[[Split], torch.Tensor]
    features: Callable[[Split], torch.Tensor]


class Task:
    """Supervised: every training image with its label, in the sampler's batches."""

    # (config group, dataclass) of the task's own settings, read by settings.read_settings
    schema: ClassVar[tuple[str, type] | None] = None

    def __init__(self, cfg: DictConfig, settings: Settings, world: int) -> None:
        """Check the task's settings and build what needs no data; ConfigError if wrong."""
        self.settings = settings
        per_class = settings.dataset.labeled_per_class
        if per_class is not None:
            raise ConfigError(f"dataset.labeled_per_class={per_class} keeps only some "
                              "training labels, but task=supervised trains on every one; "
                              "pick a task that uses the rest (configs/task/)")

    def start(self, context: TaskContext) -> None:
        self.context = context

    def train_split(self) -> Split:
        return self.context.data.train

    def next_epoch(self, rng: torch.Generator, main: bool) -> Epoch:
        """The whole epoch (every process's share), drawn with ``rng``."""
        return self.context.sampler.epoch(self.context.data.train.labels, rng)

    def step_options(self) -> dict[str, Any]:
        """Fields of ``train.StepConfig`` the task sets (its extra loss terms)."""
        return {}

    def end_epoch(self, record: dict[str, Any]) -> None:
        """On the main process, before the record is saved: add fields, log."""

    def state_dict(self) -> dict[str, Any] | None:
        return None

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        pass

    def write_plots(self, history: Sequence[dict], plot_dir: Path) -> None:
        pass


SupervisedTask = Task


def task_class(cfg: DictConfig) -> type[Task]:
    """The class ``task._target_`` names."""
    target = str(cfg.task._target_)
    try:
        cls = get_class(target)
    except Exception as exc:
        raise ConfigError(f"task._target_={target} cannot be imported: {exc}") from None
    if not (isinstance(cls, type) and issubclass(cls, Task)):
        raise ConfigError(f"task._target_={target} is not a dmlrun.task.Task")
    return cls
