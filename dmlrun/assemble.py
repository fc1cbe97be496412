"""From config to what trains, before any data loads: check every setting once
(``check_config``), build the loss, miner, sampler, model, optimizer, scheduler,
augmentation and task, and check they fit together (``validate_config``); then load the
data (``load_data``). Every problem is one ConfigError."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from dmlrun import distributed
from dmlrun.components import (
    build,
    build_components,
    build_partial,
    check_appended,
    check_types,
    choice,
    has_target,
    resolve_device,
)
from dmlrun.data.dataset import TensorDataset
from dmlrun.distributed import Ranks
from dmlrun.errors import ConfigError
from dmlrun.losses.base import MetricLoss
from dmlrun.miners.base import Miner
from dmlrun.recorder import check_new_run_dir, check_resumable
from dmlrun.settings import Settings, read_settings
from dmlrun.task import Task, task_class

log = logging.getLogger("dmlrun")

# config.yaml's optional groups: settings for one combination of other groups' choices
SPECIALISATIONS = ("loss_miner", "loss_miner_optimizer", "experiment_dataset")


@dataclass
class Parts:
    """What trains, built from config before any data loads."""

    settings: Settings
    task: Task
    loss: MetricLoss
    miner: Miner | None
    sampler: Any
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any  # an LRScheduler or None
    augment: Any = None  # a callable on float batches, or None


def check_config(cfg: DictConfig) -> Settings:
    """Every check of settings that needs no data and builds nothing: the run's own
    settings against their schema (``settings``), the ``_target_`` nodes' values against
    their signatures, appended keys, the device. Returns the typed settings."""
    settings = read_settings(cfg, task_class(cfg).schema)
    check_types(cfg)
    check_appended(cfg)
    resolve_device(settings.trainer.device)
    return settings


def training_classes(settings: Settings) -> int | None:
    """How many classes the training split holds, from config alone (None: unknown)."""
    d = settings.dataset
    if d.train_classes is not None:
        return len(set(d.train_classes))
    held_out = d.val_classes or []  # validation only, never trained on
    return None if d.num_classes is None else d.num_classes - len(set(held_out))


def _classes_per_batch(cfg: DictConfig, settings: Settings) -> None:
    """With ``dataset.train_classes`` or ``val_classes`` leaving fewer training classes than
    the default ``sampler.p``, P follows the training classes (said in the log); a P the
    user set stays, and is checked."""
    n = training_classes(settings)
    p = cfg.sampler.get("p")  # samplers without classes per batch have none
    chosen = settings.dataset.train_classes is not None or settings.dataset.val_classes
    if not chosen or p is None or n is None or int(p) <= n:
        return
    overrides = HydraConfig.get().overrides.task if HydraConfig.initialized() else []
    if any(o.split("=")[0].lstrip("+~") == "sampler.p" for o in overrides):
        return
    cfg.sampler.p = n
    log.info("sampler.p=%d: the %d training classes (dataset.train_classes, val_classes)", n,
             n)


def validate_config(cfg: DictConfig, world: int = 1,
                    device: torch.device | None = None) -> Parts:
    """``check_config``, then build everything that needs no data (loss, miner, sampler,
    task, model, optimizer, scheduler, augmentation; the model on ``device``) and check
    they fit together. Raises ConfigError with one message."""
    settings = check_config(cfg)
    _classes_per_batch(cfg, settings)
    comps = build_components(cfg)
    n_classes = training_classes(settings)
    if n_classes is not None and hasattr(comps.sampler, "check"):
        comps.sampler.check(n_classes)
    distributed.check_divisible(comps.sampler, world, settings.trainer.mining == "local")
    task = task_class(cfg)(cfg, settings, world)
    device = device or torch.device("cpu")
    model = build(cfg.model, f"model={choice(cfg, 'model')}").to(device)
    if settings.trainer.channels_last and device.type == "cpu":
        model = model.to(memory_format=torch.channels_last)
    loss = comps.loss.to(device)
    optimizer = build_partial(cfg.optimizer, f"optimizer={choice(cfg, 'optimizer')}",
                              param_groups(model, loss))
    scheduler = build_partial(cfg.scheduler, f"scheduler={choice(cfg, 'scheduler')}",
                              optimizer) if has_target(cfg.scheduler) else None
    augment = build(cfg.augment, f"augment={choice(cfg, 'augment')}") \
        if has_target(cfg.get("augment")) else None
    return Parts(settings, task, loss, comps.miner, comps.sampler, model, optimizer,
                 scheduler, augment)


def param_groups(model: torch.nn.Module, loss_fn: torch.nn.Module) -> list[dict]:
    """The model's parameters (in the model's own groups when it has them, e.g. a trunk
    at ``model.trunk_lr``), plus the loss's own (proxies, beta) at ``loss.param_lr`` when
    set."""
    groups: list[dict] = model.parameter_groups() if hasattr(model, "parameter_groups") \
        else [{"params": list(model.parameters())}]
    own = [p for p in loss_fn.parameters() if p.requires_grad]
    if own:
        lr = getattr(loss_fn, "param_lr", None)
        groups.append({"params": own, **({"lr": float(lr)} if lr is not None else {})})
    return groups


def check_run_dir(settings: Settings, run_dir: Path) -> None:
    """A new run needs a folder without results; a resumed one, its own unfinished one."""
    run_dir.mkdir(parents=True, exist_ok=True)
    if settings.trainer.resume:
        check_resumable(Path(settings.trainer.resume), run_dir)
    else:
        check_new_run_dir(run_dir)


def load_data(cfg: DictConfig, names: dict[str, str], parts: Parts,
              device: torch.device) -> TensorDataset:
    """The dataset on ``device``, checked against the sampler and the loss."""
    data = build(cfg.dataset, f"dataset={names['dataset']}",
                 seed=parts.settings.data_seed).to(device)
    train_classes = len(torch.unique(data.train.labels))
    parts.sampler.check(train_classes)
    n_classes = getattr(parts.loss, "num_classes", None)
    if isinstance(n_classes, int) and int(data.train.labels.max()) >= n_classes:
        raise ConfigError(
            f"loss={names['loss']} has {n_classes} class proxies but the labels go up to "
            f"{int(data.train.labels.max())}; set loss.num_classes={data.num_classes}")
    log.info("data: %d train, %d validation, %d test images; %d classes in training, %d in "
             "test", len(data.train), len(data.val), len(data.test), train_classes,
             len(torch.unique(data.test.labels)))
    return data


def specialisations(cfg: DictConfig) -> list[str]:
    """The shipped specialisation files (e.g. loss_miner/triplet_hard.yaml) that Hydra
    applied to this run's combination of groups."""
    found = []
    for group in SPECIALISATIONS:
        name = choice(cfg, group)
        if (resources.files("dmlrun.configs") / group / f"{name}.yaml").is_file():
            found.append(f"{group}/{name}.yaml")
    return found


