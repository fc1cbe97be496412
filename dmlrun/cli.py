"""The ``dmlrun`` command: compose the config with Hydra, run, turn user errors into one
message and a non-zero exit."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

import dmlrun.config  # noqa: F401  (registers resolvers before Hydra composes)
from dmlrun.errors import UserError

log = logging.getLogger("dmlrun")

EXIT_USER_ERROR = 2


@hydra.main(version_base="1.3", config_path="pkg://dmlrun.configs", config_name="config")
def main(cfg: DictConfig) -> float | None:
    """Run one job; returns the validation objective for sweepers."""
    from dmlrun.run import run

    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    try:
        summary = run(cfg, run_dir)
    except UserError as exc:
        log.error("%s", exc)
        if hc.mode == RunMode.MULTIRUN:
            (run_dir / "FAILED").write_text(f"{exc}\n")
            return None
        print(f"dmlrun: error: {exc}", file=sys.stderr)
        sys.exit(getattr(exc, "exit_code", EXIT_USER_ERROR))
    return summary["val"][summary["monitor"]]


if __name__ == "__main__":
    main()
