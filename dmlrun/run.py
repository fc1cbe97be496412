"""One run: build from config, train, select on validation, test once, write the folder.

``run(cfg, run_dir)`` is what the CLI and the tests call; it returns the summary dict.
It reads top to bottom as the run goes: check the config and build what trains (no data
yet), load the data, resume if asked, fit, test the best epoch once, write plots and
summary. The run folder's files are written by ``recorder.Recorder``; several processes
are managed by ``distributed``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import platform
import shlex
import signal
import sys
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import hydra
import torch
import torchvision
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from dmlrun import __version__, components, distributed, plots, retrieval_plots
from dmlrun.components import (
    build,
    build_components,
    build_partial,
    check_appended,
    check_types,
    choice,
    has_target,
    resolve_amp,
    resolve_device,
    seed_everything,
)
from dmlrun.data.dataset import TensorDataset, chunks
from dmlrun.data.samplers import Epoch
from dmlrun.distributed import Ranks
from dmlrun.errors import ConfigError, Interrupted
from dmlrun.losses.base import MetricLoss
from dmlrun.metrics import (
    METRIC_NAMES,
    RECALL_KS,
    display_order,
    embed,
    embed_split,
    evaluate_embeddings,
)
from dmlrun.miners.base import Miner
from dmlrun.recorder import Recorder, TrainingState, check_new_run_dir, check_resumable
from dmlrun.report import write_run_report
from dmlrun.semi import (
    FEATURE_LAYERS,
    GRAPH_SPACES,
    MIN_GRAPH_DIM,
    SemiSupervision,
    feature_layer,
    penultimate_features,
    pick_labeled,
)
from dmlrun.train import StepConfig, ViewsTerm, WeightAverage, fit

log = logging.getLogger("dmlrun")

COLLAPSE_RATIO = 0.01  # class distances this small a fraction of the start: collapsed
FRAME_POINTS = 2000  # validation points drawn in the per-epoch frames
LOG_FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"  # as Hydra's
SPECIALISATIONS = ("loss_miner", "loss_miner_optimizer")  # config.yaml's optional groups
# trainer.compile: off, or a torch.compile mode ("reduce-overhead" captures CUDA graphs)
COMPILE_MODES = (None, False, "default", "reduce-overhead", "max-autotune")


# ---------------------------------------------------------------- entry points


def run(cfg: DictConfig, run_dir: str | Path) -> dict[str, Any] | None:
    """Train and evaluate one configuration; write checkpoints, metrics, plots and summary
    into ``run_dir``. Raises UserError for problems the user can fix.

    Started by torchrun (or as a SLURM job's tasks), every process calls this; only rank 0
    writes ``run_dir`` and returns the summary, the others return None."""
    t_start = time.perf_counter()
    ranks = distributed.from_env()
    wanted = distributed.requested(cfg.trainer.get("devices", "auto"))
    if ranks.world == 1 and wanted is not None and wanted > 1:
        return _spawn_ranks(cfg, Path(run_dir), wanted)
    if ranks.world > 1 and wanted not in (None, ranks.world):
        raise ConfigError(f"trainer.devices={wanted} but {ranks.world} processes were "
                          f"started; set trainer.devices=auto or {ranks.world}")
    device = resolve_device(str(cfg.trainer.device))
    opened = ranks.launched and not torch.distributed.is_initialized()
    device = distributed.init(ranks, device)
    level = logging.getLogger("dmlrun").level  # restored at the end
    if not ranks.main:  # rank 0 speaks for the run
        logging.getLogger("dmlrun").setLevel(logging.ERROR)
    run_dir = Path(run_dir)
    handler = None
    try:
        distributed.on_main(lambda: _check_run_dir(cfg, run_dir), ranks)
        handler = _attach_log_file(run_dir) if ranks.main else None
        with StopSignals() as signals:
            return _run(cfg, run_dir, t_start, ranks, device, signals)
    except Interrupted as exc:
        done = (run_dir / "checkpoints" / "last.pt").is_file()
        raise Interrupted(
            f"{exc}. " + (f"checkpoints/last.pt holds the last finished epoch; continue with:"
                          f"\n  {resume_command(run_dir)}" if done else
                          "No epoch had finished, so there is nothing to resume."),
            exc.exit_code - 128) from None
    finally:
        if handler is not None:
            logging.getLogger().removeHandler(handler)
            handler.close()
        logging.getLogger("dmlrun").setLevel(level)
        if opened:
            distributed.close()


def resume_command(run_dir: Path) -> str:
    """The shell command that continues the run in ``run_dir``: the same overrides, and
    ``trainer.resume``."""
    given = HydraConfig.get().overrides.task if HydraConfig.initialized() else []
    keep = [o for o in given if o.split("=", 1)[0].lstrip("+~") not in
            ("trainer.resume", "hydra.run.dir")]
    return shlex.join(["dmlrun", *keep, f"trainer.resume={run_dir}"])


def rank_entry(config: dict, run_dir: str, choices: dict) -> None:
    """One process of ``trainer.devices=N`` (see ``distributed.spawn_run``): the run with
    this rank's share; rank 0 logs to stdout."""
    components.CHOICES.update(choices)
    if distributed.env_rank() == 0:
        logging.basicConfig(level=logging.INFO, format=LOG_FORMAT, stream=sys.stdout)
    run(OmegaConf.create(config), run_dir)


def _spawn_ranks(cfg: DictConfig, run_dir: Path, n: int) -> dict[str, Any]:
    """``trainer.devices=n`` without torchrun: start n processes on this machine, wait,
    and return rank 0's summary."""
    validate_config(cfg, n)  # fail here, once, rather than in every process
    distributed.check_gpus(n, resolve_device(str(cfg.trainer.device)))
    log.info("starting %d processes on this machine", n)
    distributed.spawn_run(rank_entry, n, OmegaConf.to_container(cfg, resolve=True),
                          str(run_dir), {g: choice(cfg, g) for g in cfg})
    with open(run_dir / "summary.json") as f:
        return json.load(f)


# ---------------------------------------------------------------- config checks


@dataclass
class Parts:
    """What trains, built from config before any data loads."""

    loss: MetricLoss
    miner: Miner | None
    sampler: Any
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any  # an LRScheduler or None
    augment: Any = None  # a callable on float batches, or None
    views: ViewsTerm | None = None  # semi.views: the two-view loss on unlabeled images


def check_config(cfg: DictConfig, world: int = 1) -> None:
    """Every check of settings that needs no data and builds nothing: values present and
    of the right type, ranges and choices, and what ``world`` processes allow."""
    check_types(cfg)
    check_appended(cfg)
    tcfg = cfg.trainer
    checks = [
        (int(tcfg.max_epochs) >= 1, f"trainer.max_epochs must be >= 1, got {tcfg.max_epochs}"),
        (tcfg.monitor in METRIC_NAMES, f"trainer.monitor={tcfg.monitor} is not a validation "
                                       f"metric; choose one of {', '.join(METRIC_NAMES)}"),
        (str(tcfg.get("nonfinite", "stop")) in ("stop", "skip"),
         f"trainer.nonfinite must be stop or skip, got {tcfg.get('nonfinite')!r}"),
        (str(tcfg.get("mining", "global")) in ("global", "local"),
         f"trainer.mining must be global or local, got {tcfg.get('mining')!r}"),
        (int(tcfg.log_every) >= 1, f"trainer.log_every must be >= 1, got {tcfg.log_every}"),
        (tcfg.get("compile") in COMPILE_MODES,
         f"trainer.compile must be one of {', '.join(map(str, COMPILE_MODES))}, got "
         f"{tcfg.get('compile')!r}"),
        (float(tcfg.get("warmup_epochs", 0)) >= 0,
         f"trainer.warmup_epochs must be >= 0, got {tcfg.get('warmup_epochs')}"),
        (cfg.get("scheduler", {}).get("anneal") in (None, "cosine"),
         f"scheduler.anneal must be cosine or null, got {cfg.scheduler.get('anneal')!r}"),
        (0 <= float(cfg.get("scheduler", {}).get("min_lr_ratio", 0.0)) <= 1,
         f"scheduler.min_lr_ratio must be in [0, 1], got {cfg.scheduler.get('min_lr_ratio')}"),
        (tcfg.get("ema_decay") is None or 0 < float(tcfg.ema_decay) < 1,
         f"trainer.ema_decay must be in (0, 1) or null, got {tcfg.get('ema_decay')}"),
        (int(tcfg.eval_batch_size) >= 1,
         f"trainer.eval_batch_size must be >= 1, got {tcfg.eval_batch_size}"),
        (int(cfg.evaluation.knn_k) >= 1, f"evaluation.knn_k must be >= 1, got "
                                         f"{cfg.evaluation.knn_k}"),
    ]
    checks += _semi_checks(cfg)
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    resolve_device(str(tcfg.device))
    resolve_amp(tcfg.amp, torch.device("cpu"))


def _semi_checks(cfg: DictConfig) -> list[tuple[bool, str]]:
    per_class = cfg.dataset.get("labeled_per_class")
    method = choice(cfg, "semi")
    if per_class is None:
        return [(cfg.semi.get("method") is None,
                 f"semi={method} needs unlabeled images: set dataset.labeled_per_class=<n> "
                 "(e.g. 10)")]
    views = _views_node(cfg)
    features = cfg.semi.get("features", "output")
    return [
        (int(per_class) >= 2, "dataset.labeled_per_class must be >= 2 (a class needs a "
                              f"positive pair), got {per_class}"),
        (not cfg.sampler.get("yields"), "semi-supervised runs draw P x K batches: use "
                                        "sampler=pk"),
        (features in FEATURE_LAYERS, f"semi.features must be one of "
                                     f"{', '.join(FEATURE_LAYERS)}, got {features!r}"),
        (views is None or int(views.batch) >= 2, "semi.views.batch must be >= 2 (each "
                                                 "image needs another as its negative), "
                                                 f"got {views and views.batch}"),
        (cfg.semi.get("graph", "auto") in GRAPH_SPACES,
         f"semi.graph must be one of {', '.join(GRAPH_SPACES)}, got {cfg.semi.get('graph')!r}"),
        (int(cfg.semi.get("refresh_every", 2)) >= 1,
         f"semi.refresh_every must be >= 1, got {cfg.semi.get('refresh_every')}"),
        (int(cfg.semi.get("warmup_epochs", 2)) >= 0,
         f"semi.warmup_epochs must be >= 0, got {cfg.semi.get('warmup_epochs')}"),
    ]


def training_classes(cfg: DictConfig) -> int | None:
    """How many classes the training split holds, from config alone (None: unknown)."""
    chosen = cfg.dataset.get("train_classes")
    if chosen is not None:
        return len({int(c) for c in chosen})
    n = cfg.dataset.get("num_classes")
    held_out = cfg.dataset.get("val_classes") or []  # validation only, never trained on
    return None if n is None else int(n) - len({int(c) for c in held_out})


def _classes_per_batch(cfg: DictConfig) -> None:
    """With ``dataset.train_classes`` or ``val_classes`` leaving fewer training classes than
    the default ``sampler.p``, P follows the training classes (said in the log); a P the
    user set stays, and is checked."""
    n = training_classes(cfg)
    p = cfg.sampler.get("p")
    chosen = cfg.dataset.get("train_classes") is not None or cfg.dataset.get("val_classes")
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
    model, optimizer, scheduler; the model on ``device``) and check they fit together.
    Raises ConfigError with one message."""
    check_config(cfg, world)
    _classes_per_batch(cfg)
    comps = build_components(cfg)
    n_classes = training_classes(cfg)
    if n_classes is not None and hasattr(comps.sampler, "check"):
        comps.sampler.check(n_classes)
    distributed.check_divisible(comps.sampler, world,
                                str(cfg.trainer.get("mining", "global")) == "local")
    views = views_term(cfg)
    if views is not None and int(cfg.semi.views.batch) % world:
        raise ConfigError(f"semi.views.batch={cfg.semi.views.batch} images cannot be shared "
                          f"evenly by {world} processes; use a multiple of {world}")
    device = device or torch.device("cpu")
    model = build(cfg.model, f"model={choice(cfg, 'model')}").to(device)
    if bool(cfg.trainer.channels_last) and device.type == "cpu":
        model = model.to(memory_format=torch.channels_last)
    loss = comps.loss.to(device)
    optimizer = build_partial(cfg.optimizer, f"optimizer={choice(cfg, 'optimizer')}",
                              param_groups(model, loss))
    scheduler = build_partial(cfg.scheduler, f"scheduler={choice(cfg, 'scheduler')}",
                              optimizer) if has_target(cfg.scheduler) else None
    augment = build(cfg.augment, f"augment={choice(cfg, 'augment')}") \
        if has_target(cfg.get("augment")) else None
    return Parts(loss, comps.miner, comps.sampler, model, optimizer, scheduler, augment,
                 views)


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


def _check_run_dir(cfg: DictConfig, run_dir: Path) -> None:
    """A new run needs a folder without results; a resumed one, its own unfinished one."""
    run_dir.mkdir(parents=True, exist_ok=True)
    if cfg.trainer.get("resume"):
        check_resumable(Path(str(cfg.trainer.resume)), run_dir)
    else:
        check_new_run_dir(run_dir)


# ---------------------------------------------------------------- the run


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


def _run(cfg: DictConfig, run_dir: Path, t_start: float, ranks: Ranks, device: torch.device,
         signals: StopSignals) -> dict[str, Any] | None:
    seed_everything(int(cfg.seed))  # before building: losses may draw initial proxies
    parts = validate_config(cfg, ranks.world, device)  # before any data loads
    names = {g: choice(cfg, g) for g in ("dataset", "model", "loss", "miner", "sampler")}
    amp_dtype = resolve_amp(cfg.trainer.amp, device)
    _log_start(cfg, run_dir, ranks, device, parts, amp_dtype, names)
    logger = (build_partial(cfg.logger, f"logger={choice(cfg, 'logger')}", run_dir)
              if has_target(cfg.get("logger")) and ranks.main else None)
    ctx = Context(cfg, run_dir, ranks, device, parts, _load_data(cfg, names, parts, device),
                  amp_dtype, names, logger)
    semi = _semi_supervision(cfg, ctx.data, parts.sampler, run_dir)
    decay = cfg.trainer.get("ema_decay")
    training = TrainingState(parts.model, parts.loss, parts.optimizer, parts.scheduler,
                             torch.Generator().manual_seed(int(cfg.seed)), semi,
                             WeightAverage(parts.model, float(decay)) if decay else None)
    recorder = Recorder(run_dir, str(cfg.trainer.monitor),
                        OmegaConf.to_container(cfg, resolve=True))
    evaluator = Evaluator(parts.model, parts.loss.distance, int(cfg.evaluation.knn_k),
                          int(cfg.seed), int(cfg.trainer.eval_batch_size), ctx.amp_dtype,
                          tuple(cfg.dataset.get("recall_ks") or RECALL_KS),
                          bool(cfg.evaluation.clustering))
    baselines = (evaluator.baselines(ctx.data.test)
                 if cfg.evaluation.baselines and ranks.main else {})
    start, done = 1, []
    if cfg.trainer.get("resume"):
        start, done = recorder.restore(cfg, training, device, ranks.main)
        log.info("resuming %s after epoch %d (best epoch %d)", run_dir, start - 1,
                 recorder.best["epoch"])
    validation = Validation(evaluator, ctx.data.val, ranks.main,
                            run_dir / "plots" / "epochs" if cfg.trainer.epoch_plots else None,
                            device)
    if start == 1:
        validation.untrained_frame()
    history = done + _fit(ctx, semi, training, recorder, validation, signals, start)
    if not ranks.main:
        return None
    best_state = recorder.best_state(device)
    parts.model.load_state_dict(best_state["model"])
    test_emb, test = evaluator(ctx.data.test)
    if logger is not None:
        shown = torch.arange(min(len(ctx.data.test), logger.projector_points))
        logger.log_embedding(test_emb[shown], ctx.data.test.labels[shown],
                             ctx.data.test.take(shown))
    t_plots = time.perf_counter()
    extra = _write_plots(ctx, history, recorder, validation, test_emb, test, baselines)
    summary = _write_summary(ctx, history, recorder, best_state, test_emb, test, baselines,
                             {**extra, "plot_seconds": time.perf_counter() - t_plots},
                             time.perf_counter() - t_start)
    write_run_report(run_dir)
    if logger is not None:
        logger.log_hparams({**names, "seed": int(cfg.seed), "lr": cfg.optimizer.get("lr"),
                            "embedding_dim": summary["embedding_dim"],
                            "epochs": summary["epochs"]},
                           {f"test_{k}": v for k, v in test.items()})
        logger.close()
    return summary


def _load_data(cfg: DictConfig, names: dict[str, str], parts: Parts,
               device: torch.device) -> TensorDataset:
    data = build(cfg.dataset, f"dataset={names['dataset']}", seed=int(cfg.seed)).to(device)
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


def _log_start(cfg: DictConfig, run_dir: Path, ranks: Ranks, device: torch.device,
               parts: Parts, amp_dtype: torch.dtype | None, names: dict[str, str]) -> None:
    log.info("run folder: %s", run_dir.resolve())
    log.info("device %s, amp %s; %s", device, amp_dtype,
             " ".join(f"{k}={v}" for k, v in names.items()))
    for path in specialisations(cfg):
        log.info("settings for this combination from configs/%s", path)
    warmup = float(cfg.trainer.get("warmup_epochs", 0))
    if parts.miner is not None:
        log.info("miner %r; optimizer lr %s%s", parts.miner, cfg.optimizer.get("lr"),
                 f", warm-up over {cfg.trainer.warmup_epochs} epoch(s)" if warmup > 0 else "")
    if parts.augment is not None:
        log.info("augmentation on the device: %r", parts.augment)
    if ranks.launched:
        log.info("%d process%s (%s), each with %d of the %d images per batch; mining %s",
                 ranks.world, "es" if ranks.world > 1 else "",
                 torch.distributed.get_backend(), parts.sampler.batch_size // ranks.world,
                 parts.sampler.batch_size, cfg.trainer.get("mining", "global"))


def _semi_supervision(cfg: DictConfig, data: TensorDataset, sampler: Any,
                      run_dir: Path) -> SemiSupervision | None:
    """With ``dataset.labeled_per_class`` set: hide the other training labels (the chosen
    indices go to labeled_indices.json) and set up the ``semi`` method, if any."""
    per_class = cfg.dataset.get("labeled_per_class")
    if per_class is None:
        return None
    try:
        labeled = pick_labeled(data.train.labels, int(per_class), int(cfg.seed))
    except ValueError as exc:
        raise ConfigError(f"dataset.labeled_per_class={per_class}: {exc}") from exc
    with open(run_dir / "labeled_indices.json", "w") as f:
        json.dump({"seed": int(cfg.seed), "labeled_per_class": int(per_class),
                   "indices": labeled.tolist()}, f)
    method_node = cfg.semi.get("method")
    method = build(method_node, f"semi={choice(cfg, 'semi')}") if method_node else None
    log.info("semi-supervised: %d labeled training images, %d unlabeled; method %s",
             len(labeled), len(data.train) - len(labeled), method_node and
             method_node._target_.rsplit(".", 1)[-1])
    s = cfg.semi
    views = _views_node(cfg)
    return SemiSupervision(data.train.labels, labeled, data.num_classes, sampler, method,
                           int(s.get("warmup_epochs", 0)), int(s.get("refresh_every", 1)),
                           int(s.get("p", 10)), int(s.get("k", 25)),
                           str(s.get("graph", "embedding")), data.val.labels,
                           0 if views is None else int(views.batch))


def _views_node(cfg: DictConfig) -> DictConfig | None:
    """The ``semi.views`` settings when the two-view term is on (a positive weight)."""
    views = cfg.semi.get("views")
    return views if views is not None and float(views.weight) > 0 else None


def views_term(cfg: DictConfig) -> ViewsTerm | None:
    """``semi.views``: the loss on two augmented views of unlabeled images, or None (off)."""
    views = _views_node(cfg)
    if views is None or cfg.dataset.get("labeled_per_class") is None:
        return None
    where = f"semi={choice(cfg, 'semi')} semi.views"
    return ViewsTerm(build(views.loss, f"{where}.loss"), build(views.augment,
                                                               f"{where}.augment"),
                     float(views.weight))


def raw_pixels(split: Any, batch_size: int = 4096) -> torch.Tensor:
    """(N, C * H * W) float pixels in [0, 1] of a split."""
    return torch.cat([x.flatten(1).float() / 255.0 for x in
                      split.batches(chunks(len(split), batch_size))])


class Evaluator:
    """Embeds with the run's model and grades with the run's distance."""

    def __init__(self, model: torch.nn.Module, distance: Any, knn_k: int, seed: int,
                 batch_size: int, amp_dtype: torch.dtype | None,
                 recall_ks: tuple[int, ...] = RECALL_KS, clustering: bool = True) -> None:
        self.model, self.distance, self.knn_k, self.seed = model, distance, knn_k, seed
        self.batch_size, self.amp_dtype, self.recall_ks = batch_size, amp_dtype, recall_ks
        self.clustering = clustering

    def __call__(self, split: Any) -> tuple[torch.Tensor, dict[str, float]]:
        """(N, D) embeddings of a split's images, and every metric on them."""
        return self.grade(embed_split(self.model, split, self.batch_size, self.amp_dtype),
                          split)

    def grade(self, emb: torch.Tensor, split: Any) -> tuple[torch.Tensor, dict[str, float]]:
        """Every metric of (N, D) embeddings of ``split``: leave-one-out, or its queries
        against its gallery (``split.query_count``)."""
        return emb, evaluate_embeddings(emb, split.labels, self.distance, self.knn_k,
                                        self.seed, getattr(split, "query_count", None),
                                        self.recall_ks, self.clustering)

    def baselines(self, split: Any) -> dict[str, dict[str, float]]:
        """The metrics of the untrained model and of raw pixels on ``split``."""
        raw = raw_pixels(split, self.batch_size).to(split.labels.device)
        return {"untrained": self(split)[1], "raw_pixels": self.grade(raw, split)[1]}


