"""OmegaConf resolvers used by the shipped configs."""

from __future__ import annotations

from omegaconf import OmegaConf

MAX_SUFFIX = 200  # folder names stay well under the 255-byte limit


def run_dir_suffix(override_dirname: str) -> str:
    """Hydra's override string as a folder-name suffix: "" or "_loss=triplet,seed=1",
    with "/" replaced and long strings cut."""
    if not override_dirname:
        return ""
    text = override_dirname.replace("/", "-").replace(" ", "")
    return "_" + text[:MAX_SUFFIX]


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("dmlrun_suffix"):
        OmegaConf.register_new_resolver("dmlrun_suffix", run_dir_suffix)


register_resolvers()
