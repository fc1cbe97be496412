"""Cross-rank pieces for torch.distributed training (groundwork for multi-process runs).

``gather_with_grad`` concatenates every rank's (B_r, D) embeddings into the global batch,
keeping the gradient path to the local slice: mining and the loss then see the whole
batch, as in a single process. Every rank computes the same global loss; the backward of
``all_gather`` sums each rank's gradient with respect to its slice over ranks (N times
dL/de_r), and DistributedDataParallel's gradient average divides by N again, so the
parameter gradients equal a single process's on the global batch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """(B_r, ...) on every rank -> (sum of B_r, ...) in rank order; gradients flow back to
    each rank's own slice. Ranks may hold different B_r."""
    rank, size = world()
    if size == 1:
        return x
    from torch.distributed.nn.functional import all_gather

    sizes = gather_sizes(x.shape[0], x.device)
    if len(set(sizes)) == 1:
        return torch.cat(all_gather(x), dim=0)
    pad = max(sizes) - x.shape[0]  # all_gather needs equal shapes
    padded = torch.cat([x, x.new_zeros(pad, *x.shape[1:])]) if pad else x
    parts = all_gather(padded)
    return torch.cat([p[:n] for p, n in zip(parts, sizes, strict=True)], dim=0)


def gather_sizes(n: int, device: torch.device) -> list[int]:
    """Every rank's local batch size."""
    _, size = world()
    mine = torch.tensor([n], device=device)
    out = [torch.zeros_like(mine) for _ in range(size)]
    dist.all_gather(out, mine)
    return [int(t) for t in out]


def gather_labels(y: torch.Tensor) -> torch.Tensor:
    """(B_r,) labels from every rank, no gradient, in rank order."""
    rank, size = world()
    if size == 1:
        return y
    sizes = gather_sizes(y.shape[0], y.device)
    padded = torch.cat([y, y.new_zeros(max(sizes) - len(y))])
    out = [torch.zeros_like(padded) for _ in range(size)]
    dist.all_gather(out, padded)
    return torch.cat([o[:n] for o, n in zip(out, sizes, strict=True)])