class Validation:
    """Validation after each epoch, on the main process only. With ``frames_dir``, a fixed
    sample of validation embeddings is saved there each epoch (``frame_NNN.pt``; epoch 0 =
    the untrained network), so the per-epoch frames survive an interruption and resume."""

    def __init__(self, evaluator: Evaluator, split: Any, main: bool,
                 frames_dir: Path | None, device: torch.device) -> None:
        self.evaluator, self.split, self.main = evaluator, split, main
        self.frames_dir = frames_dir if main else None
        self.frame_idx = torch.randperm(len(split), generator=torch.Generator().manual_seed(
            0))[:FRAME_POINTS].to(device)

    def __call__(self, epoch: int) -> dict[str, float]:
        if not self.main:
            return {}
        emb, metrics = self.evaluator(self.split)
        self._save_frame(epoch, emb[self.frame_idx])
        return metrics

    def untrained_frame(self) -> None:
        """Epoch 0's frame: the network before training."""
        if self.frames_dir is not None:
            emb = embed(self.evaluator.model, self.split.take(self.frame_idx),
                        self.evaluator.batch_size, self.evaluator.amp_dtype)
            self._save_frame(0, emb)

    def _save_frame(self, epoch: int, emb: torch.Tensor) -> None:
        if self.frames_dir is not None:
            self.frames_dir.mkdir(parents=True, exist_ok=True)
            torch.save(emb.cpu(), self.frames_dir / f"frame_{epoch:03d}.pt")

    def frames(self) -> list[tuple[int, torch.Tensor]]:
        """Every saved (epoch, embeddings) frame, in epoch order (from before a resume
        too)."""
        if self.frames_dir is None or not self.frames_dir.is_dir():
            return []
        return [(int(f.stem.split("_")[1]), torch.load(f, weights_only=True))
                for f in sorted(self.frames_dir.glob("frame_*.pt"))]


