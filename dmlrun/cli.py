"""The ``dmlrun`` command: compose the config with Hydra, run, turn user errors into one
message and a non-zero exit.

Modules that load torch (``dmlrun.run``, ``dmlrun.distributed``) are imported inside the
functions that need them, deliberately: ``dmlrun --help``, ``--version`` and errors in
the command line answer without paying for torch's import.
"""

from __future__ import annotations

import difflib
import errno
import logging
import os
import re
import shutil
import sys
import time
from importlib import resources
from pathlib import Path
from typing import Any

import hydra
from hydra import compose, initialize_config_module
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import (
    ConfigCompositionException,
    MissingConfigException,
    OverrideParseException,
)
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

import dmlrun.config  # noqa: F401  (registers resolvers before Hydra composes)
from dmlrun import __version__
from dmlrun.errors import EXIT_USER_ERROR, RANK_GRACE_S, UserError, env_rank

log = logging.getLogger("dmlrun")

EXIT_JOBS_FAILED = 1  # a sweep in which some jobs failed
# read-only, no permission, disk full, quota, a file where a folder should be
STORAGE_ERRNOS = {errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EDQUOT,
                  errno.ENOTDIR, errno.EEXIST}
# Files Hydra writes into a run folder before dmlrun's code runs.
HYDRA_ONLY = {".hydra", ".hydra-refused", ".hydra-resume", "dmlrun.log"}
# The sweep folder of this process's multirun (set by SweepFolder), for the tally.
SWEEP: dict[str, Path] = {}


@hydra.main(version_base="1.3", config_path="pkg://dmlrun.configs", config_name="config")
def main(cfg: DictConfig) -> float | None:
    """Run one job; returns the validation objective for sweepers (None for a failed job,
    which Optuna records as a failed trial)."""
    from dmlrun.run import run

    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    try:
        summary = run(cfg, run_dir)
    except UserError as exc:
        code = getattr(exc, "exit_code", EXIT_USER_ERROR)
        if not _is_main_rank():
            fail(str(exc), code)
        if hc.mode == RunMode.MULTIRUN:
            log.error("%s", exc)
            (run_dir / "FAILED").write_text(f"{exc}\n")
            return None
        _log_to_file(f"error: {exc}")
        # a start refused before the run wrote anything (a config error, missing data)
        # leaves no folder; one with checkpoints or metrics is kept
        _discard_if_empty(run_dir)
        fail(str(exc), code)
    if summary is None:  # a rank other than 0 of a multi-process run
        return None
    return summary["val"][summary["monitor"]]


