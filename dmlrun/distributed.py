"""Multi-process training with torch.distributed: who this process is, and the few
collectives the run needs.

A run with W processes ("ranks") trains on the same global batches as one process: every
rank draws the same epoch (same seed), keeps its contiguous slice of each batch
(``shard``), embeds it, and, with ``trainer.mining=global``, ``gather_with_grad`` puts
the global batch back together in its original order so mining and the loss see exactly
what a single process sees. Every rank then computes the same global loss; the backward
of ``all_gather`` sums each rank's gradient with respect to its slice over ranks (W times
dL/de_r), and DistributedDataParallel's gradient average divides by W again, so the
parameter gradients equal a single process's on the global batch. With
``trainer.mining=local`` each rank mines its own slice only (cheaper, weaker negatives).

Processes come from ``torchrun`` (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT), from a
SLURM job with several tasks (SLURM_* variables, translated with submitit), or from
``trainer.devices=N`` on one machine (``spawn``). Only rank 0 writes the run folder.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dmlrun.data.samplers import Epoch
from dmlrun.errors import EXIT_USER_ERROR, RANK_GRACE_S, ConfigError, Interrupted, UserError

TIMEOUT = timedelta(minutes=30)  # rank 0 evaluates while the others wait


@dataclass(frozen=True)
class Ranks:
    """This process's place in the job: ``rank`` of ``world`` processes, ``local_rank``
    on its machine (which GPU it uses)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    launched: bool = False  # started by torchrun or SLURM: join a process group

    @property
    def main(self) -> bool:
        return self.rank == 0


def _scheduler_to_torch_env() -> None:
    """Inside a submitit job (``hydra/launcher=slurm`` or ``submitit_local``) with several
    tasks (``hydra.launcher.tasks_per_node``), export torch.distributed's variables from
    the job's, with submitit. A bare SLURM step of several tasks is refused: each task
    would train alone."""
    if "RANK" in os.environ:
        return
    if os.environ.get("SUBMITIT_EXECUTOR") in ("slurm", "local"):
        # deliberately here: submitit is optional (the [sweep] extra), needed only in its jobs
        from submitit import JobEnvironment
        from submitit.helpers import TorchDistributedEnvironment

        if JobEnvironment().num_tasks > 1:
            TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        return
    tasks = int(os.environ.get("SLURM_NTASKS", "1"))
    if tasks > 1 and "SLURM_PROCID" in os.environ:
        raise ConfigError(
            f"this SLURM step runs {tasks} tasks but none of torch.distributed's variables "
            "(RANK, WORLD_SIZE, MASTER_ADDR, ...) are set, so each would train alone; start "
            "dmlrun through torchrun (one task per node), or sweep with "
            "hydra/launcher=slurm hydra.launcher.tasks_per_node=<processes>")


def from_env() -> Ranks:
    """The ranks torchrun or SLURM describe in the environment; ``Ranks()`` when alone."""
    _scheduler_to_torch_env()
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return Ranks()
    return Ranks(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]),
                 int(os.environ.get("LOCAL_RANK", "0")), launched=True)


def requested(devices: Any) -> int | None:
    """``trainer.devices``: None for "auto" (as many processes as were started), else the
    number of processes to train with."""
    if devices == "auto":
        return None
    if isinstance(devices, bool) or not isinstance(devices, int) or devices < 1:
        raise ConfigError(f"trainer.devices must be auto or a number >= 1, got {devices!r}")
    return devices


def check_gpus(n: int, device: torch.device) -> None:
    """One process per GPU: refuse more CUDA processes than GPUs."""
    if device.type == "cuda" and n > torch.cuda.device_count():
        raise ConfigError(f"trainer.devices={n} but this machine has "
                          f"{torch.cuda.device_count()} GPU(s); one process per GPU")


