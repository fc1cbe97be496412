"""One run: build from config, train, select on validation, test once, write the folder.

``run(cfg, run_dir)`` is what the CLI and the tests call; it returns the summary dict.
"""

from __future__ import annotations

import contextlib
import json
import logging
import platform
import random
import signal
import time
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from dmlrun import checkpoint, distributed, plots
from dmlrun.components import (
    build,
    build_components,
    build_partial,
    choice,
    has_target,
    resolve_amp,
    resolve_device,
    seed_everything,
)
from dmlrun.config import RUN_MARKERS
from dmlrun.data.dataset import Split
from dmlrun.data.samplers import Epoch
from dmlrun.distributed import Ranks
from dmlrun.errors import RANK_GRACE_S, ConfigError, Interrupted, UserError
from dmlrun.evaluate import METRIC_NAMES, embed, evaluate_embeddings
from dmlrun.semi import SemiSupervision, pick_labeled
from dmlrun.train import STEP_FIELDS, StepConfig, fit

log = logging.getLogger("dmlrun")

COLLAPSE_RATIO = 0.01  # class distances this small a fraction of the start: collapsed
FRAME_POINTS = 2000  # validation points drawn in the per-epoch frames
LOG_FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"  # as Hydra's


SPECIALISATIONS = ("loss_miner", "loss_miner_optimizer")  # config.yaml's optional groups


def specialisations(cfg: DictConfig) -> list[str]:
    """The shipped specialisation files (e.g. loss_miner/triplet_hard.yaml) that Hydra
    applied to this run's combination of groups."""
    found = []
    for group in SPECIALISATIONS:
        name = choice(cfg, group)
        if (resources.files("dmlrun.configs") / group / f"{name}.yaml").is_file():
            found.append(f"{group}/{name}.yaml")
    return found


def _guard_run_dir(run_dir: Path) -> None:
    """Refuse to train into a folder that already holds a run's results."""
    taken = [p for p in RUN_MARKERS if (run_dir / p).exists()]
    if taken:
        raise UserError(
            f"run folder {run_dir} already holds a run ({', '.join(taken)}); refusing to "
            "overwrite it. Choose another folder with hydra.run.dir=<dir>."
        )


received: dict[str, int] = {}


def _catch_signals():
    """SIGINT/SIGTERM set a flag the training loop reads before each step, so the run
    stops between steps with its checkpoints intact. Returns a function that restores the
    previous handlers. (Signals can only be caught in the main thread.)"""
    received.clear()

    def note(signum, _frame):
        received["signal"] = signum

    old = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        # not possible outside the main thread (e.g. a launcher's worker thread)
        with contextlib.suppress(ValueError):
            old[sig] = signal.signal(sig, note)

    def restore() -> None:
        for sig, handler in old.items():
            signal.signal(sig, handler)

    return restore


def _guard_resume(run_dir: Path, resume: Path) -> None:
    """A resumed run continues in its own folder, from last.pt, and only if unfinished."""
    if resume.resolve() != run_dir.resolve():
        raise UserError(f"trainer.resume={resume} but the run folder is {run_dir}; resume "
                        "writes into the folder it continues (leave hydra.run.dir unset)")
    if not (resume / "checkpoints" / "last.pt").is_file():
        raise UserError(f"trainer.resume={resume}: no checkpoints/last.pt there to continue "
                        "from")
    if (resume / "summary.json").exists():
        raise UserError(f"trainer.resume={resume}: that run has finished (summary.json); "
                        "nothing to resume. Start a new run instead.")


CONFIG_KEYS_FREE_ON_RESUME = ("trainer", "paths", "hydra")


