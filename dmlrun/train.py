"""The training loop: plain PyTorch, one function per epoch, one to fit them all."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import nn
from tqdm import tqdm

from dmlrun import distributed
from dmlrun.data.dataset import Split, images_to_float
from dmlrun.data.samplers import Epoch
from dmlrun.errors import Interrupted, UserError
from dmlrun.losses.base import LossOutput, MetricLoss
from dmlrun.losses.relational import relational_distance_loss
from dmlrun.miners.base import Miner
from dmlrun.tuples import label_masks

log = logging.getLogger(__name__)


class NonFiniteLoss(UserError):
    """The loss became NaN or infinite."""


@dataclass
class ViewsTerm:
    """A loss on two augmented views of the same images (each view's only positive is the
    other; e.g. NT-Xent), weighted by ``weight``: a training signal that needs no
    label."""

    loss: MetricLoss
    augment: Callable[[torch.Tensor], torch.Tensor]
    weight: float = 1.0


@dataclass
class DistillTerm:
    """Relational distillation on the ``Epoch.extra`` batches: the student's distances
    among a batch's images follow those of ``targets`` (N, T), fixed embeddings of every
    training image (e.g. trained teachers' side by side), by
    ``losses.relational.relational_distance_loss``, weighted by ``weight``."""

    targets: torch.Tensor
    weight: float = 1.0

    def __call__(self, emb: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Weighted loss of (B, D) student embeddings of the training images ``ids`` (B,)."""
        return self.weight * relational_distance_loss(emb, self.targets[ids])


class WeightAverage:
    """Exponential moving average of a model's parameters and floating buffers (Polyak
    averaging; "EMA" in timm and torch.optim.swa_utils), updated after every applied step
    with decay ``min(decay, (1 + n) / (10 + n))`` at update ``n`` (so the first updates
    follow the model). ``swap`` exchanges the model's weights and the average in place:
    the run swaps before validation and checkpointing, so validation, best.pt and the test
    see the averaged weights, and swaps back to train on."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"the averaging decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.tensors = [t for t in (*model.parameters(), *model.buffers())
                        if t.is_floating_point()]
        self.average = [t.detach().clone() for t in self.tensors]
        self.updates = 0

    @torch.no_grad()
    def update(self) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(self.average, [t.detach() for t in self.tensors], 1.0 - decay)

    @torch.no_grad()
    def swap(self) -> None:
        for t, a in zip(self.tensors, self.average, strict=True):
            held = t.detach().clone()
            t.copy_(a)
            a.copy_(held)

    def state_dict(self) -> dict:
        return {"average": [a.clone() for a in self.average], "updates": self.updates}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        for a, saved in zip(self.average, state["average"], strict=True):
            a.copy_(saved)
        self.updates = int(state["updates"])


@dataclass
class StepConfig:
    """How a training step runs: autocast dtype (None = fp32), channels-last input."""

    amp_dtype: torch.dtype | None = None
    channels_last: bool = False
    log_every: int = 20
    progress_bar: bool | None = None  # None: only on a terminal
    extra_weight: float = 1.0  # weight of the loss on ``Epoch.extra`` batches
    # "stop": a non-finite loss ends the run (checked every log_every steps); "skip": every
    # step is checked, and a step with a non-finite loss or gradient is not applied.
    nonfinite: str = "stop"
    # Called before every step; a signal number ends the epoch with ``Interrupted``.
    should_stop: Callable[[], int | None] | None = None
    # Processes training together; with several, "global" mining gathers the embeddings
    # of all ranks (the single-process batch), "local" mines each rank's slice alone.
    world: int = 1
    mining: str = "global"
    # Linear learning-rate warm-up over the first ``warmup_epochs`` epochs (fractions
    # allowed), per step, on top of the epoch scheduler's rate; 0 = none.
    warmup_epochs: float = 0.0
    # Per-step decay of the rate over the run's ``max_epochs`` (after the warm-up):
    # "cosine" falls from the optimizer's rate to ``min_lr_ratio`` of it by the last step
    # (scheduler=cosine_steps); None: the epoch scheduler alone sets the rate.
    anneal: str | None = None
    max_epochs: int = 1
    min_lr_ratio: float = 0.0
    # Averaged weights updated after every applied step (trainer.ema_decay), or None.
    ema: WeightAverage | None = None
    # Applied to every float training batch on the device (e.g. augment.RandomAffine),
    # except in the last ``no_aug_epochs`` epochs of the run, which train on the images as
    # they are, as the model will see them at test time.
    augment: Callable[[torch.Tensor], torch.Tensor] | None = None
    no_aug_epochs: int = 0
    # The loss on ``Epoch.views`` batches.
    views: ViewsTerm | None = None
    # Relational distillation on ``Epoch.extra`` batches.
    distill: DistillTerm | None = None

    @property
    def gathers(self) -> bool:
        """Mining sees every rank's embeddings (the global batch)."""
        return self.world > 1 and self.mining == "global"

    @property
    def per_rank(self) -> bool:
        """Each rank mines its own slice, so step values differ by rank (averaged)."""
        return self.world > 1 and self.mining == "local"


STEP_FIELDS = ("loss", "tuples", "active", "mined", "pos_distance", "neg_distance",
               "inverted", "tuple_loss")


def column(steps: torch.Tensor, field: str) -> torch.Tensor:
    """One field (a name in ``STEP_FIELDS``) of a (steps, len(STEP_FIELDS)) tensor."""
    return steps[:, STEP_FIELDS.index(field)]


NO_MINING_STEPS = 50  # consecutive steps with nothing mined before a warning


def batch_diagnostics(
    loss_fn: MetricLoss, emb: torch.Tensor, labels: torch.Tensor,
    indices: tuple[torch.Tensor, ...] | None,
) -> torch.Tensor:
    """(3,) tensor: mean positive-pair and negative-pair distance of a (B, D) batch, and
    the inverted fraction: of the step's triplets, those whose negative is closer than
    the positive (batch-hard: anchors whose hardest positive is farther than their
    hardest negative). Without triplets, the same over each anchor's hardest pairs in
    the batch. When most triplets are inverted, the triplet hinge can fall to exactly
    its margin by shrinking every embedding to one point: the collapse of batch-hard."""
    with torch.no_grad():
        d = loss_fn.distance.pairwise(emb, emb)
        pos, neg = label_masks(labels)
        means = [(d * pos).sum() / pos.sum().clamp_min(1),
                 (d * neg).sum() / neg.sum().clamp_min(1)]
        if indices is not None and len(indices) == 3:
            a, p, n = indices
            inverted = (d[a, n] < d[a, p]).float().sum() / max(len(a), 1)
        else:
            anchors = pos.any(1) & neg.any(1)
            far_pos = d.masked_fill(~pos, float("-inf")).amax(1)
            near_neg = d.masked_fill(~neg, float("inf")).amin(1)
            inverted = ((far_pos > near_neg) & anchors).float().sum() / anchors.sum().clamp_min(1)
        return torch.stack([*means, inverted])


def warmup_factor(warmup_epochs: float, epoch_no: int, step: int, steps: int) -> float:
    """Learning-rate factor of step ``step`` (0-based) of epoch ``epoch_no`` (1-based):
    rises linearly from 1 / (warm-up steps) to 1 over the first ``warmup_epochs``."""
    if warmup_epochs <= 0:
        return 1.0
    return min(1.0, (epoch_no - 1 + (step + 1) / steps) / warmup_epochs)


def lr_factor(step_cfg: StepConfig, epoch_no: int, step: int, steps: int) -> float:
    """Factor on the epoch scheduler's rate at step ``step`` (0-based) of epoch
    ``epoch_no`` (1-based): the linear warm-up, then (``anneal="cosine"``) a cosine from 1
    at the end of the warm-up towards ``min_lr_ratio``, reached after the run's last step."""
    warm = warmup_factor(step_cfg.warmup_epochs, epoch_no, step, steps)
    if step_cfg.anneal is None:
        return warm
    done = epoch_no - 1 + step / steps  # epochs completed before this step
    start = min(step_cfg.warmup_epochs, step_cfg.max_epochs)
    t = max(0.0, done - start) / max(step_cfg.max_epochs - start, 1e-12)
    low = step_cfg.min_lr_ratio
    return warm * (low + (1 - low) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


def _stop_signal(step_cfg: StepConfig, step: int, device: torch.device) -> int:
    """The signal that asks the run to stop, or 0. With several processes, every rank
    asks its peers at the same steps (every ``log_every``), so all stop together."""
    if step_cfg.should_stop is None:
        return 0
    if step_cfg.world == 1:
        return step_cfg.should_stop() or 0
    if step % step_cfg.log_every:
        return 0
    mine = torch.tensor(step_cfg.should_stop() or 0, device=device)
    return int(distributed.all_reduce(mine, "max"))


def _global_batch(emb: torch.Tensor, labels: torch.Tensor, step_cfg: StepConfig
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Every rank's embeddings and labels, in batch order, when mining globally."""
    if not step_cfg.gathers:
        return emb, labels
    return distributed.gather_with_grad(emb), distributed.gather_labels(labels)


def _finite_step(loss: torch.Tensor, *modules: nn.Module) -> bool:
    """True when the loss and every gradient are finite (one host sync)."""
    grads = [p.grad for m in modules for p in m.parameters() if p.grad is not None]
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    ok = (torch.isfinite(loss) & torch.isfinite(norm)).float()
    return bool(distributed.all_reduce(ok, "min"))  # every rank skips the same steps


@dataclass
class BatchResult:
    """One batch of a step: the loss's output, the (global) embeddings and labels it saw,
    the mined indices (None: every tuple of the batch) and the number mined (without a
    miner, the number of tuples the loss was given)."""

    out: LossOutput
    emb: torch.Tensor
    labels: torch.Tensor
    indices: tuple[torch.Tensor, ...] | None
    mined: torch.Tensor


def batch_loss(model: nn.Module, loss_fn: MetricLoss, miner: Miner | None,
               images: torch.Tensor, labels: torch.Tensor,
               tuples: tuple[torch.Tensor, ...] | None, step_cfg: StepConfig) -> BatchResult:
    """Embed (B, C, H, W) uint8 ``images`` with (B,) ``labels``, mine (or take the
    sampler's ``tuples``) and compute the loss. With global mining the batch is every
    rank's."""
    x = images_to_float(images)
    if step_cfg.augment is not None:
        x = step_cfg.augment(x)
    if step_cfg.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.autocast(x.device.type, dtype=step_cfg.amp_dtype,
                        enabled=step_cfg.amp_dtype is not None):
        emb = model(x)
    emb, labels = _global_batch(emb.float(), labels, step_cfg)
    mined = miner(emb, labels) if miner is not None else None
    indices = mined.indices if mined is not None else tuples
    out = loss_fn.compute(emb, labels, indices)
    # without a miner, "mined" counts the tuples the loss was given (all of the batch's)
    return BatchResult(out, emb, labels, indices, mined.mined if mined is not None else out.tuples)


def views_loss(model: nn.Module, images: torch.Tensor, ids: torch.Tensor,
               step_cfg: StepConfig) -> torch.Tensor:
    """``step_cfg.views``'s weighted loss on (U, C, H, W) uint8 ``images``: each is embedded
    in two views drawn by the term's augmentation, labelled by its (U,) dataset ``ids``
    so the two views of an image are positives and every other image a negative."""
    term = step_cfg.views
    out = batch_loss(model, term.loss, None, torch.cat([images, images]),
                     torch.cat([ids, ids]), None, replace(step_cfg, augment=term.augment)).out
    return term.weight * out.loss


def _all_reduce_loss_grads(loss_fn: MetricLoss) -> None:
    """DDP averages the model's gradients; the loss's own parameters are averaged here.
    Every rank joins, with or without a gradient."""
    for p in loss_fn.parameters():
        if p.requires_grad:
            g = p.grad if p.grad is not None else torch.zeros_like(p)
            p.grad = distributed.all_reduce(g, "mean")


def _step_row(loss_fn: MetricLoss, batch: BatchResult) -> torch.Tensor:
    """(len(STEP_FIELDS),) values of one step, on the device."""
    out = batch.out
    per_tuple = out.per_tuple if out.per_tuple is not None else out.loss.detach()
    return torch.cat([torch.stack([out.loss.detach(), out.tuples, out.active,
                                   batch.mined]).float(),
                      batch_diagnostics(loss_fn, batch.emb.detach(), batch.labels,
                                        batch.indices),
                      per_tuple.float().reshape(1)])


class _Progress:
    """Every ``log_every`` steps: the host reads the running means, refuses a non-finite
    loss, warns once when the miner has found nothing for a while, updates the bar."""

    def __init__(self, steps: int, desc: str, step_cfg: StepConfig, mining: bool) -> None:
        self.desc, self.cfg, self.mining, self.warned = desc, step_cfg, mining, False
        show = step_cfg.progress_bar
        self.bar = tqdm(range(steps), desc=desc, leave=False, dynamic_ncols=True,
                        disable=None if show is None else not show)

    def update(self, step: int, window: torch.Tensor, zero_streak: torch.Tensor) -> None:
        means = window.mean(0)
        if self.cfg.per_rank:
            means = distributed.all_reduce(means, "mean")
        loss, tuples, _, n, pos_d, neg_d, inverted, _ = means.tolist()
        if not math.isfinite(loss):
            raise NonFiniteLoss(
                f"training loss became non-finite by step {step + 1} of {self.desc}; lower "
                "the learning rate (optimizer.lr) or check the data. The last good checkpoint "
                "is kept.")
        streak = int(zero_streak)
        if streak >= NO_MINING_STEPS and not self.warned:
            self.warned = True
            log.warning(
                "%s: the miner has found no tuples for %d steps, so the loss is zero and "
                "nothing trains; loosen the miner (a larger margin, another miner) or use "
                "miner=none", self.desc, streak)
        self.bar.set_postfix(loss=f"{loss:.4g}", tuples=f"{tuples:.0f}",
                             mined=f"{n:.0f}" if self.mining else "-", d_pos=f"{pos_d:.3g}",
                             d_neg=f"{neg_d:.3g}", inverted=f"{inverted:.2f}")


def train_epoch(
    model: nn.Module,
    loss_fn: MetricLoss,
    miner: Miner | None,
    optimizer: torch.optim.Optimizer,
    split: Split,
    epoch: Epoch,
    step_cfg: StepConfig,
    desc: str = "train",
    epoch_no: int = 1,
) -> dict:
    """One pass over the batches of ``epoch``. Returns per-step means (loss, tuples, mining
    diagnostics) and, under ``"steps"``, a (steps, len(STEP_FIELDS)) tensor of the per-step
    values (``STEP_FIELDS``).

    Per-step values stay on the device; the host reads them only every ``log_every``
    steps (progress bar, no-mining check) and once at the end.
    """
    model.train()
    device = split.labels.device
    steps = torch.zeros(len(epoch), len(STEP_FIELDS), device=device)
    applied = torch.ones(len(epoch), dtype=torch.bool, device=device)
    zero_streak = torch.zeros((), device=device, dtype=torch.long)
    progress = _Progress(len(epoch), desc, step_cfg, miner is not None)
    t0 = time.perf_counter()
    scheduled = [g["lr"] for g in optimizer.param_groups]
    # images come batch by batch (from memory, or decoded ahead from files)
    extras = split.batches(epoch.extra) if epoch.extra is not None else None
    views = split.batches(epoch.views) if epoch.views is not None else None
    for step, images in zip(progress.bar, split.batches(epoch.indices), strict=True):
        if signum := _stop_signal(step_cfg, step, device):
            raise Interrupted(f"stopped by signal {signum} at step {step + 1} of {desc}",
                              signum)
        batch = batch_loss(model, loss_fn, miner, images, split.labels[epoch.indices[step]],
                           epoch.tuples, step_cfg)
        if miner is not None:
            zero_streak = torch.where(batch.mined == 0, zero_streak + 1, 0)
        total = batch.out.loss
        if extras is not None:
            ids = epoch.extra[step]
            extra = batch_loss(model, loss_fn, miner, next(extras), split.labels[ids], None,
                               step_cfg)
            total = total + step_cfg.extra_weight * extra.out.loss
            if step_cfg.distill is not None:  # extra.emb is the global batch when gathered
                ids = distributed.gather_labels(ids) if step_cfg.gathers else ids
                total = total + step_cfg.distill(extra.emb, ids)
        if views is not None:
            total = total + views_loss(model, next(views), epoch.views[step], step_cfg)
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        if step_cfg.world > 1:
            _all_reduce_loss_grads(loss_fn)
        if step_cfg.nonfinite == "skip" and not _finite_step(total, model, loss_fn):
            applied[step] = False
            log.warning("%s step %d: non-finite loss or gradient; step skipped", desc,
                        step + 1)
            optimizer.zero_grad(set_to_none=True)
            continue
        warm = lr_factor(step_cfg, epoch_no, step, len(epoch))
        for group, lr in zip(optimizer.param_groups, scheduled, strict=True):
            group["lr"] = lr * warm
        optimizer.step()
        if step_cfg.ema is not None:
            step_cfg.ema.update()
        steps[step] = _step_row(loss_fn, batch)
        if (step + 1) % step_cfg.log_every == 0 or step + 1 == len(epoch):
            progress.update(step, steps[: step + 1][applied[: step + 1]], zero_streak)
    for group, lr in zip(optimizer.param_groups, scheduled, strict=True):
        group["lr"] = lr  # the epoch scheduler continues from its own rate
    n = len(epoch)  # the rates the first and last steps applied (warm-up, per-step decay)
    applied_lr = {"lr_first": scheduled[0] * lr_factor(step_cfg, epoch_no, 0, n),
                  "lr_last": scheduled[0] * lr_factor(step_cfg, epoch_no, n - 1, n)}
    return applied_lr | _epoch_stats(steps, applied, time.perf_counter() - t0, epoch, step_cfg,
                                     desc, miner is not None)


def _epoch_stats(steps: torch.Tensor, applied: torch.Tensor, seconds: float, epoch: Epoch,
                 step_cfg: StepConfig, desc: str, mining: bool) -> dict:
    """The epoch's record fields from its per-step values (skipped steps left out)."""
    if step_cfg.per_rank:
        steps = distributed.all_reduce(steps, "mean")  # rank means; "applied" agrees (DDP)
    applied = applied.cpu()
    steps = steps.cpu()[applied]
    if len(steps) == 0:
        raise NonFiniteLoss(f"every step of {desc} had a non-finite loss or gradient and was "
                            "skipped; lower the learning rate (optimizer.lr) or check the data")
    loss, tuples, active, mined, pos_d, neg_d, inverted, tuple_loss = steps.mean(0).tolist()
    n_images = epoch.indices.numel() * step_cfg.world
    return {
        "train_loss": loss,
        "train_tuple_loss": tuple_loss,
        "tuples_per_step": tuples,
        "active_per_step": active,
        "active_fraction": active / tuples if tuples else 0.0,
        "mined_per_step": mined,
        "no_mining_steps": int((column(steps, "mined") == 0).sum()) if mining else 0,
        "pos_distance": pos_d,
        "neg_distance": neg_d,
        "inverted_fraction": inverted,
        "first_neg_distance": float(column(steps, "neg_distance")[0]),
        "skipped_steps": int((~applied).sum()),
        "train_seconds": seconds,
        "samples_per_s": n_images / seconds,
        "steps": steps,
    }


def fit(
    model: nn.Module,
    loss_fn: MetricLoss,
    miner: Miner | None,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    next_epoch: Callable[[], Epoch],
    split: Split,
    validate: Callable[[int], dict[str, float]],
    on_epoch_end: Callable[[dict], bool],
    max_epochs: int,
    step_cfg: StepConfig,
    start_epoch: int = 1,
    on_steps: Callable[[int, torch.Tensor], None] | None = None,
) -> list[dict]:
    """Train for epochs ``start_epoch..max_epochs``; after each, validate and hand the
    epoch record to ``on_epoch_end`` (which logs and checkpoints, and returns True to stop
    early). ``on_steps(epoch, steps)`` receives the per-step values (``STEP_FIELDS``)."""
    history = []
    for epoch_no in range(start_epoch, max_epochs + 1):
        t0 = time.perf_counter()
        lr = optimizer.param_groups[0]["lr"]
        epoch_cfg = step_cfg
        if epoch_no > max_epochs - step_cfg.no_aug_epochs:
            epoch_cfg = replace(step_cfg, augment=None)
        stats = train_epoch(model, loss_fn, miner, optimizer, split, next_epoch(), epoch_cfg,
                            desc=f"epoch {epoch_no}/{max_epochs}", epoch_no=epoch_no)
        steps = stats.pop("steps")
        if on_steps is not None:
            on_steps(epoch_no, steps)
        if scheduler is not None:
            scheduler.step()
        if step_cfg.ema is not None:
            step_cfg.ema.swap()  # validate and checkpoint the averaged weights
        val = validate(epoch_no)
        record = {"epoch": epoch_no, "lr": lr, **stats,
                  **{f"val_{k}": v for k, v in val.items()},
                  "epoch_seconds": time.perf_counter() - t0}
        history.append(record)
        stop = on_epoch_end(record)
        if step_cfg.ema is not None:
            step_cfg.ema.swap()  # train on from the model's own weights
        if stop:
            break
    return history