def log_start(cfg: DictConfig, run_dir: Path, ranks: Ranks, device: torch.device,
              parts: Parts, amp_dtype: torch.dtype | None, names: dict[str, str]) -> None:
    t = parts.settings.trainer
    log.info("run folder: %s", run_dir.resolve())
    amp = "bf16" if amp_dtype else "off"  # resolve_amp gives bf16 or None
    if t.amp == "auto" and device.type == "cpu":
        amp += f" (trainer.amp=auto: this CPU has {'' if amp_dtype else 'no '}AMX tiles)"
    log.info("device %s, amp %s; %s", device, amp,
             " ".join(f"{k}={v}" for k, v in names.items()))
    for path in specialisations(cfg):
        log.info("settings for this combination from configs/%s", path)
    if parts.miner is not None:
        log.info("miner %r; optimizer lr %s%s", parts.miner, cfg.optimizer.get("lr"),
                 f", warm-up over {t.warmup_epochs:g} epoch(s)" if t.warmup_epochs > 0 else "")
    if parts.augment is not None:
        log.info("augmentation on the device: %r%s", parts.augment,
                 f", off for the last {t.no_aug_epochs} epoch(s)" if t.no_aug_epochs else "")
    if ranks.launched:
        log.info("%d process%s (%s), each with %d of the %d images per batch; mining %s",
                 ranks.world, "es" if ranks.world > 1 else "",
                 torch.distributed.get_backend(), parts.sampler.batch_size // ranks.world,
                 parts.sampler.batch_size, t.mining)


@dataclass
class Context:
    """What the steps of one run share."""

    cfg: DictConfig
    run_dir: Path
    ranks: Ranks
    device: torch.device
    parts: Parts
    data: TensorDataset
    amp_dtype: torch.dtype | None
    names: dict[str, str]
    logger: Any  # a loggers.TensorBoardLogger on the main process, or None
