"""OmegaConf resolvers used by the shipped configs."""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

MAX_SUFFIX = 200  # folder names stay well under the 255-byte limit


def run_dir_suffix(override_dirname: str) -> str:
    """Hydra's override string as a folder-name suffix: "" or "_loss=triplet,seed=1",
    with "/" replaced and long strings cut."""
    if not override_dirname:
        return ""
    text = override_dirname.replace("/", "-").replace(" ", "")
    return "_" + text[:MAX_SUFFIX]


def if_resume(resume: str | None, then: str, otherwise: str) -> str:
    """``then`` when resuming a run (``trainer.resume`` set), else ``otherwise``."""
    return then if resume else otherwise


RUN_MARKERS = ("checkpoints", "summary.json", "metrics.jsonl")


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
    if not OmegaConf.has_resolver("dmlrun_if_resume"):
        OmegaConf.register_new_resolver("dmlrun_if_resume", if_resume)


register_resolvers()