def _resume_state(cfg: DictConfig, run_dir: Path, device: torch.device) -> dict[str, Any]:
    """last.pt of the run to continue, after checking the config matches its own."""
    state = checkpoint.load_checkpoint(run_dir / "checkpoints" / "last.pt", map_location=device)
    now = OmegaConf.to_container(cfg, resolve=True)
    then = state["config"]
    differ = sorted(k for k in set(now) | set(then)
                    if k not in CONFIG_KEYS_FREE_ON_RESUME and now.get(k) != then.get(k))
    t_now, t_then = now["trainer"], then["trainer"]
    differ += [f"trainer.{k}" for k in ("max_epochs", "channels_last", "amp")
               if t_now.get(k) != t_then.get(k)]
    if differ:
        raise ConfigError(f"trainer.resume: the config differs from the run's own in "
                          f"{', '.join(differ)}; resume with the same settings")
    return state


def _truncate_jsonl(path: Path, last_epoch: int) -> list[dict]:
    """Keep the records of epochs <= ``last_epoch`` (a kill may leave later ones)."""
    if not path.exists():
        return []
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    rows = [r for r in rows if r["epoch"] <= last_epoch]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(path)
    return rows


def _attach_log_file(run_dir: Path) -> logging.Handler | None:
    """Write dmlrun.log when Hydra's own logging is not doing so (plain ``run()`` calls)."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        return None
    handler = logging.FileHandler(run_dir / "dmlrun.log")
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    logging.getLogger().addHandler(handler)
    if logging.getLogger().level > logging.INFO:
        logging.getLogger().setLevel(logging.INFO)
    return handler


def format_table(rows: dict[str, dict[str, float]]) -> str:
    """Metrics as an aligned text table, one row per model."""
    cols = [c for c in METRIC_NAMES if any(c in r for r in rows.values())]
    head = f"{'':<12}" + "".join(f"{c:>15}" for c in cols)
    lines = [head] + [f"{name:<12}" + "".join(f"{r.get(c, float('nan')):>15.4f}" for c in cols)
                      for name, r in rows.items()]
    return "\n".join(lines)


def versions() -> dict[str, str]:
    import hydra
    import torchvision

    from dmlrun import __version__

    return {"dmlrun": __version__, "torch": torch.__version__,
            "torchvision": torchvision.__version__, "hydra": hydra.__version__,
            "python": platform.python_version()}


def _semi_supervision(cfg: DictConfig, data, sampler, run_dir: Path) -> SemiSupervision | None:
    """With ``dataset.labeled_per_class`` set: hide the other training labels (the chosen
    indices go to labeled_indices.json) and set up the ``semi`` method, if any."""
    per_class = cfg.dataset.get("labeled_per_class")
    method_node = cfg.semi.get("method")
    if per_class is None:
        if method_node is not None:
            raise ConfigError(f"semi={choice(cfg, 'semi')} needs unlabeled images: set "
                              "dataset.labeled_per_class=<n> (e.g. 10)")
        return None
    if getattr(sampler, "yields", None):
        raise ConfigError("semi-supervised runs draw P x K batches: use sampler=pk")
    try:
        labeled = pick_labeled(data.train.labels, int(per_class), int(cfg.seed))
    except ValueError as exc:
        raise ConfigError(f"dataset.labeled_per_class={per_class}: {exc}") from exc
    with open(run_dir / "labeled_indices.json", "w") as f:
        json.dump({"seed": int(cfg.seed), "labeled_per_class": int(per_class),
                   "indices": labeled.tolist()}, f)
    method = build(method_node, f"semi={choice(cfg, 'semi')}") if method_node else None
    log.info("semi-supervised: %d labeled training images, %d unlabeled; method %s",
             len(labeled), len(data.train) - len(labeled), method_node and
             method_node._target_.rsplit(".", 1)[-1])
    s = cfg.semi
    return SemiSupervision(data.train.labels, labeled, data.num_classes, sampler, method,
                           int(s.get("warmup_epochs", 0)), int(s.get("refresh_every", 1)),
                           int(s.get("p", 10)), int(s.get("k", 25)))


def param_groups(model: torch.nn.Module, loss_fn: torch.nn.Module) -> list[dict]:
    """The model's parameters, plus the loss's own (proxies, beta) at ``loss.param_lr``
    when set."""
    groups: list[dict] = [{"params": list(model.parameters())}]
    own = [p for p in loss_fn.parameters() if p.requires_grad]
    if own:
        lr = getattr(loss_fn, "param_lr", None)
        groups.append({"params": own, **({"lr": float(lr)} if lr is not None else {})})
    return groups


def _devices(cfg: DictConfig) -> int | None:
    """``trainer.devices``: None for "auto" (as many processes as were started), else the
    number of processes to train with."""
    devices = cfg.trainer.get("devices", "auto")
    if devices == "auto":
        return None
    if isinstance(devices, bool) or not isinstance(devices, int) or devices < 1:
        raise ConfigError(f"trainer.devices must be auto or a number >= 1, got {devices!r}")
    return devices


def _guard(cfg: DictConfig, run_dir: Path, ranks: Ranks) -> Path:
    """Rank 0 checks the run folder; every rank gets its path, or rank 0's refusal."""
    problem = None
    if ranks.main:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            if cfg.trainer.get("resume"):
                _guard_resume(run_dir, Path(str(cfg.trainer.resume)))
            else:
                _guard_run_dir(run_dir)
        except UserError as exc:
            problem = str(exc)
    run_dir, problem = distributed.broadcast((run_dir, problem))
    if problem:
        raise UserError(problem)
    return run_dir