def _log_to_file(message: str) -> None:
    """Record an error in the run's dmlrun.log without printing it a second time."""
    record = logging.LogRecord("dmlrun", logging.ERROR, __file__, 0, message, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.emit(record)


def _discard_if_empty(run_dir: Path) -> None:
    """Remove a run folder that holds only what Hydra wrote for this refused start (never
    the current folder, never anything else)."""
    if not run_dir.is_dir() or run_dir.resolve() == Path.cwd().resolve():
        return
    if {p.name for p in run_dir.iterdir()} <= HYDRA_ONLY:
        shutil.rmtree(run_dir, ignore_errors=True)
        parent = run_dir.parent  # outputs/<date>/, when this run was its only folder
        if re.fullmatch(r"\d{4}-\d{2}-\d{2}", parent.name) and not any(parent.iterdir()):
            parent.rmdir()


class SweepFolder(Callback):
    """Notes the sweep folder of a multirun, so the command can count its failed jobs."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        SWEEP["dir"] = Path(config.hydra.sweep.dir)


def sweep_tally(sweep_dir: Path) -> tuple[list[Path], int]:
    """The job folders of a sweep that failed or did not finish, and the number of jobs."""
    jobs = sorted(p for p in sweep_dir.iterdir() if (p / ".hydra").is_dir()) \
        if sweep_dir.is_dir() else []
    bad = [p for p in jobs if not (p / "summary.json").exists()]
    return bad, len(jobs)


def _report_sweep() -> None:
    """After a multirun: "N of M jobs failed" with their folders, and a non-zero exit."""
    if "dir" not in SWEEP:
        return
    bad, total = sweep_tally(SWEEP["dir"])
    if not bad:
        return
    lines = [f"dmlrun: {len(bad)} of {total} jobs failed:"]
    for p in bad:
        why = (p / "FAILED").read_text().strip().splitlines() if (p / "FAILED").exists() \
            else ["did not finish"]
        lines.append(f"  {p}: {why[0] if why else ''}")
    print("\n".join(lines), file=sys.stderr)
    sys.exit(EXIT_JOBS_FAILED)


def _is_main_rank() -> bool:
    return env_rank() == 0


def fail(message: str, code: int = EXIT_USER_ERROR) -> None:
    """Print one error and exit. In a multi-process job, rank 0 reports; another rank
    waits briefly first, so that when rank 0 fails too (the same config error), torchrun
    stops the rank before it repeats the message; an error of its own is still shown."""
    if _is_main_rank():
        print(f"dmlrun: error: {message}", file=sys.stderr)
    else:
        time.sleep(RANK_GRACE_S)
        print(f"dmlrun: error (rank {env_rank()}): {message}", file=sys.stderr)
    sys.exit(code)


# For the processes of a torchrun job other than rank 0: Hydra creates no folder (the
# current one is reused), saves no config and opens no log file; rank 0 writes the run.
QUIET_RANK_OVERRIDES = ["hydra.run.dir=.", "hydra.output_subdir=null",
                        "hydra/job_logging=none"]


def _composed() -> DictConfig:
    with initialize_config_module(config_module="dmlrun.configs", version_base="1.3"):
        return compose(config_name="config")


def _leaf_keys(node: Any, prefix: str = "") -> list[str]:
    if not isinstance(node, DictConfig):
        return []
    keys = []
    for key in node:
        path = f"{prefix}{key}"
        child = node._get_node(key)
        keys += _leaf_keys(child, path + ".") if isinstance(child, DictConfig) else [path]
    return keys


def closest_name(message: str) -> str | None:
    """For Hydra's unknown-key and unknown-option errors, the closest valid name."""
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
        root = node = _composed()
        for key in parent:
            node = node.get(key) if hasattr(node, "get") else None
            if node is None:
                return None
        names = [str(k) for k in node] + (groups if not parent else [])
        close = difflib.get_close_matches(wrong, names, n=1, cutoff=0.6)
        if close:
            return ".".join([*parent, close[0]])
        # a key given without its group (lr=0.01): the full names that end with it
        whole = [k for k in _leaf_keys(root) if k.rsplit(".", 1)[-1] == wrong
                 and not k.startswith("hydra.")]
        return " or ".join(whole[:3]) if whole else None
    return None


def _override_values(argv: list[str]) -> dict[str, str]:
    """key -> value of the command line's plain ``key=value`` overrides (no sweeps)."""
    found = {}
    for arg in argv:
        if "=" in arg and not arg.startswith("-"):
            key, value = arg.split("=", 1)
            found[key.lstrip("+~")] = value
    return found


def check_run_folder_args(argv: list[str]) -> None:
    """Before Hydra creates or touches anything: a ``trainer.resume`` folder must hold an
    unfinished run, and an explicit ``hydra.run.dir`` must not hold a run already, so a
    refused start changes nothing inside a user's run folder."""
    values = _override_values(argv)
    if {"-m", "--multirun"} & set(argv):
        return
    resume = values.get("trainer.resume")
    if resume and resume.lower() not in ("null", "none", ""):
        from dmlrun.recorder import check_resumable

        path = Path(_unquote(resume))
        if not path.is_dir():
            raise UserError(f"trainer.resume={resume}: no such run folder")
        check_resumable(path)
        return
    run_dir = values.get("hydra.run.dir")
    folder = Path(_unquote(run_dir)) if run_dir else None
    # a folder that does not exist yet holds no run (and saying so needs no torch)
    if folder is not None and folder.is_dir():
        from dmlrun.recorder import check_new_run_dir

        check_new_run_dir(folder)


def _unquote(value: str) -> str:
    try:
        return str(OverridesParser.create().parse_override(f"x={value}").value())
    except OverrideParseException:
        return value


def entry() -> None:
    """The console script: Hydra's errors in composing the config (unknown key, option or
    bad override) become one message with the closest valid name and exit code 2."""
    argv = sys.argv[1:]
    if "--version" in argv:
        print(f"dmlrun {__version__}")
        return
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        if {"-m", "--multirun"} & set(argv):
            fail("a sweep (-m) cannot run inside torchrun; launch one torchrun per job, or "
                 "sweep with hydra/launcher=slurm and hydra.launcher.tasks_per_node="
                 "<processes>")
        if not _is_main_rank():
            sys.argv += QUIET_RANK_OVERRIDES
    try:
        check_run_folder_args(argv)
    except UserError as exc:
        fail(str(exc))
    if os.environ.get("HYDRA_FULL_ERROR"):  # the user asked for Hydra's full traces
        main()
        _report_sweep()
        return
    os.environ["HYDRA_FULL_ERROR"] = "1"  # let composition errors reach us, not Hydra
    _run_main()
    _report_sweep()


def _run_main() -> None:
    try:
        main()
    except (ConfigCompositionException, MissingConfigException,
            OverrideParseException) as exc:
        message = str(exc).split("\nConfig search path:")[0].strip()
        hint = closest_name(message)
        if hint:  # appending the key would be refused too; the hint is the way
            message = re.sub(r"\nTo append to your config use \+\S+", "", message)
        fail(message + (f"\nDid you mean {hint}?" if hint else ""))
    except ValueError as exc:
        if "No trials are completed" not in str(exc):  # Optuna, when every trial failed
            raise
        bad, total = sweep_tally(SWEEP["dir"]) if "dir" in SWEEP else ([], 0)
        fail(f"every trial of the sweep failed ({len(bad)} of {total}); see FAILED in each "
             f"job folder under {SWEEP.get('dir', 'the sweep folder')}")
    except OSError as exc:
        if exc.errno not in STORAGE_ERRNOS:
            raise
        where = exc.filename or "the output folder"
        fail(f"cannot write {where}: {exc.strerror}. Earlier files are left as they were; "
             "choose another folder (hydra.run.dir=..., paths.output_dir=...) or free space.")


if __name__ == "__main__":
    entry()
