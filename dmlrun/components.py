"""Build the run's parts from config (``_target_`` + kwargs) and check they fit together
before any data loads."""

from __future__ import annotations

import difflib
import inspect
import os
import random
import types
import typing
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import get_object, instantiate
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from dmlrun.adapters import ConventionLoss, ConventionMiner
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


TYPE_WORDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def check_types(cfg: DictConfig) -> None:
    """Every required value (``???``) given, and every argument of a ``_target_`` whose
    signature declares int, float, bool or str of that type. One ConfigError naming the
    key and the expected type. (The run's own settings have a schema: ``settings``.)"""
    missing = sorted(k for k in OmegaConf.missing_keys(cfg) if not k.startswith("hydra."))
    if missing:
        raise ConfigError(f"{missing[0]} has no value and needs one: add {missing[0]}=<value> "
                          "to the command")
    for key, node in _target_nodes(cfg, ""):
        for name, kinds in _declared_types(str(node._target_)).items():
            if name in node:
                _check_value(f"{key}{name}", _resolved(node, name), kinds)


def check_appended(cfg: DictConfig) -> None:
    """Refuse keys appended on the command line (``+trainer.foo=1``) that nothing reads:
    a key of a ``_target_`` node must be one of its parameters (unless it takes
    ``**kwargs``); other nodes take no new keys. Only inside a Hydra app."""
    if not HydraConfig.initialized():
        return
    groups = {str(k) for k in HydraConfig.get().runtime.choices}
    for override in HydraConfig.get().overrides.task:
        key = override.split("=", 1)[0]
        if not key.startswith("+") or key.startswith("++"):
            continue
        key = key[1:]
        if key.startswith("hydra") or key in groups or "/" in key:
            continue  # a config group appended (+experiment=...), not a key
        *parent, name = key.split(".")
        node = OmegaConf.select(cfg, ".".join(parent)) if parent else cfg
        known = _parameters(node) if has_target(node) else None
        if known is None and has_target(node):
            continue  # takes **kwargs, or a signature that cannot be read
        names = known if known is not None else [str(k) for k in node if str(k) != name]
        close = difflib.get_close_matches(name, names, n=1, cutoff=0.5)
        where = ".".join(parent) or "the top level of the config"
        raise ConfigError(
            f"+{key}: {where} has no setting {name!r}, so the appended key would be ignored"
            + (f"; did you mean {'.'.join([*parent, close[0]])}?" if close else
               f"; its settings: {', '.join(sorted(names)) or 'none'}"))


def _parameters(node: DictConfig) -> list[str] | None:
    """The keyword parameters of a node's ``_target_``; None if it takes ``**kwargs`` or
    its signature cannot be read."""
    try:
        params = inspect.signature(get_object(str(node._target_))).parameters
    except Exception:
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return None
    return [n for n in params if n != "self"]


def _target_nodes(node: Any, prefix: str):
    """(key prefix, node) of every config node with a ``_target_`` below ``node``."""
    if not isinstance(node, DictConfig):
        return
    if has_target(node):
        yield prefix, node
    for key in node:
        if str(key) != "hydra" and not str(key).startswith("_"):
            child = node._get_node(key)
            if isinstance(child, DictConfig):
                yield from _target_nodes(child, f"{prefix}{key}.")


def _resolved(node: DictConfig, name: str) -> Any:
    try:
        return node[name]
    except OmegaConfBaseException as exc:
        raise ConfigError(f"cannot read {name}: {exc}") from None


def _declared_types(target: str) -> dict[str, tuple[type, ...]]:
    """Parameter name -> accepted scalar types, from ``target``'s signature (only the
    parameters declared as int, float, bool or str, optionally with None)."""
    try:
        obj = get_object(target)
        hints = typing.get_type_hints(obj.__init__ if inspect.isclass(obj) else obj)
    except Exception:  # an unreadable or third-party signature: nothing to check
        return {}
    found = {}
    for name, hint in hints.items():
        args = typing.get_args(hint) if isinstance(hint, types.UnionType) or \
            typing.get_origin(hint) is typing.Union else (hint,)
        if args and all(a in (int, float, bool, str, type(None)) for a in args):
            found[name] = tuple(args) + ((int,) if float in args else ())
    return found