class EpochEnd:
    """After each epoch: the main process checkpoints and records it, logs it with the
    loss's warnings, and decides on early stopping; every process follows."""

    def __init__(self, recorder: Recorder, training: TrainingState,
                 semi: SemiSupervision | None, logger: Any, patience: int | None,
                 ranks: Ranks) -> None:
        self.recorder, self.training, self.semi, self.logger = recorder, training, semi, logger
        self.patience, self.ranks = patience, ranks

    def __call__(self, record: dict) -> bool:
        """Returns True to stop early."""
        return distributed.broadcast(self._main(record) if self.ranks.main else False)

    def _main(self, record: dict) -> bool:
        if self.semi is not None and (note := self.semi.take_note()):
            log.info("epoch %d: %s", record["epoch"], note)
        if self.semi is not None and self.semi.quality:
            record.update(self.semi.quality)
            q = self.semi.quality
            log.info("epoch %d: pseudo-labels from %s %.1f%% right on the validation images "
                     "(hidden: %.1f%% right on the unlabeled training images); kept %.1f%% of "
                     "them, %.1f%% right", record["epoch"],
                     "raw pixels" if q["pseudo_from_pixels"] else "the model's features",
                     100 * q["pseudo_val_accuracy"], 100 * q["pseudo_accuracy"],
                     100 * q["pseudo_kept_fraction"], 100 * q["pseudo_kept_accuracy"])
        self.recorder.save(record, self.training)
        if self.logger is not None:
            self.logger.log_epoch(record)
        for warning in self._warnings(record):
            log.warning("epoch %d: %s", record["epoch"], warning)
        log.info(
            "epoch %d: loss %.4g, %.0f tuples/step (%.0f%% active), val P@1 %.4f, MAP@R %.4f, "
            "%.0f samples/s, %.1fs; d(pos) %.3g, d(neg) %.3g", record["epoch"],
            record["train_loss"], record["tuples_per_step"], 100 * record["active_fraction"],
            record["val_precision_at_1"], record["val_map_at_r"], record["samples_per_s"],
            record["epoch_seconds"], record["pos_distance"], record["neg_distance"])
        best = self.recorder.best["epoch"]
        if self.patience is not None and record["epoch"] - best >= self.patience:
            log.info("early stop: no val %s gain for %d epochs", self.recorder.monitor,
                     self.patience)
            return True
        return False

    def _warnings(self, record: dict) -> list[str]:
        reference = self.recorder.first_neg_distance
        found = []
        if record["neg_distance"] < COLLAPSE_RATIO * reference:
            found.append(
                f"the embeddings have collapsed: the mean distance between classes is "
                f"{record['neg_distance']:.3g}, "
                f"{100 * record['neg_distance'] / reference:.2g}% of the untrained network's "
                f"{reference:.3g}. Lower optimizer.lr, mine in small, growing pools "
                "(miner.pool_k=2 miner.grow=true) or use miner=semihard.")
        return found + self.training.loss.epoch_warnings(record, reference)


