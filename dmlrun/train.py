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

from dmlrun.data.dataset import Split, images_to_float
from dmlrun.data.samplers import Epoch
from dmlrun.errors import UserError
from dmlrun.losses.base import MetricLoss
from dmlrun.miners.base import Miner

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


def train_epoch(
    model: nn.Module,
    loss_fn: MetricLoss,
    miner: Miner | None,
    optimizer: torch.optim.Optimizer,
    split: Split,
    epoch: Epoch,
    step_cfg: StepConfig,
    desc: str = "train",
) -> dict[str, float]:
    """One pass over the batches of ``epoch``. Returns mean loss and tuple counts per step.

    Running sums stay on the device; the host reads them only every ``log_every``
    steps (progress bar) and once at the end.
    """
    model.train()
    device = split.labels.device
    sums = torch.zeros(4, device=device)  # loss, tuples, active, mined
    show = step_cfg.progress_bar
    bar = tqdm(range(len(epoch)), desc=desc, leave=False, dynamic_ncols=True,
               disable=None if show is None else not show)
    t0 = time.perf_counter()
    for step in bar:
        idx = epoch.indices[step]
        x = images_to_float(split.images[idx])
        if step_cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        labels = split.labels[idx]
        with torch.autocast(device.type, dtype=step_cfg.amp_dtype,
                            enabled=step_cfg.amp_dtype is not None):
            emb = model(x)
        emb = emb.float()
        if miner is not None:
            mined = miner(emb, labels)
            indices, n_mined = mined.indices, mined.mined
        else:
            indices, n_mined = epoch.tuples, torch.zeros((), device=device)
        out = loss_fn.compute(emb, labels, indices)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
        sums += torch.stack([out.loss.detach(), out.tuples, out.active, n_mined]).float()
        if (step + 1) % step_cfg.log_every == 0 or step + 1 == len(epoch):
            loss_so_far, tuples, _, mined = (sums / (step + 1)).tolist()
            if not math.isfinite(loss_so_far):
                raise NonFiniteLoss(
                    f"training loss became non-finite by step {step + 1} of {desc}; lower the "
                    "learning rate (optimizer.lr) or check the data. The last good checkpoint "
                    "is kept."
                )
            bar.set_postfix(loss=f"{loss_so_far:.4g}", tuples=f"{tuples:.0f}",
                            mined=f"{mined:.0f}" if miner is not None else "-")
    seconds = time.perf_counter() - t0
    loss, tuples, active, mined = (sums / len(epoch)).tolist()
    n_images = epoch.indices.numel()
    return {
        "train_loss": loss,
        "tuples_per_step": tuples,
        "active_per_step": active,
        "active_fraction": active / tuples if tuples else 0.0,
        "mined_per_step": mined if miner is not None else tuples,
        "train_seconds": seconds,
        "samples_per_s": n_images / seconds,
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
) -> list[dict]:
    """Train for epochs ``start_epoch..max_epochs``; after each, validate and hand the
    epoch record to ``on_epoch_end`` (which logs and checkpoints, and returns True to stop
    early)."""
    history = []
    for epoch_no in range(start_epoch, max_epochs + 1):
        t0 = time.perf_counter()
        lr = optimizer.param_groups[0]["lr"]
        stats = train_epoch(model, loss_fn, miner, optimizer, split, next_epoch(), step_cfg,
                            desc=f"epoch {epoch_no}/{max_epochs}")
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
