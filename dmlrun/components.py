"""Build the run's parts from config (``_target_`` + kwargs) and check they fit together
before any data loads."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig

from dmlrun.errors import ConfigError, UserError
from dmlrun.losses.base import MetricLoss
from dmlrun.miners.base import Miner


@dataclass
class Components:
    loss: MetricLoss
    miner: Miner | None
    sampler: Any


# The picked options, for processes that run outside the Hydra app that composed the
# config (the ranks of ``trainer.devices=N``).
CHOICES: dict[str, str] = {}


def choice(cfg: DictConfig, group: str) -> str:
    """The config-group option a user picked (``loss=triplet`` -> "triplet"), falling
    back to the ``_target_`` class name outside a Hydra app."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        picked = HydraConfig.get().runtime.choices.get(group)
        if picked:
            return str(picked)
    if CHOICES.get(group):
        return CHOICES[group]
    node = cfg.get(group)
    if not has_target(node):
        return "none"
    return str(node._target_).rsplit(".", 1)[-1]


def has_target(node: Any) -> bool:
    return isinstance(node, DictConfig) and node.get("_target_") is not None


def build(node: DictConfig, what: str, **kwargs: Any) -> Any:
    """Instantiate a config node; a bad node becomes a ConfigError naming ``what``."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as exc:
        cause = exc.__cause__ or exc
        if isinstance(cause, UserError):
            raise cause from None
        raise ConfigError(f"cannot build {what} from config: {cause}") from exc
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"cannot build {what} from config: {exc}") from exc


def build_partial(node: DictConfig, what: str, *args: Any) -> Any:
    """Instantiate a ``_partial_`` node and call it with ``args`` (the optimizer with the
    model's parameters, the scheduler with the optimizer); bad values become ConfigError."""
    factory = build(node, what)
    try:
        return factory(*args)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"cannot build {what} from config: {exc}") from exc


def build_components(cfg: DictConfig) -> Components:
    """Loss, miner and sampler from config, checked for compatibility."""
    loss = build(cfg.loss, f"loss={choice(cfg, 'loss')}")
    miner = build(cfg.miner, f"miner={choice(cfg, 'miner')}") if has_target(cfg.miner) else None
    sampler = build(cfg.sampler, f"sampler={choice(cfg, 'sampler')}")
    parts = Components(loss, miner, sampler)
    check_compatible(cfg, parts)
    return parts


def check_compatible(cfg: DictConfig, parts: Components) -> None:
    """Raise ConfigError when the sampler, miner and loss cannot work together."""
    loss_name, miner_name = choice(cfg, "loss"), choice(cfg, "miner")
    sampler_name = choice(cfg, "sampler")
    offline = getattr(parts.sampler, "yields", None)
    if offline is not None and parts.miner is not None:
        raise ConfigError(
            f"sampler={sampler_name} draws fixed {offline}, so there is nothing to mine; "
            f"use miner=none with it, or sampler=pk to mine with miner={miner_name}"
        )
    loss = parts.loss
    accepts = getattr(loss, "accepts", ("pairs", "triplets"))
    if not accepts and (parts.miner is not None or offline is not None):
        given = f"miner={miner_name}" if parts.miner is not None else f"sampler={sampler_name}"
        raise ConfigError(
            f"loss={loss_name} uses every sample of the batch and takes no tuples, but "
            f"{given} would give it {parts.miner.yields if parts.miner else offline}; use "
            "miner=none with sampler=pk"
        )
    _check_distance(loss, loss_name, choice(cfg, "distance"))
    kind = parts.miner.yields if parts.miner is not None else offline
    if kind is not None and kind not in accepts:
        source = f"miner={miner_name}" if parts.miner is not None else f"sampler={sampler_name}"
        fixes = "sampler=triplets or sampler=pk" if parts.miner is None else "another miner"
        raise ConfigError(
            f"loss={loss_name} needs {' or '.join(accepts)}, but {source} gives {kind}; "
            f"use {fixes}, or a pair loss such as loss=contrastive"
        )


def resolve_device(requested: str) -> torch.device:
    """"auto" -> cuda when available, else cpu; "cuda" without a GPU is a ConfigError."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("trainer.device=cuda but no CUDA device is available; use "
                          "trainer.device=cpu or trainer.device=auto")
    try:
        return torch.device(requested)
    except RuntimeError as exc:
        raise ConfigError(f"trainer.device={requested!r} is not a device: {exc}") from exc


def resolve_amp(amp: Any, device: torch.device) -> torch.dtype | None:
    """"auto" -> bf16 autocast on CUDA, none on CPU; true -> bf16; false -> none."""
    if amp == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    if isinstance(amp, bool):
        return torch.bfloat16 if amp else None
    raise ConfigError(f"trainer.amp must be auto, true or false; got {amp!r}")


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    os.environ.setdefault("PYTHONHASHSEED", str(seed))
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _check_distance(loss: MetricLoss, loss_name: str, distance_name: str) -> None:
    """The loss's formula must suit the distance, and its margins must be reachable."""
    dist = loss.distance
    wanted = getattr(loss, "distances", ())
    if wanted and dist.name not in wanted:
        raise ConfigError(
            f"loss={loss_name} is written for {' or '.join(wanted)} similarity (its "
            f"hyper-parameters are on that scale), but distance={distance_name}; use "
            f"distance={wanted[0]}, or experiment={loss_name} for a working recipe"
        )
    bound = dist.bounded_max()
    for name in getattr(loss, "distance_params", ()):
        value = float(getattr(loss, name))
        if value > bound:
            shown = name.removesuffix("_init")
            raise ConfigError(
                f"loss.{shown}={value:g} can never be met: with distance={distance_name}"
                f"{' (normalized)' if dist.normalize else ''} distances are at most {bound:g}; "
                f"use loss.{shown}<={bound:g}, or an unnormalised euclidean distance"
            )