def _fit(ctx: Context, semi: SemiSupervision | None, training: TrainingState,
         recorder: Recorder, validation: Validation, signals: StopSignals,
         start: int) -> list[dict]:
    """Train epochs ``start..max_epochs``; returns their records."""
    cfg, ranks, parts, data = ctx.cfg, ctx.ranks, ctx.parts, ctx.data
    tcfg = cfg.trainer
    step_cfg = StepConfig(ctx.amp_dtype, bool(tcfg.channels_last) and ctx.device.type == "cpu",
                          int(tcfg.log_every), tcfg.progress_bar if ranks.main else False,
                          float(cfg.semi.get("unlabeled_weight", 1.0)),
                          str(tcfg.get("nonfinite", "stop")), signals.received, ranks.world,
                          str(tcfg.get("mining", "global")),
                          float(tcfg.get("warmup_epochs", 0.0)),
                          cfg.scheduler.get("anneal"), int(tcfg.max_epochs),
                          float(cfg.scheduler.get("min_lr_ratio", 0.0)), training.ema,
                          parts.augment, parts.views)
    eval_bs = int(tcfg.eval_batch_size)
    if semi is None:
        def next_epoch() -> Epoch:
            # every rank draws the same global epoch and keeps its slice of each batch
            return distributed.shard(parts.sampler.epoch(data.train.labels,
                                                         training.sampler_rng), ranks)
        train_split = data.train
    else:
        def next_epoch() -> Epoch:
            # rank 0 refreshes the pseudo-labels and shares them; every rank draws the
            # same epoch and keeps its slice of each batch
            return distributed.shard(semi.next_epoch(
                features, training.sampler_rng, ranks.main, distributed.broadcast), ranks)

        layer = feature_layer(str(cfg.semi.get("features", "output")),
                              int(cfg.model.get("embedding_dim", MIN_GRAPH_DIM)))

        def features(space: str) -> torch.Tensor:
            """(N + V, F) features of every training image, then every validation image,
            for the pseudo-label graph."""
            if space == "pixels":
                return torch.cat([raw_pixels(data.train), raw_pixels(data.val)])
            embed_fn = penultimate_features if layer == "penultimate" else embed_split
            return torch.cat([embed_fn(parts.model, split, eval_bs, ctx.amp_dtype)
                              for split in (data.train, data.val)])
        train_split = data.train.with_labels(semi.labels)
    patience = tcfg.get("early_stopping_patience")
    on_epoch_end = EpochEnd(recorder, training, semi, ctx.logger,
                            None if patience is None else int(patience), ranks)
    model = parts.model
    if ranks.launched:  # averages gradients over ranks during backward
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
    if tcfg.get("compile"):  # the training forward and backward; evaluation stays eager
        log.info("torch.compile(mode=%s) for training; the first steps compile", tcfg.compile)
        model = torch.compile(model, mode=None if tcfg.compile == "default" else
                              str(tcfg.compile))

    def on_steps(epoch: int, steps: torch.Tensor) -> None:
        rows = recorder.write_steps(epoch, steps)
        if ctx.logger is not None:
            ctx.logger.log_steps(epoch, rows)

    return fit(model, parts.loss, parts.miner, parts.optimizer, parts.scheduler, next_epoch,
               train_split, validation, on_epoch_end, int(tcfg.max_epochs), step_cfg,
               start_epoch=start, on_steps=on_steps if ranks.main else None)


