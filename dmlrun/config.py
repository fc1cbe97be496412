"""OmegaConf resolvers used by the shipped configs, and the command that resumes a run."""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

from omegaconf import OmegaConf

MAX_SUFFIX = 200  # folder names stay well under the 255-byte limit


# Characters Hydra's override grammar takes unquoted, so a run folder's path pastes into
# ``trainer.resume=<path>`` as it is; the rest are replaced.
FOLDER_SAFE = re.compile(r"[^A-Za-z0-9_.+@%-]")
FOLDER_REPLACE = {"=": "-", ",": ".", "/": "-", " ": ""}


def run_dir_suffix(override_dirname: str) -> str:
    """Hydra's override string (``loss-triplet+seed-1``) as a folder-name suffix: "" or
    "_loss-triplet+seed-1"; characters an override cannot hold unquoted are replaced
    (lists ``[0,1]`` become ``0.1``) and long strings cut."""
    if not override_dirname:
        return ""
    text = "".join(FOLDER_REPLACE.get(c, c) for c in override_dirname)
    text = FOLDER_SAFE.sub("", text.replace("[", "").replace("]", ""))
    return "_" + text[:MAX_SUFFIX]


def if_resume(resume: str | None, then: str, otherwise: str) -> str:
    """``then`` when resuming a run (``trainer.resume`` set), else ``otherwise``."""
    return then if resume else otherwise


RUN_MARKERS = ("checkpoints", "summary.json", "metrics.jsonl")


def saved_overrides(run_dir: Path) -> list[str]:
    """The command-line overrides a run was started with, as Hydra saved them
    (``.hydra/overrides.yaml``; ``.hydra-resume/`` where only that exists); [] if none."""
    for sub in (".hydra", ".hydra-resume"):
        saved = run_dir / sub / "overrides.yaml"
        if saved.is_file():
            return [str(o) for o in OmegaConf.to_container(OmegaConf.load(saved)) or []]
    return []


def resume_command_for(run_dir: Path | str, overrides: list[str]) -> str:
    """The shell command that continues the run in ``run_dir``, given the overrides it was
    started with: the same overrides, and ``trainer.resume``."""
    keep = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") not in
            ("trainer.resume", "hydra.run.dir")]
    return shlex.join(["dmlrun", *keep, f"trainer.resume={run_dir}"])


def hydra_subdir(resume: str | None, run_dir: str) -> str:
    """Where Hydra saves the composed config of this session: ``.hydra`` normally,
    ``.hydra-resume`` when resuming, and ``.hydra-refused`` when the folder already holds
    a run (the run is then refused, and the original ``.hydra`` stays untouched)."""
    if resume:
        return ".hydra-resume"
    if any((Path(run_dir) / m).exists() for m in RUN_MARKERS):
        return ".hydra-refused"
    return ".hydra"


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("dmlrun_hydra_subdir"):
        OmegaConf.register_new_resolver("dmlrun_hydra_subdir", hydra_subdir)
    if not OmegaConf.has_resolver("dmlrun_suffix"):
        OmegaConf.register_new_resolver("dmlrun_suffix", run_dir_suffix)
    if not OmegaConf.has_resolver("dmlrun_cwd"):
        OmegaConf.register_new_resolver("dmlrun_cwd", os.getcwd)
    if not OmegaConf.has_resolver("dmlrun_if_resume"):
        OmegaConf.register_new_resolver("dmlrun_if_resume", if_resume)


register_resolvers()
