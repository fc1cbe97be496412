"""The run's own settings: one type and one check per setting, read once, before any
data loads.

The groups the run reads itself (``trainer``, ``evaluation``, the top level, and the
keys of ``dataset`` that the run rather than the loader reads; a task adds its own, see
``task.Task.schema``) are frozen dataclasses: a field per setting, its type from the
annotation and its range or choices from ``setting(...)``. The values themselves, the
defaults people read and override, live only in the YAML files. ``read(node, schema,
where)`` checks a node against a schema and returns the typed settings; every problem is
one ConfigError naming the key. Nodes with a ``_target_`` (losses, models, samplers...)
are checked against their constructor's signature instead (``components.check_types``).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from dmlrun import components
from dmlrun.errors import ConfigError
from dmlrun.metrics import METRIC_NAMES

TYPE_WORDS = {**components.TYPE_WORDS, list: "a list"}
# trainer.compile: off, or a torch.compile mode ("reduce-overhead" captures CUDA graphs)
COMPILE_MODES = (None, False, "default", "reduce-overhead", "max-autotune")


def setting(*, minimum: float | None = None, above: float | None = None,
            below: float | None = None, choices: Sequence[Any] | None = None,
            check: Callable[[Any], str | None] | None = None, optional: bool = False) -> Any:
    """A field's check: ``value >= minimum``, ``> above``, ``< below``, one of
    ``choices``, or ``check(value)`` returning a problem (None: fine). ``optional``:
    the key may be absent (read as None)."""
    meta = {"minimum": minimum, "above": above, "below": below, "choices": choices,
            "check": check}
    return field(default=None, metadata=meta) if optional else field(metadata=meta)


def _devices(value: Any) -> str | None:
    if value == "auto" or (isinstance(value, int) and not isinstance(value, bool)
                           and value >= 1):
        return None
    return "must be auto or a number >= 1"


def _amp(value: Any) -> str | None:
    return None if value == "auto" or isinstance(value, bool) else "must be auto, true or false"


@dataclass(frozen=True)
class TrainerSettings:
    """``trainer``: how the loop runs (configs/trainer/default.yaml says what each does)."""

    max_epochs: int = setting(minimum=1)
    device: str = setting()
    amp: str | bool = setting(check=_amp)
    log_every: int = setting(minimum=1)
    progress_bar: bool | None = setting()
    eval_batch_size: int = setting(minimum=1)
    monitor: str = setting(choices=METRIC_NAMES)
    select: str = setting(choices=("best", "last"))
    epoch_plots: bool = setting()
    channels_last: bool = setting()
    compile: str | bool | None = setting(choices=COMPILE_MODES)
    warmup_epochs: float = setting(minimum=0)
    no_aug_epochs: int = setting(minimum=0)
    ema_decay: float | None = setting(above=0, below=1)
    early_stopping_patience: int | None = setting(minimum=1)
    nonfinite: str = setting(choices=("stop", "skip"))
    resume: str | None = setting()
    devices: str | int = setting(check=_devices)
    mining: str = setting(choices=("global", "local"))


@dataclass(frozen=True)
class EvaluationSettings:
    """``evaluation``: how embeddings are graded."""

    knn_k: int = setting(minimum=1)
    clustering: bool = setting()
    baselines: bool = setting()
    projection: str = setting(choices=("pca", "tsne"))


@dataclass(frozen=True)
class DatasetSettings:
    """The keys of ``dataset`` the run reads (the loader's own are checked against its
    signature). Absent keys read as None."""

    num_classes: int | None = setting(minimum=1, optional=True)
    train_classes: list[int] | None = setting(optional=True)
    val_classes: list[int] | None = setting(optional=True)
    labeled_per_class: int | None = setting(minimum=2, optional=True)
    split_seed: int | None = setting(optional=True)
    recall_ks: list[int] | None = setting(optional=True)


@dataclass(frozen=True)
class SchedulerSettings:
    """The per-step keys of ``scheduler`` the loop reads (absent: the epoch scheduler
    alone sets the rate)."""

    anneal: str | None = setting(choices=(None, "cosine"), optional=True)
    min_lr_ratio: float | None = setting(minimum=0, optional=True)


@dataclass(frozen=True)
class Settings:
    """Every group above, read from one config."""

    seed: int
    tag: str | None
    trainer: TrainerSettings
    evaluation: EvaluationSettings
    dataset: DatasetSettings
    scheduler: SchedulerSettings
    task: Any = None  # the task's own settings (``task.Task.schema``), or None

    @property
    def data_seed(self) -> int:
        """The seed of the data's random splits: ``dataset.split_seed``, else ``seed``."""
        return data_seed(self.seed, self.dataset.split_seed)


def data_seed(seed: int, split_seed: int | None) -> int:
    """``split_seed`` when set, else the run's ``seed``."""
    return int(seed if split_seed is None else split_seed)