# ---------------------------------------------------------------- outputs


def format_table(rows: dict[str, dict[str, float]]) -> str:
    """Metrics as an aligned text table, one row per model."""
    cols = display_order({c for r in rows.values() for c in r})
    head = f"{'':<12}" + "".join(f"{c:>15}" for c in cols)
    lines = [head] + [f"{name:<12}" + "".join(f"{r.get(c, float('nan')):>15.4f}" for c in cols)
                      for name, r in rows.items()]
    return "\n".join(lines)


def versions() -> dict[str, str]:
    return {"dmlrun": __version__, "torch": torch.__version__,
            "torchvision": torchvision.__version__, "hydra": hydra.__version__,
            "python": platform.python_version()}


def _write_plots(ctx: Context, history: list[dict], recorder: Recorder,
                 validation: Validation, test_emb: torch.Tensor, test: dict,
                 baselines: dict) -> dict[str, Any]:
    """Every plot under plots/; returns the analysis numbers for summary.json."""
    data, names, cfg = ctx.data, ctx.names, ctx.cfg
    plot_dir = ctx.run_dir / "plots"
    classes = list(data.class_names) if data.class_names else None
    points, how = plots.project_2d(test_emb, str(cfg.evaluation.projection), int(cfg.seed))
    plots.scatter(
        points, data.test.labels, plot_dir / "embedding.png",
        f"{data.name} test: loss={names['loss']} miner={names['miner']} epoch "
        f"{recorder.best['epoch']} - P@1 {test['precision_at_1']:.3f} MAP@R "
        f"{test['map_at_r']:.3f}", class_names=classes, xlabel=how)
    # the 2-D points, so a sweep's summary can redraw every run's embedding from data
    torch.save({"points": points.cpu(), "labels": data.test.labels.cpu()},
               plot_dir / "embedding_points.pt")
    plots.curves(history, plot_dir / "curves.png",
                 ["precision_at_1", "map_at_r", "r_precision", "nmi"], recorder.step_rows(),
                 baselines)
    if any("pseudo_accuracy" in h for h in history):
        plots.pseudo_labels(history, plot_dir / "pseudo_labels.png")
    if frames := validation.frames():
        plots.epoch_frames(frames, data.val.labels[validation.frame_idx], plot_dir / "epochs",
                           f"{data.name} val: loss={names['loss']} miner={names['miner']}",
                           class_names=classes)
    loss = ctx.parts.loss
    return retrieval_plots.write_all(test_emb, data.test, loss.distance,
                                     retrieval_plots.loss_margin(loss), data.num_classes,
                                     plot_dir, f"{data.name} test", classes, int(cfg.seed))