def on_main(check: Callable[[], Any], ranks: Ranks) -> Any:
    """Rank 0 runs ``check``; every rank gets its result, or raises rank 0's UserError."""
    value = problem = None
    if ranks.main:
        try:
            value = check()
        except UserError as exc:
            problem = str(exc)
    value, problem = broadcast((value, problem))
    if problem:
        raise UserError(problem)
    return value


def init(ranks: Ranks, device: torch.device) -> torch.device:
    """Join the process group (nccl on CUDA, gloo on the CPU) and return this rank's
    device (``cuda:<local_rank>`` on CUDA). A job of one process started by torchrun
    joins a group of one, so it trains through the same DistributedDataParallel path."""
    if not ranks.launched or (dist.is_available() and dist.is_initialized()):
        return device
    if device.type == "cuda":
        if ranks.local_rank >= torch.cuda.device_count():
            raise ConfigError(
                f"local rank {ranks.local_rank} has no GPU: this machine has "
                f"{torch.cuda.device_count()}; start at most that many processes per node")
        device = torch.device("cuda", ranks.local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=ranks.rank,
                            world_size=ranks.world, timeout=TIMEOUT,
                            **({"device_id": device} if device.type == "cuda" else {}))
    return device


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _child(rank: int, world_size: int, port: int, target: Callable[..., Any],
           args: tuple, errors: Any) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    if "OMP_NUM_THREADS" not in os.environ:  # share the cores, as torchrun does
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // world_size))
    try:
        target(*args, errors)
    except SystemExit as exc:
        exit_now(exc.code if isinstance(exc.code, int) else 1)
    exit_now(0)


def exit_now(code: int) -> None:
    """End a spawned rank with ``code``, skipping the interpreter's teardown: there, after
    a process group was used, a gloo thread can still be joinable when its owner is
    destroyed, and std::terminate turns a finished rank into a SIGABRT (seen in about 1
    of 5 two-rank jobs with torch 2.14 on the CPU). Logs and standard streams are
    flushed first."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def spawn(target: Callable[..., Any], n: int, *args: Any) -> tuple[int, str | None]:
    """Run ``target(*args, errors)`` in ``n`` fresh processes, ranks 0..n-1 of one job on
    this machine; ``errors`` is a queue a rank may put ``(exit_code, message)`` on before it
    exits. Waits for all. When one fails, the others are stopped. Returns (the first
    non-zero exit code or 0, the first message put on the queue). SIGINT and SIGTERM
    received here are passed on, so the ranks stop together between steps."""
    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    port = _free_port()
    procs = [ctx.Process(target=_child, args=(r, n, port, target, args, errors))
             for r in range(n)]

    def forward(signum: int, _frame: Any) -> None:
        for proc in procs:
            if proc.is_alive() and proc.pid is not None:
                os.kill(proc.pid, signum)

    old = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        for proc in procs:
            proc.start()
        code = 0
        while any(proc.is_alive() for proc in procs):
            failed = [proc.exitcode for proc in procs if proc.exitcode]
            if failed and not code:
                code = failed[0]
                for proc in procs:  # the rest would wait for it forever
                    if proc.is_alive():
                        proc.terminate()
            time.sleep(0.1)
        for proc in procs:
            proc.join()
        code = code or next((proc.exitcode for proc in procs if proc.exitcode), 0)
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
    message = None if errors.empty() else errors.get()[1]
    return (code if code >= 0 else 128 - code), message  # killed by signal s: -s


def run_rank(target: Callable[..., Any], args: tuple, errors: Any) -> None:
    """The body of one spawned rank: ``target(*args)``; a UserError goes on the parent's
    ``errors`` queue (rank 0's as it is; another rank's after a grace period, so that when
    rank 0 fails alike its message comes first) and sets the exit code."""
    main = os.environ["RANK"] == "0"
    try:
        target(*args)
    except UserError as exc:
        code = getattr(exc, "exit_code", EXIT_USER_ERROR)
        if not main:
            time.sleep(RANK_GRACE_S)
        errors.put((code, str(exc) if main else f"(rank {os.environ['RANK']}) {exc}"))
        sys.exit(code)


def spawn_run(target: Callable[..., Any], n: int, *args: Any) -> None:
    """``target(*args)`` in ``n`` ranks on this machine (see ``spawn``); a failed rank
    becomes the parent's UserError (Interrupted for a signal) with its exit code."""
    code, message = spawn(run_rank, n, target, args)
    if code:
        error = (Interrupted(message, code - 128) if code > 128 and message else
                 UserError(message or f"a training process failed (exit code {code}); see "
                                      "its output above"))
        error.exit_code = code
        raise error