def read_settings(cfg: DictConfig, task_schema: tuple[str, type] | None = None) -> Settings:
    """Check and read the run's settings from ``cfg`` (``task_schema``: the task's group
    and schema). Raises ConfigError naming the first bad key."""
    _check_value("seed", cfg.get("seed"), int, dataclasses.MISSING)
    _check_value("tag", cfg.get("tag"), str | int | float | None, dataclasses.MISSING)
    scheduler = read(cfg.get("scheduler") or OmegaConf.create({}), SchedulerSettings,
                     "scheduler", closed=False)
    ratio = scheduler.min_lr_ratio
    if ratio is not None and ratio > 1:
        raise ConfigError(f"scheduler.min_lr_ratio must be in [0, 1], got {ratio}")
    task = None
    if task_schema is not None:
        group, schema = task_schema
        task = read(cfg.get(group) or OmegaConf.create({}), schema, group)
    return Settings(int(cfg.seed), cfg.get("tag"),
                    read(cfg.trainer, TrainerSettings, "trainer"),
                    read(cfg.evaluation, EvaluationSettings, "evaluation"),
                    read(cfg.dataset, DatasetSettings, "dataset", closed=False),
                    scheduler, task)


def read(node: DictConfig, schema: type, where: str, closed: bool = True) -> Any:
    """``node`` checked against the dataclass ``schema`` (``closed``: no other keys), as
    an instance of it. Nested ``_target_`` nodes are passed through as they are."""
    hints = typing.get_type_hints(schema)
    names = [f.name for f in dataclasses.fields(schema)]
    if closed:
        for key in node:
            if str(key) not in names:
                close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.5)
                raise ConfigError(f"{where} has no setting {key!r}" + (
                    f"; did you mean {where}.{close[0]}?" if close else
                    f"; its settings: {', '.join(names)}"))
    values = {}
    for f in dataclasses.fields(schema):
        key = f"{where}.{f.name}"
        if f.name not in node and f.default is dataclasses.MISSING or (
                f.name in node and OmegaConf.is_missing(node, f.name)):
            raise ConfigError(f"{key} has no value and needs one: add {key}=<value> to the "
                              "command")
        raw = OmegaConf.select(node, f.name, default=None, throw_on_missing=False)
        if hints[f.name] is Any:  # a node of its own (a _target_, a sub-group): as it is
            values[f.name] = raw
            continue
        value = OmegaConf.to_container(raw, resolve=True) \
            if isinstance(raw, DictConfig | ListConfig) else raw
        if value is None and f.default is None:  # an optional setting left out
            values[f.name] = None
            continue
        values[f.name] = _check_value(key, value, hints[f.name], f.default, **f.metadata)
    return schema(**values)


def _check_value(key: str, value: Any, kind: Any, default: Any, minimum: float | None = None,
                 above: float | None = None, below: float | None = None,
                 choices: Sequence[Any] | None = None,
                 check: Callable[[Any], str | None] | None = None) -> Any:
    """``value`` of the type ``kind`` and within its bounds, as that type; else one
    ConfigError naming ``key``."""
    if choices is not None:
        if value not in choices or isinstance(value, bool) != any(
                isinstance(c, bool) and c == value for c in choices):
            shown = ", ".join("null" if c is None else str(c).lower() if isinstance(c, bool)
                              else str(c) for c in choices)
            names = shown.split(", ")
            allowed = " or ".join(names) if len(names) == 2 else f"one of {shown}"
            raise ConfigError(f"{key} must be {allowed}, got {value!r}")
        return value
    if not _is_a(value, kind):
        raise ConfigError(f"{key} must be {_describe(kind)}, got {value!r}")
    if check is not None and (problem := check(value)):
        raise ConfigError(f"{key} {problem}, got {value!r}")
    if isinstance(value, int | float) and not isinstance(value, bool):
        for bound, ok, word in ((minimum, lambda v, b: v >= b, ">="),
                                (above, lambda v, b: v > b, ">"),
                                (below, lambda v, b: v < b, "<")):
            if bound is not None and not ok(value, bound):
                raise ConfigError(f"{key} must be {word} {bound:g}, got {value!r}")
    return float(value) if _allows(kind, float) and not _allows(kind, int) and \
        isinstance(value, int) else value


def _members(kind: Any) -> tuple[Any, ...]:
    if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union:
        return typing.get_args(kind)
    return (kind,)


def _allows(kind: Any, t: type) -> bool:
    return any(m is t for m in _members(kind))


def _is_a(value: Any, kind: Any) -> bool:
    for member in _members(kind):
        if member is Any or (member is type(None) and value is None):
            return True
        if member is float and isinstance(value, int | float) and not isinstance(value, bool):
            return True
        if member is int and isinstance(value, int) and not isinstance(value, bool):
            return True
        if member in (bool, str) and isinstance(value, member):
            return True
        if typing.get_origin(member) is list and isinstance(value, list):
            (item,) = typing.get_args(member)
            if all(_is_a(v, item) for v in value):
                return True
    return False


def _describe(kind: Any) -> str:
    words = []
    for member in _members(kind):
        if member is type(None):
            words.append("null")
        elif typing.get_origin(member) is list:
            words.append(f"a list of {TYPE_WORDS[typing.get_args(member)[0]]}s".replace(
                "an integers", "integers").replace("a numbers", "numbers"))
        else:
            words.append(TYPE_WORDS[member])
    return " or ".join(words)