def _rank_main(config: dict, run_dir: str, choices: dict, errors: Any) -> None:
    """One process of ``trainer.devices=N``: the run with this rank's share; rank 0 logs
    to stdout and reports a user error to the parent."""
    import os
    import sys

    from dmlrun import components

    components.CHOICES.update(choices)
    main = os.environ["RANK"] == "0"
    if main:
        logging.basicConfig(level=logging.INFO, format=LOG_FORMAT, stream=sys.stdout)
    try:
        run(OmegaConf.create(config), run_dir)
    except UserError as exc:
        code = getattr(exc, "exit_code", 2)
        if not main:  # when rank 0 fails alike, its message comes first (see cli.fail)
            time.sleep(RANK_GRACE_S)
        errors.put((code, str(exc) if main else f"(rank {os.environ['RANK']}) {exc}"))
        sys.exit(code)


def _spawn_ranks(cfg: DictConfig, run_dir: Path, n: int) -> dict[str, Any]:
    """``trainer.devices=n`` without torchrun: start n processes on this machine, wait,
    and return rank 0's summary."""
    parts = validate_config(cfg)  # fail here, once, rather than in every process
    distributed.check_divisible(parts.sampler, n, str(cfg.trainer.mining) == "local")
    if resolve_device(str(cfg.trainer.device)).type == "cuda" and \
            n > torch.cuda.device_count():
        raise ConfigError(f"trainer.devices={n} but this machine has "
                          f"{torch.cuda.device_count()} GPU(s); one process per GPU")
    log.info("starting %d processes on this machine", n)
    choices = {g: choice(cfg, g) for g in cfg}
    code, message = distributed.spawn(
        _rank_main, n, OmegaConf.to_container(cfg, resolve=True), str(run_dir), choices)
    if code:
        error = (Interrupted(message, code - 128) if code > 128 and message else
                 UserError(message or f"a training process failed (exit code {code}); see "
                                      "its output above"))
        error.exit_code = code
        raise error
    with open(run_dir / "summary.json") as f:
        return json.load(f)


def run(cfg: DictConfig, run_dir: str | Path) -> dict[str, Any] | None:
    """Train and evaluate one configuration; write checkpoints, metrics, plots and summary
    into ``run_dir``. Raises UserError for problems the user can fix.

    Started by torchrun (or as a SLURM job's tasks), every process calls this; only rank 0
    writes ``run_dir`` and returns the summary, the others return None."""
    t_start = time.perf_counter()
    ranks = distributed.from_env()
    wanted = _devices(cfg)
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
    handler = restore = None
    try:
        run_dir = _guard(cfg, Path(run_dir), ranks)
        handler = _attach_log_file(run_dir) if ranks.main else None
        restore = _catch_signals()
        return _run(cfg, run_dir, t_start, ranks, device)
    except Interrupted as exc:
        done = (run_dir / "checkpoints" / "last.pt").is_file()
        raise Interrupted(
            f"{exc}. " + (f"checkpoints/last.pt holds the last finished epoch; continue with "
                          f"trainer.resume={run_dir}" if done else
                          "No epoch had finished, so there is nothing to resume."),
            exc.exit_code - 128) from None
    finally:
        if restore is not None:
            restore()
        if handler is not None:
            logging.getLogger().removeHandler(handler)
            handler.close()
        logging.getLogger("dmlrun").setLevel(level)
        if opened:
            distributed.close()


