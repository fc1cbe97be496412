"""The ``dmlrun`` command: compose the config with Hydra, run, turn user errors into one
message and a non-zero exit."""

from __future__ import annotations

import errno
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
# read-only, no permission, disk full, quota, a file where a folder should be
STORAGE_ERRNOS = {errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EDQUOT,
                  errno.ENOTDIR, errno.EEXIST}


@hydra.main(version_base="1.3", config_path="pkg://dmlrun.configs", config_name="config")
def main(cfg: DictConfig) -> float | None:
    """Run one job; returns the validation objective for sweepers."""
    from dmlrun.run import run

    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    try:
        summary = run(cfg, run_dir)
    except UserError as exc:
        if not _is_main_rank():
            fail(str(exc), getattr(exc, "exit_code", EXIT_USER_ERROR))
        log.error("%s", exc)
        if hc.mode == RunMode.MULTIRUN:
            (run_dir / "FAILED").write_text(f"{exc}\n")
            return None
        print(f"dmlrun: error: {exc}", file=sys.stderr)
        sys.exit(getattr(exc, "exit_code", EXIT_USER_ERROR))
    if summary is None:  # a rank other than 0 of a multi-process run
        return None
    return summary["val"][summary["monitor"]]


def _rank() -> int:
    import os

    for key in ("RANK", "SLURM_PROCID", "SUBMITIT_LOCAL_GLOBALID"):  # torchrun, SLURM, local
        if key in os.environ:
            return int(os.environ[key])
    return 0


def _is_main_rank() -> bool:
    return _rank() == 0


def fail(message: str, code: int = EXIT_USER_ERROR) -> None:
    """Print one error and exit. In a multi-process job, rank 0 reports; another rank
    waits briefly first, so that when rank 0 fails too (the same config error), torchrun
    stops the rank before it repeats the message; an error of its own is still shown."""
    import time

    from dmlrun.errors import RANK_GRACE_S

    if _is_main_rank():
        print(f"dmlrun: error: {message}", file=sys.stderr)
    else:
        time.sleep(RANK_GRACE_S)
        print(f"dmlrun: error (rank {_rank()}): {message}", file=sys.stderr)
    sys.exit(code)


# For the processes of a torchrun job other than rank 0: Hydra creates no folder (the
# current one is reused), saves no config and opens no log file; rank 0 writes the run.
QUIET_RANK_OVERRIDES = ["hydra.run.dir=.", "hydra.output_subdir=null",
                        "hydra/job_logging=none"]


def closest_name(message: str) -> str | None:
    """For Hydra's unknown-key and unknown-option errors, the closest valid name."""
    import difflib
    import re
    from importlib import resources

    from hydra import compose, initialize_config_module

    configs = resources.files("dmlrun.configs")
    groups = sorted(p.name for p in configs.iterdir() if p.is_dir() and p.name != "__pycache__")
    if m := re.search(r"Could not find '(\w+)/([^']+)'", message):
        group, wrong = m.groups()
        names = [p.name.removesuffix(".yaml") for p in (configs / group).iterdir()
                 if p.name.endswith(".yaml")]
        close = difflib.get_close_matches(wrong, names, n=1, cutoff=0.5)
        return f"{group}={close[0]}" if close else None
    if m := re.search(r"Could not override '([\w.]+)'", message):
        *parent, wrong = m.group(1).split(".")
        with initialize_config_module(config_module="dmlrun.configs", version_base="1.3"):
            node = compose(config_name="config")
        for key in parent:
            node = node.get(key) if hasattr(node, "get") else None
            if node is None:
                return None
        names = [str(k) for k in node] + (groups if not parent else [])
        close = difflib.get_close_matches(wrong, names, n=1, cutoff=0.6)
        return ".".join([*parent, close[0]]) if close else None
    return None


def entry() -> None:
    """The console script: Hydra's errors in composing the config (unknown key, option or
    bad override) become one message with the closest valid name and exit code 2."""
    import os

    from hydra.errors import (
        ConfigCompositionException,
        MissingConfigException,
        OverrideParseException,
    )

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        if {"-m", "--multirun"} & set(sys.argv[1:]):
            fail("a sweep (-m) cannot run inside torchrun; launch one torchrun per job, or "
                 "sweep with hydra/launcher=slurm and hydra.launcher.tasks_per_node="
                 "<processes>")
        if not _is_main_rank():
            sys.argv += QUIET_RANK_OVERRIDES
    if os.environ.get("HYDRA_FULL_ERROR"):  # the user asked for Hydra's full traces
        main()
        return
    os.environ["HYDRA_FULL_ERROR"] = "1"  # let composition errors reach us, not Hydra
    try:
        main()
    except (ConfigCompositionException, MissingConfigException,
            OverrideParseException) as exc:
        message = str(exc).split("\nConfig search path:")[0].strip()
        hint = closest_name(message)
        fail(message + (f"\nDid you mean {hint}?" if hint else ""))
    except OSError as exc:
        if exc.errno not in STORAGE_ERRNOS:
            raise
        where = exc.filename or "the output folder"
        print(f"dmlrun: error: cannot write {where}: {exc.strerror}. Earlier files are left "
              "as they were; choose another folder (hydra.run.dir=..., paths.output_dir=...) "
              "or free space.", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)


if __name__ == "__main__":
    entry()
