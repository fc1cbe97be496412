"""Process plumbing of a run: stop signals, the log file, several processes on one
machine, and the command that resumes a run."""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import sys
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from dmlrun import components, distributed
from dmlrun.assemble import validate_config
from dmlrun.components import choice, resolve_device
from dmlrun.config import resume_command_for
from dmlrun.errors import env_rank

log = logging.getLogger("dmlrun")

LOG_FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"  # as Hydra's


def resume_command(run_dir: Path) -> str:
    """The shell command that continues the run in ``run_dir``: this invocation's
    overrides, and ``trainer.resume``."""
    given = HydraConfig.get().overrides.task if HydraConfig.initialized() else []
    return resume_command_for(run_dir, list(given))


def rank_entry(config: dict, run_dir: str, choices: dict) -> None:
    """One process of ``trainer.devices=N`` (see ``distributed.spawn_run``): the run with
    this rank's share; rank 0 logs to stdout."""
    from dmlrun.run import run  # the runner imports this module

    components.CHOICES.update(choices)
    if env_rank() == 0:
        logging.basicConfig(level=logging.INFO, format=LOG_FORMAT, stream=sys.stdout)
    run(OmegaConf.create(config), run_dir)


def spawn_ranks(cfg: DictConfig, run_dir: Path, n: int) -> dict[str, Any]:
    """``trainer.devices=n`` without torchrun: start n processes on this machine, wait,
    and return rank 0's summary."""
    validate_config(cfg, n)  # fail here, once, rather than in every process
    distributed.check_gpus(n, resolve_device(str(cfg.trainer.device)))
    log.info("starting %d processes on this machine", n)
    distributed.spawn_run(rank_entry, n, OmegaConf.to_container(cfg, resolve=True),
                          str(run_dir), {g: choice(cfg, g) for g in cfg})
    with open(run_dir / "summary.json") as f:
        return json.load(f)



class StopSignals:
    """While entered, SIGINT and SIGTERM set ``signum``, which the training loop reads
    before each step (``received``), so the run stops between steps with its checkpoints
    intact. The previous handlers come back on exit. (Signals can only be caught in the
    main thread; elsewhere, e.g. a launcher's worker thread, nothing is installed.)"""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def received(self) -> int | None:
        return self.signum

    def _note(self, signum: int, _frame: Any) -> None:
        self.signum = signum

    def __enter__(self) -> StopSignals:
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):
                self._old[sig] = signal.signal(sig, self._note)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


def attach_log_file(run_dir: Path) -> logging.Handler | None:
    """Write dmlrun.log when Hydra's own logging is not doing so (plain ``run()`` calls)."""
    if HydraConfig.initialized():
        return None
    handler = logging.FileHandler(run_dir / "dmlrun.log")
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    logging.getLogger().addHandler(handler)
    if logging.getLogger().level > logging.INFO:
        logging.getLogger().setLevel(logging.INFO)
    return handler