def validate_config(cfg: DictConfig) -> Any:
    """Every check that needs no data: ranges, choices, and whether the parts fit. Builds
    and returns the loss, miner and sampler; raises ConfigError with one message."""
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
        (float(tcfg.get("warmup_epochs", 0)) >= 0,
         f"trainer.warmup_epochs must be >= 0, got {tcfg.get('warmup_epochs')}"),
        (int(tcfg.eval_batch_size) >= 1,
         f"trainer.eval_batch_size must be >= 1, got {tcfg.eval_batch_size}"),
        (int(cfg.evaluation.knn_k) >= 1, f"evaluation.knn_k must be >= 1, got "
                                         f"{cfg.evaluation.knn_k}"),
    ]
    per_class = cfg.dataset.get("labeled_per_class")
    if per_class is not None:
        checks.append((int(per_class) >= 2, "dataset.labeled_per_class must be >= 2 (a class "
                                            f"needs a positive pair), got {per_class}"))
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    parts = build_components(cfg)
    n_classes = cfg.dataset.get("num_classes")
    if n_classes is not None and hasattr(parts.sampler, "check"):
        parts.sampler.check(int(n_classes))
    with torch.random.fork_rng(devices=[]):  # a trial build; the run's RNG stays as it was
        model = build(cfg.model, f"model={choice(cfg, 'model')}")
        build_partial(cfg.optimizer, f"optimizer={choice(cfg, 'optimizer')}",
                      model.parameters())
    resolve_device(str(tcfg.device))
    resolve_amp(tcfg.amp, torch.device("cpu"))
    _devices(cfg)
    return parts