def close() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def broadcast(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (any picklable value)."""
    if world()[1] == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce(x: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """``x`` reduced over ranks ("sum", "mean", "max" or "min"); ``x`` itself alone."""
    if world()[1] == 1:
        return x
    x = x.clone()
    ops = {"sum": dist.ReduceOp.SUM, "mean": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX,
           "min": dist.ReduceOp.MIN}
    dist.all_reduce(x, op=ops[op])
    return x / world()[1] if op == "mean" else x


def shard(epoch: Epoch, ranks: Ranks) -> Epoch:
    """This rank's contiguous slice of every batch of ``epoch``. P x K batches are laid out
    class by class, so with P divisible by the world size each rank gets P/W whole classes
    (K images each), and the slices, gathered in rank order, are the original batch."""
    if ranks.world == 1:
        return epoch

    def cut(idx: torch.Tensor) -> torch.Tensor:
        per = idx.shape[1] // ranks.world
        return idx[:, ranks.rank * per:(ranks.rank + 1) * per]

    return replace(epoch, indices=cut(epoch.indices),
                   extra=None if epoch.extra is None else cut(epoch.extra),
                   views=None if epoch.views is None else cut(epoch.views))


def check_divisible(sampler: Any, world_size: int, local_mining: bool) -> None:
    """The global batch must split evenly into whole classes per rank."""
    if world_size == 1:
        return
    p = getattr(sampler, "p", None)
    if p is not None and p % world_size:
        raise ConfigError(
            f"sampler.p={p} classes per batch cannot be shared evenly by {world_size} "
            f"processes; use a multiple of {world_size} (e.g. sampler.p="
            f"{max(world_size, p - p % world_size)})")
    if p is None and sampler.batch_size % world_size:
        raise ConfigError(f"the batch of {sampler.batch_size} cannot be shared evenly by "
                          f"{world_size} processes")
    if local_mining and getattr(sampler, "yields", None):
        raise ConfigError("trainer.mining=local needs online mining (sampler=pk): the "
                          f"offline sampler's fixed {sampler.yields} span the whole batch")
    if local_mining and p is not None and p // world_size < 2:
        raise ConfigError(
            f"trainer.mining=local with sampler.p={p} over {world_size} processes leaves "
            f"{p // world_size} class per process, so no negatives; use mining=global or "
            f"sampler.p>={2 * world_size}")


class _AllGather(torch.autograd.Function):
    """Concatenate equal-shaped (n, ...) slices of all ranks; the backward hands each rank
    the gradient of its own slice summed over ranks (every rank's loss used it)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        ctx.rows = x.shape[0]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)  # gloo has no reduce-scatter; the slice is cut afterwards
        start = dist.get_rank() * ctx.rows
        return grad[start:start + ctx.rows]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """(n, ...) on every rank -> (world * n, ...) in rank order; gradients flow back to
    each rank's own slice. Every rank holds the same n (``shard`` cuts equal slices)."""
    return x if world()[1] == 1 else _AllGather.apply(x)


def gather_labels(y: torch.Tensor) -> torch.Tensor:
    """(n,) labels from every rank, no gradient, in rank order."""
    _, size = world()
    if size == 1:
        return y
    out = [torch.empty_like(y) for _ in range(size)]
    dist.all_gather(out, y)
    return torch.cat(out)
