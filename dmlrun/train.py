"""The training loop: plain PyTorch, one function per epoch, one to fit them all."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm

from dmlrun import distributed
from dmlrun.data.dataset import Split, images_to_float
from dmlrun.data.samplers import Epoch
from dmlrun.errors import Interrupted, UserError
from dmlrun.losses.base import MetricLoss
from dmlrun.miners.base import Miner
from dmlrun.tuples import label_masks

log = logging.getLogger(__name__)


class NonFiniteLoss(UserError):
    """The loss became NaN or infinite."""


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


def _extra_loss(model: nn.Module, loss_fn: MetricLoss, miner: Miner | None, split: Split,
                idx: torch.Tensor, step_cfg: StepConfig) -> torch.Tensor:
    """The loss on a second batch of the step (``Epoch.extra``), mined the same way."""
    x = images_to_float(split.images[idx])
    if step_cfg.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    labels = split.labels[idx]
    with torch.autocast(x.device.type, dtype=step_cfg.amp_dtype,
                        enabled=step_cfg.amp_dtype is not None):
        emb = model(x)
    emb, labels = _global_batch(emb.float(), labels, step_cfg)
    indices = miner(emb, labels).indices if miner is not None else None
    return loss_fn.compute(emb, labels, indices).loss


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
    zero_streak = torch.zeros((), device=device, dtype=torch.long)
    warned = False
    show = step_cfg.progress_bar
    bar = tqdm(range(len(epoch)), desc=desc, leave=False, dynamic_ncols=True,
               disable=None if show is None else not show)
    t0 = time.perf_counter()
    applied = torch.ones(len(epoch), dtype=torch.bool, device=device)
    scheduled = [g["lr"] for g in optimizer.param_groups]
    for step in bar:
        if signum := _stop_signal(step_cfg, step, device):
            raise Interrupted(f"stopped by signal {signum} at step {step + 1} of {desc}",
                              signum)
        idx = epoch.indices[step]
        x = images_to_float(split.images[idx])
        if step_cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        labels = split.labels[idx]
        with torch.autocast(device.type, dtype=step_cfg.amp_dtype,
                            enabled=step_cfg.amp_dtype is not None):
            emb = model(x)
        emb, labels = _global_batch(emb.float(), labels, step_cfg)
        if miner is not None:
            mined = miner(emb, labels)
            indices, n_mined = mined.indices, mined.mined
            zero_streak = torch.where(n_mined == 0, zero_streak + 1, 0)
        else:
            indices, n_mined = epoch.tuples, torch.zeros((), device=device)
        out = loss_fn.compute(emb, labels, indices)
        total = out.loss
        if epoch.extra is not None:
            total = total + step_cfg.extra_weight * _extra_loss(
                model, loss_fn, miner, split, epoch.extra[step], step_cfg)
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        if step_cfg.world > 1:  # DDP averages the model's gradients; these are the loss's
            for p in loss_fn.parameters():
                if p.requires_grad:  # every rank joins, with or without a gradient
                    g = p.grad if p.grad is not None else torch.zeros_like(p)
                    p.grad = distributed.all_reduce(g, "mean")
        if step_cfg.nonfinite == "skip" and not _finite_step(total, model, loss_fn):
            applied[step] = False
            log.warning("%s step %d: non-finite loss or gradient; step skipped", desc,
                        step + 1)
            optimizer.zero_grad(set_to_none=True)
            continue
        if step_cfg.warmup_epochs > 0:
            warm = warmup_factor(step_cfg.warmup_epochs, epoch_no, step, len(epoch))
            for group, lr in zip(optimizer.param_groups, scheduled, strict=True):
                group["lr"] = lr * warm
        optimizer.step()
        per_tuple = out.per_tuple if out.per_tuple is not None else out.loss.detach()
        steps[step] = torch.cat([torch.stack([out.loss.detach(), out.tuples, out.active,
                                              n_mined]).float(),
                                 batch_diagnostics(loss_fn, emb.detach(), labels, indices),
                                 per_tuple.float().reshape(1)])
        if (step + 1) % step_cfg.log_every == 0 or step + 1 == len(epoch):
            window = steps[: step + 1][applied[: step + 1]]
            means = window.mean(0)
            if step_cfg.per_rank:
                means = distributed.all_reduce(means, "mean")
            loss_so_far, tuples, _, n, pos_d, neg_d, inverted, _ = means.tolist()
            if not math.isfinite(loss_so_far):
                raise NonFiniteLoss(
                    f"training loss became non-finite by step {step + 1} of {desc}; lower the "
                    "learning rate (optimizer.lr) or check the data. The last good checkpoint "
                    "is kept."
                )
            streak = int(zero_streak)
            if streak >= NO_MINING_STEPS and not warned:
                warned = True
                log.warning(
                    "%s: the miner has found no tuples for %d steps, so the loss is zero and "
                    "nothing trains; loosen the miner (a larger margin, another miner) or use "
                    "miner=none", desc, streak)
            bar.set_postfix(loss=f"{loss_so_far:.4g}", tuples=f"{tuples:.0f}",
                            mined=f"{n:.0f}" if miner is not None else "-",
                            d_pos=f"{pos_d:.3g}", d_neg=f"{neg_d:.3g}",
                            inverted=f"{inverted:.2f}")
    for group, lr in zip(optimizer.param_groups, scheduled, strict=True):
        group["lr"] = lr  # the epoch scheduler continues from its own rate
    seconds = time.perf_counter() - t0
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
        "mined_per_step": mined if miner is not None else tuples,
        "no_mining_steps": int((column(steps, "mined") == 0).sum()) if miner is not None else 0,
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
        stats = train_epoch(model, loss_fn, miner, optimizer, split, next_epoch(), step_cfg,
                            desc=f"epoch {epoch_no}/{max_epochs}", epoch_no=epoch_no)
        steps = stats.pop("steps")
        if on_steps is not None:
            on_steps(epoch_no, steps)
        if scheduler is not None:
            scheduler.step()
        val = validate(epoch_no)
        record = {"epoch": epoch_no, "lr": lr, **stats,
                  **{f"val_{k}": v for k, v in val.items()},
                  "epoch_seconds": time.perf_counter() - t0}
        history.append(record)
        if on_epoch_end(record):
            break
    return history