def _run(cfg: DictConfig, run_dir: Path, t_start: float, ranks: Ranks,
         device: torch.device) -> dict[str, Any] | None:
    tcfg = cfg.trainer
    seed_everything(int(cfg.seed))  # before building: losses may draw initial proxies
    parts = validate_config(cfg)  # before any data loads
    mining = str(tcfg.get("mining", "global"))
    distributed.check_divisible(parts.sampler, ranks.world, mining == "local")
    if ranks.world > 1 and cfg.dataset.get("labeled_per_class") is not None:
        raise ConfigError("semi-supervised runs (dataset.labeled_per_class) train in one "
                          "process for now; drop torchrun / trainer.devices")
    amp_dtype = resolve_amp(tcfg.amp, device)
    names = {g: choice(cfg, g) for g in ("dataset", "model", "loss", "miner", "sampler")}
    log.info("run folder: %s", run_dir.resolve())
    log.info("device %s, amp %s; %s", device, amp_dtype, " ".join(f"{k}={v}" for k, v in
                                                               names.items()))
    for path in specialisations(cfg):
        log.info("settings for this combination from configs/%s", path)
    if parts.miner is not None:
        log.info("miner %r; optimizer lr %s%s", parts.miner, cfg.optimizer.get("lr"),
                 f", warm-up over {tcfg.warmup_epochs} epoch(s)"
                 if float(tcfg.get("warmup_epochs", 0)) > 0 else "")
    backend = torch.distributed.get_backend() if ranks.launched else None
    if ranks.launched:
        log.info("%d process%s (%s), each with %d of the %d images per batch; mining %s",
                 ranks.world, "es" if ranks.world > 1 else "", backend,
                 parts.sampler.batch_size // ranks.world, parts.sampler.batch_size, mining)

    data = build(cfg.dataset, f"dataset={names['dataset']}", seed=int(cfg.seed)).to(device)
    parts.sampler.check(data.num_classes)
    log.info("data: %d train, %d validation, %d test images, %d classes", len(data.train),
             len(data.val), len(data.test), data.num_classes)

    model = build(cfg.model, f"model={names['model']}").to(device)
    channels_last = bool(tcfg.channels_last) and device.type == "cpu"
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    loss_fn = parts.loss.to(device)
    n_classes = getattr(loss_fn, "num_classes", None)
    if isinstance(n_classes, int) and int(data.train.labels.max()) >= n_classes:
        raise ConfigError(
            f"loss={names['loss']} has {n_classes} class proxies but the labels go up to "
            f"{int(data.train.labels.max())}; set loss.num_classes={data.num_classes}"
        )
    optimizer = build_partial(cfg.optimizer, f"optimizer={choice(cfg, 'optimizer')}",
                              param_groups(model, loss_fn))
    scheduler = build_partial(cfg.scheduler, f"scheduler={choice(cfg, 'scheduler')}",
                              optimizer) if has_target(cfg.scheduler) else None
    distance = parts.loss.distance
    sampler_rng = torch.Generator().manual_seed(int(cfg.seed))
    semi = _semi_supervision(cfg, data, parts.sampler, run_dir)
    train_split = data.train if semi is None else Split(data.train.images, semi.labels)

    ckpt_dir = run_dir / "checkpoints"
    metrics_path = run_dir / "metrics.jsonl"
    steps_path = run_dir / "steps.jsonl"

    def write_steps(epoch: int, steps: torch.Tensor) -> None:
        with open(steps_path, "a") as f:
            for i, row in enumerate(steps.tolist(), 1):
                f.write(json.dumps({"epoch": epoch, "step": i,
                                    **dict(zip(STEP_FIELDS, row, strict=True))}) + "\n")
    monitor = str(tcfg.monitor)
    best = {"epoch": 0, "value": float("-inf")}
    frame_idx = torch.randperm(len(data.val), generator=torch.Generator().manual_seed(0))[
        :FRAME_POINTS].to(device)
    frames: list[tuple[int, torch.Tensor]] = []
    config_dict = OmegaConf.to_container(cfg, resolve=True)

    ecfg = cfg.evaluation
    knn_k, eval_bs = int(ecfg.knn_k), int(tcfg.eval_batch_size)

    def evaluate(images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict]:
        emb = embed(model, images, eval_bs, amp_dtype)
        return emb, evaluate_embeddings(emb, labels, distance, knn_k, int(cfg.seed))

    baselines = {}
    if ecfg.baselines and ranks.main:
        baselines["untrained"] = evaluate(data.test.images, data.test.labels)[1]
        raw = data.test.images.flatten(1).float() / 255.0
        baselines["raw_pixels"] = evaluate_embeddings(raw, data.test.labels, distance, knn_k,
                                                      int(cfg.seed))

    def validate(epoch: int) -> dict[str, float]:
        if not ranks.main:  # evaluation runs once, on rank 0
            return {}
        emb, metrics = evaluate(data.val.images, data.val.labels)
        if tcfg.epoch_plots:
            frames.append((epoch, emb[frame_idx].cpu()))
        return metrics

    patience = tcfg.get("early_stopping_patience")
    first_neg_distance: dict[str, float] = {}

    logger = (build_partial(cfg.logger, f"logger={choice(cfg, 'logger')}", run_dir)
              if has_target(cfg.get("logger")) and ranks.main else None)

    def on_epoch_end(record: dict) -> bool:
        """Checkpoint, log; return True to stop early."""
        if semi is not None and semi.quality:
            record.update(semi.quality)
            log.info("epoch %d: pseudo-labels %.1f%% right on unlabeled images; kept %.1f%% "
                     "of them, %.1f%% right", record["epoch"], 100 * semi.quality[
                         "pseudo_accuracy"], 100 * semi.quality["pseudo_kept_fraction"],
                     100 * semi.quality["pseudo_kept_accuracy"])
        value = record[f"val_{monitor}"]
        state = {
            "epoch": record["epoch"],
            "model": model.state_dict(),
            "loss": loss_fn.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "sampler_rng": sampler_rng.get_state(),
            "torch_rng": torch.get_rng_state(),
            "python_rng": random.getstate(),
            "config": config_dict,
            "metrics": record,
        }
        if value > best["value"]:
            best.update(epoch=record["epoch"], value=value)
            checkpoint.save_checkpoint(ckpt_dir / "best.pt", state)
        checkpoint.save_checkpoint(ckpt_dir / "last.pt", {**state, "best": dict(best)})
        with open(metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if logger is not None:
            logger.log_epoch(record)
        reference = first_neg_distance.setdefault("value", record["first_neg_distance"])
        if record["neg_distance"] < COLLAPSE_RATIO * reference:
            log.warning(
                "epoch %d: the embeddings have collapsed: the mean distance between classes "
                "is %.3g, %.2g%% of the untrained network's %.3g. Lower optimizer.lr, mine "
                "in small, growing pools (miner.pool_k=2 miner.grow=true) or use "
                "miner=semihard.",
                record["epoch"], record["neg_distance"],
                100 * record["neg_distance"] / reference, reference)
        for warning in loss_fn.epoch_warnings(record, reference):
            log.warning("epoch %d: %s", record["epoch"], warning)
        log.info(
            "epoch %d: loss %.4g, %.0f tuples/step (%.0f%% active), val P@1 %.4f, MAP@R %.4f, "
            "%.0f samples/s, %.1fs; d(pos) %.3g, d(neg) %.3g", record["epoch"],
            record["train_loss"], record["tuples_per_step"], 100 * record["active_fraction"],
            record["val_precision_at_1"], record["val_map_at_r"], record["samples_per_s"],
            record["epoch_seconds"], record["pos_distance"], record["neg_distance"])
        if patience is not None and record["epoch"] - best["epoch"] >= int(patience):
            log.info("early stop: no val %s gain for %d epochs", monitor, int(patience))
            return True
        return False

    def on_epoch_end_all(record: dict) -> bool:
        """Rank 0 writes the epoch and decides whether to stop; every rank follows."""
        return distributed.broadcast(on_epoch_end(record) if ranks.main else False)

    nonfinite = str(tcfg.get("nonfinite", "stop"))
    step_cfg = StepConfig(amp_dtype, channels_last, int(tcfg.log_every),
                          tcfg.progress_bar if ranks.main else False,
                          float(cfg.semi.get("unlabeled_weight", 1.0)), nonfinite,
                          lambda: received.get("signal"), ranks.world, mining,
                          float(tcfg.get("warmup_epochs", 0.0)))
    if semi is None:
        def next_epoch() -> Epoch:
            # every rank draws the same global epoch and keeps its slice of each batch
            return distributed.shard(parts.sampler.epoch(data.train.labels, sampler_rng),
                                     ranks)
    else:
        def next_epoch() -> Epoch:
            return semi.next_epoch(lambda: embed(model, data.train.images, eval_bs, amp_dtype),
                                   sampler_rng)
    start_epoch, done = 1, []
    if tcfg.get("resume"):
        if semi is not None:
            raise ConfigError("trainer.resume does not support semi-supervised runs yet")
        state = _resume_state(cfg, run_dir, device)
        model.load_state_dict(state["model"])
        loss_fn.load_state_dict(state.get("loss", {}))
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(state["scheduler"])
        sampler_rng.set_state(state["sampler_rng"])
        torch.set_rng_state(state["torch_rng"])
        random.setstate(state["python_rng"])
        best.update(state["best"])
        start_epoch = int(state["epoch"]) + 1
    if tcfg.get("resume") and ranks.main:
        done = _truncate_jsonl(metrics_path, start_epoch - 1)
        if not done or done[-1]["epoch"] != start_epoch - 1:  # killed before the line
            done.append(state["metrics"])
            with open(metrics_path, "a") as f:
                f.write(json.dumps(state["metrics"]) + "\n")
        _truncate_jsonl(steps_path, start_epoch - 1)
        first_neg_distance["value"] = done[0]["first_neg_distance"]
        log.info("resuming %s after epoch %d (best epoch %d)", run_dir, start_epoch - 1,
                 best["epoch"])
    train_model = model
    if ranks.launched:  # averages gradients over ranks during backward
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    history = done + fit(train_model, loss_fn, parts.miner, optimizer, scheduler, next_epoch,
                         train_split, validate, on_epoch_end_all, int(tcfg.max_epochs),
                         step_cfg, start_epoch=start_epoch,
                         on_steps=write_steps if ranks.main else None)
    if not ranks.main:
        return None

    # Test once, with the model chosen on validation.
    if best["epoch"] == 0:
        raise UserError(
            f"no epoch gave finite validation metrics (the model diverged), so there is no "
            f"best checkpoint to test; lower optimizer.lr. Per-epoch records: {metrics_path}")
    best_state = checkpoint.load_checkpoint(ckpt_dir / "best.pt", map_location=device)
    model.load_state_dict(best_state["model"])
    test_emb, test = evaluate(data.test.images, data.test.labels)
    if logger is not None:
        logger.log_embedding(test_emb, data.test.labels, data.test.images)
        logger.close()
    best_val = {k[4:]: v for k, v in best_state["metrics"].items() if k.startswith("val_")}
    log.info("best epoch %d (val %s %.4f); test P@1 %.4f, MAP@R %.4f", best["epoch"], monitor,
             best["value"], test["precision_at_1"], test["map_at_r"])

    plot_dir = run_dir / "plots"
    rows = {"trained": test, **baselines}
    log.info("test metrics:\n%s", format_table(rows))
    points, how = plots.project_2d(test_emb, str(ecfg.projection), int(cfg.seed))
    plots.scatter(
        points, data.test.labels, plot_dir / "embedding.png",
        f"{data.name} test: loss={names['loss']} miner={names['miner']} "
        f"epoch {best['epoch']} - P@1 {test['precision_at_1']:.3f} MAP@R {test['map_at_r']:.3f}",
        xlabel=how,
    )
    step_rows = [json.loads(x) for x in steps_path.read_text().splitlines() if x.strip()]
    plots.curves(history, plot_dir / "curves.png",
                 ["precision_at_1", "map_at_r", "r_precision", "nmi"], step_rows)
    if any("pseudo_accuracy" in h for h in history):
        plots.pseudo_labels(history, plot_dir / "pseudo_labels.png")
    if frames:
        plots.epoch_frames(frames, data.val.labels[frame_idx], plot_dir / "epochs",
                           f"{data.name} val: loss={names['loss']} miner={names['miner']}")

    wall = time.perf_counter() - t_start
    train_seconds = sum(h["train_seconds"] for h in history)
    summary = {
        "run_dir": str(run_dir.resolve()),
        "choices": names,
        "seed": int(cfg.seed),
        "tag": cfg.get("tag"),
        "embedding_dim": int(test_emb.shape[1]),
        "epochs": len(history),
        "best_epoch": best["epoch"],
        "monitor": monitor,
        "val": best_val,
        "test": test,
        "baselines": baselines,
        "wall_seconds": wall,
        "train_seconds": train_seconds,
        "train_samples_per_s": sum(h["samples_per_s"] * h["train_seconds"] for h in history)
        / train_seconds,
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "amp": str(amp_dtype).replace("torch.", "") if amp_dtype else None,
        "processes": ranks.world,
        **({"backend": backend, "mining": mining} if ranks.launched else {}),
        "versions": versions(),
    }
    with open(run_dir / "summary.json", "w") as f:
        json.dump(summary, f, indent=2)
    log.info("done in %.1fs; summary: %s", wall, run_dir / "summary.json")
    return summary
