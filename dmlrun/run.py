"""One run's life: check and build from config, load the data, resume if asked, fit
(validating and checkpointing every epoch), test the best epoch once, write plots and
summary.

``run(cfg, run_dir)`` is what the CLI and the tests call; it returns the summary dict.
What an epoch's batches are made of is the task's business (``task.Task``); checking
and building is ``assemble``'s, grading ``evaluation``'s, the files ``recorder``'s and
``outputs``'s, several processes ``distributed``'s and ``process``'s.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from dmlrun import distributed
from dmlrun.assemble import (
    Context,
    check_config,
    check_run_dir,
    load_data,
    log_start,
    validate_config,
)
from dmlrun.components import (
    build_partial,
    choice,
    has_target,
    resolve_amp,
    resolve_device,
    seed_everything,
)
from dmlrun.data.samplers import Epoch
from dmlrun.distributed import Ranks
from dmlrun.epoch_end import EpochEnd
from dmlrun.errors import ConfigError, Interrupted
from dmlrun.evaluation import Evaluator, Validation, penultimate_features
from dmlrun.metrics import RECALL_KS, embed_split
from dmlrun.outputs import write_plots, write_summary
from dmlrun.process import (
    StopSignals,
    attach_log_file,
    resume_command,
    spawn_ranks,
)
from dmlrun.recorder import Recorder, TrainingState
from dmlrun.report import write_run_report
from dmlrun.task import TaskContext
from dmlrun.train import StepConfig, WeightAverage, fit

log = logging.getLogger("dmlrun")


def run(cfg: DictConfig, run_dir: str | Path) -> dict[str, Any] | None:
    """Train and evaluate one configuration; write checkpoints, metrics, plots and summary
    into ``run_dir``. Raises UserError for problems the user can fix.

    Started by torchrun (or as a SLURM job's tasks), every process calls this; only rank 0
    writes ``run_dir`` and returns the summary, the others return None."""
    t_start = time.perf_counter()
    settings = check_config(cfg)  # every setting, before anything else happens
    ranks = distributed.from_env()
    wanted = distributed.requested(settings.trainer.devices)
    if ranks.world == 1 and wanted is not None and wanted > 1:
        return spawn_ranks(cfg, Path(run_dir), wanted)
    if ranks.world > 1 and wanted not in (None, ranks.world):
        raise ConfigError(f"trainer.devices={wanted} but {ranks.world} processes were "
                          f"started; set trainer.devices=auto or {ranks.world}")
    opened = ranks.launched and not torch.distributed.is_initialized()
    device = distributed.init(ranks, resolve_device(settings.trainer.device))
    level = logging.getLogger("dmlrun").level  # restored at the end
    if not ranks.main:  # rank 0 speaks for the run
        logging.getLogger("dmlrun").setLevel(logging.ERROR)
    run_dir = Path(run_dir)
    handler = None
    try:
        distributed.on_main(lambda: check_run_dir(settings, run_dir), ranks)
        handler = attach_log_file(run_dir) if ranks.main else None
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


def _run(cfg: DictConfig, run_dir: Path, t_start: float, ranks: Ranks, device: torch.device,
         signals: StopSignals) -> dict[str, Any] | None:
    seed_everything(int(cfg.seed))  # before building: losses may draw initial proxies
    parts = validate_config(cfg, ranks.world, device)  # before any data loads
    s = parts.settings
    names = {g: choice(cfg, g) for g in ("dataset", "model", "loss", "miner", "sampler")}
    amp_dtype = resolve_amp(s.trainer.amp, device)
    log_start(cfg, run_dir, ranks, device, parts, amp_dtype, names)
    logger = (build_partial(cfg.logger, f"logger={choice(cfg, 'logger')}", run_dir)
              if has_target(cfg.get("logger")) and ranks.main else None)
    ctx = Context(cfg, run_dir, ranks, device, parts, load_data(cfg, names, parts, device),
                  amp_dtype, names, logger)
    evaluator = Evaluator(parts.model, parts.loss.distance, s.evaluation.knn_k, s.seed,
                          s.trainer.eval_batch_size, amp_dtype,
                          tuple(s.dataset.recall_ks or RECALL_KS), s.evaluation.clustering)
    parts.task.start(TaskContext(
        ctx.data, parts.sampler, parts.model, run_dir, ranks.main,
        lambda split: embed_split(parts.model, split, s.trainer.eval_batch_size, amp_dtype),
        lambda split: penultimate_features(parts.model, split, s.trainer.eval_batch_size,
                                           amp_dtype)))
    decay = s.trainer.ema_decay
    training = TrainingState(parts.model, parts.loss, parts.optimizer, parts.scheduler,
                             torch.Generator().manual_seed(s.seed), parts.task,
                             WeightAverage(parts.model, decay) if decay else None)
    recorder = Recorder(run_dir, s.trainer.monitor, OmegaConf.to_container(cfg, resolve=True),
                        s.trainer.select)
    baselines = evaluator.baselines(ctx.data.test) if s.evaluation.baselines and ranks.main \
        else {}
    start, done = 1, []
    if s.trainer.resume:
        start, done = recorder.restore(cfg, training, device, ranks.main)
        log.info("resuming %s after epoch %d (best epoch %d)", run_dir, start - 1,
                 recorder.best["epoch"])
    validation = Validation(evaluator, ctx.data.val, ranks.main,
                            run_dir / "plots" / "epochs" if s.trainer.epoch_plots else None,
                            device)
    if start == 1:
        validation.untrained_frame()
    history = done + _fit(ctx, training, recorder, validation, signals, start)
    if not ranks.main:
        return None
    return _finish(ctx, history, recorder, evaluator, validation, baselines, t_start)


def _fit(ctx: Context, training: TrainingState, recorder: Recorder, validation: Validation,
         signals: StopSignals, start: int) -> list[dict]:
    """Train epochs ``start..max_epochs``; returns their records."""
    ranks, parts, t = ctx.ranks, ctx.parts, ctx.parts.settings.trainer
    sched = parts.settings.scheduler
    task = parts.task
    step_cfg = StepConfig(ctx.amp_dtype, t.channels_last and ctx.device.type == "cpu",
                          t.log_every, t.progress_bar if ranks.main else False,
                          nonfinite=t.nonfinite, should_stop=signals.received,
                          world=ranks.world, mining=t.mining, warmup_epochs=t.warmup_epochs,
                          anneal=sched.anneal, max_epochs=t.max_epochs,
                          min_lr_ratio=sched.min_lr_ratio or 0.0, ema=training.ema,
                          augment=parts.augment, no_aug_epochs=t.no_aug_epochs,
                          **task.step_options())

    def next_epoch() -> Epoch:
        # every rank draws the same global epoch and keeps its slice of each batch
        return distributed.shard(task.next_epoch(training.sampler_rng, ranks.main), ranks)

    on_epoch_end = EpochEnd(recorder, training, task, ctx.logger, t.early_stopping_patience,
                            ranks)
    model = parts.model
    if ranks.launched:  # averages gradients over ranks during backward
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
    if t.compile:  # the training forward and backward; evaluation stays eager
        log.info("torch.compile(mode=%s) for training; the first steps compile", t.compile)
        model = torch.compile(model, mode=None if t.compile == "default" else t.compile)

    def on_steps(epoch: int, steps: torch.Tensor) -> None:
        rows = recorder.write_steps(epoch, steps)
        if ctx.logger is not None:
            ctx.logger.log_steps(epoch, rows)

    return fit(model, parts.loss, parts.miner, parts.optimizer, parts.scheduler, next_epoch,
               task.train_split(), validation, on_epoch_end, t.max_epochs, step_cfg,
               start_epoch=start, on_steps=on_steps if ranks.main else None)


def _finish(ctx: Context, history: list[dict], recorder: Recorder, evaluator: Evaluator,
            validation: Validation, baselines: dict, t_start: float) -> dict[str, Any]:
    """The test, once, on the best epoch's weights; then plots, summary and report."""
    parts, logger, test_split = ctx.parts, ctx.logger, ctx.data.test
    best_state = recorder.best_state(ctx.device)
    parts.model.load_state_dict(best_state["model"])
    test_emb, test = evaluator(test_split)
    if logger is not None:
        shown = torch.arange(min(len(test_split), logger.projector_points))
        logger.log_embedding(test_emb[shown], test_split.labels[shown], test_split.take(shown))
    t_plots = time.perf_counter()
    extra = write_plots(ctx, history, recorder, validation, test_emb, test, baselines)
    summary = write_summary(ctx, history, recorder, best_state, test_emb, test, baselines,
                            {**extra, "plot_seconds": time.perf_counter() - t_plots},
                            time.perf_counter() - t_start)
    write_run_report(ctx.run_dir)
    if logger is not None:
        logger.log_hparams({**ctx.names, "seed": parts.settings.seed,
                            "lr": ctx.cfg.optimizer.get("lr"),
                            "embedding_dim": summary["embedding_dim"],
                            "epochs": summary["epochs"]},
                           {f"test_{k}": v for k, v in test.items()})
        logger.close()
    return summary