def _check_value(key: str, value: Any, kinds: tuple[type, ...]) -> None:
    if value is None:
        return  # null: allowed, or a default of None the code handles itself
    if isinstance(value, bool) and bool not in kinds and float not in kinds:
        ok = False  # true/false where a count belongs (bool is an int to isinstance)
    else:
        ok = isinstance(value, kinds)
    if not ok:
        shown = [k for k in kinds if k in TYPE_WORDS and not (k is int and float in kinds)]
        words = " or ".join(TYPE_WORDS[k] for k in shown)
        words += " or null" if type(None) in kinds else ""
        raise ConfigError(f"{key} must be {words}, got {value!r}")


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
    loss = adopt_loss(build(cfg.loss, f"loss={choice(cfg, 'loss')}"), choice(cfg, "loss"))
    if has_target(cfg.get("class_loss")):
        loss = build_partial(cfg.class_loss, f"class_loss={choice(cfg, 'class_loss')}", loss)
    _check_soft_margin(cfg)
    miner = adopt_miner(build(cfg.miner, f"miner={choice(cfg, 'miner')}"),
                        choice(cfg, "miner")) if has_target(cfg.miner) else None
    sampler = build(cfg.sampler, f"sampler={choice(cfg, 'sampler')}")
    parts = Components(loss, miner, sampler)
    check_compatible(cfg, parts)
    return parts


def adopt_loss(loss: Any, name: str) -> MetricLoss:
    """Ours as it is; a module called as pytorch-metric-learning's losses are, wrapped."""
    if isinstance(loss, MetricLoss):
        return loss
    if isinstance(loss, torch.nn.Module):
        return ConventionLoss(loss)
    raise ConfigError(f"loss={name} built a {type(loss).__name__}, which is not a loss: give "
                      "a MetricLoss or an nn.Module called as loss(embeddings, labels, "
                      "indices_tuple)")


def adopt_miner(miner: Any, name: str) -> Miner:
    """Ours as it is; a callable that mines as pytorch-metric-learning's miners do, wrapped."""
    if isinstance(miner, Miner):
        return miner
    if callable(miner):
        try:
            return ConventionMiner(miner)
        except (ValueError, TypeError, RuntimeError) as exc:
            raise ConfigError(f"miner={name}: cannot use it as a miner: {exc}") from exc
    raise ConfigError(f"miner={name} built a {type(miner).__name__}, which is not a miner")


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


def cpu_has_bf16_tiles() -> bool:
    """True when this CPU multiplies bf16 matrices in hardware (Intel AMX tiles, since
    Sapphire Rapids). There oneDNN's bf16 convolutions and matmuls outrun fp32 (the plain
    convnet's training step 1.44x in scripts/bench.py). Without the tiles bf16 is
    converted or runs on narrower units, a gain not measured here, so ``auto`` keeps fp32."""
    check = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(check()) if check is not None else False


def resolve_amp(amp: Any, device: torch.device) -> torch.dtype | None:
    """"auto" -> bf16 autocast on CUDA and on CPUs with AMX tiles (``cpu_has_bf16_tiles``),
    none on other CPUs; true -> bf16; false -> none."""
    if amp == "auto":
        native = device.type == "cuda" or (device.type == "cpu" and cpu_has_bf16_tiles())
        return torch.bfloat16 if native else None
    if isinstance(amp, bool):
        return torch.bfloat16 if amp else None
    raise ConfigError(f"trainer.amp must be auto, true or false; got {amp!r}")


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    os.environ.setdefault("PYTHONHASHSEED", str(seed))
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _check_soft_margin(cfg: DictConfig) -> None:
    """A triplet miner that picks triplets inside a margin it reads from loss.margin
    (semihard, batch_all) has no window when the loss has a soft margin (loss.margin=0,
    e.g. loss=triplet_soft)."""
    if cfg.loss.get("soft") and has_target(cfg.miner) and cfg.miner.get("margin") == 0:
        miner, loss = choice(cfg, "miner"), choice(cfg, "loss")
        raise ConfigError(
            f"miner={miner} picks tuples within miner.margin, which it takes from "
            f"loss.margin, and loss={loss} has a soft margin (loss.margin=0): set "
            f"miner.margin=<distance>, or use loss=triplet (the hinge, margin 1)")


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