def _write_summary(ctx: Context, history: list[dict], recorder: Recorder, best_state: dict,
                   test_emb: torch.Tensor, test: dict, baselines: dict,
                   extra: dict[str, Any], wall: float) -> dict[str, Any]:
    cfg, ranks, device, data = ctx.cfg, ctx.ranks, ctx.device, ctx.data
    best = recorder.best
    log.info("best epoch %d (val %s %.4f); test P@1 %.4f, MAP@R %.4f", best["epoch"],
             recorder.monitor, best["value"], test["precision_at_1"], test["map_at_r"])
    log.info("test metrics:\n%s", format_table({"trained": test, **baselines}))
    train_seconds = sum(h["train_seconds"] for h in history)
    summary = {
        "run_dir": str(ctx.run_dir.resolve()),
        "choices": ctx.names,
        "seed": int(cfg.seed),
        "tag": cfg.get("tag"),
        "embedding_dim": int(test_emb.shape[1]),
        "train_classes": torch.unique(data.train.labels).tolist(),
        "test_classes": torch.unique(data.test.labels).tolist(),
        "epochs": len(history),
        "best_epoch": best["epoch"],
        "monitor": recorder.monitor,
        "val": {k[4:]: v for k, v in best_state["metrics"].items() if k.startswith("val_")},
        "test": test,
        "baselines": baselines,
        **extra,
        "wall_seconds": wall,
        "train_seconds": train_seconds,
        "train_samples_per_s": sum(h["samples_per_s"] * h["train_seconds"] for h in history)
        / train_seconds,
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "amp": str(ctx.amp_dtype).replace("torch.", "") if ctx.amp_dtype else None,
        "processes": ranks.world,
        **({"backend": torch.distributed.get_backend(),
            "mining": str(cfg.trainer.get("mining", "global"))} if ranks.launched else {}),
        "versions": versions(),
    }
    with open(ctx.run_dir / "summary.json", "w") as f:
        json.dump(summary, f, indent=2)
    log.info("done in %.1fs; summary: %s", wall, ctx.run_dir / "summary.json")
    return summary


# ---------------------------------------------------------------- process plumbing


class StopSignals:
    """While entered, SIGINT and SIGTERM set ``signum``, which the training loop reads
    before each step (``received``), so the run stops between steps with its checkpoints
    intact. The previous handlers come back on exit. (Signals can only be caught in the
    main thread; elsewhere, e.g. a launcher's worker thread, nothing is installed.)"""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def received(self) -> int | None:
        return self.signum

    def _note(self, signum: int, _frame: Any) -> None:
        self.signum = signum

    def __enter__(self) -> StopSignals:
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):
                self._old[sig] = signal.signal(sig, self._note)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


def _attach_log_file(run_dir: Path) -> logging.Handler | None:
    """Write dmlrun.log when Hydra's own logging is not doing so (plain ``run()`` calls)."""
    if HydraConfig.initialized():
        return None
    handler = logging.FileHandler(run_dir / "dmlrun.log")
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    logging.getLogger().addHandler(handler)
    if logging.getLogger().level > logging.INFO:
        logging.getLogger().setLevel(logging.INFO)
    return handler
