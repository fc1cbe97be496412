"""Exact k-nearest-neighbour search by (distance, index), in bounded memory: the search
behind every retrieval metric, ``per_query``, ``analysis.nearest`` and exact index search.

Row by row: per chunk of queries, a threshold read off a sorted sample of each distance row
keeps about 1.1 times the neighbours needed, and only those are sorted, by (distance,
reference index). Leave-one-out with few neighbours a query (classes of a few images):
symmetric blocks, each distance computed once for its row and its column.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F

from dmlrun.distances import (
    _EPS,
    CosineDistance,
    Distance,
    DotProductDistance,
    EuclideanDistance,
    SquaredEuclideanDistance,
)


def _search(
    queries: torch.Tensor, reference: torch.Tensor, distance: Distance, k: torch.Tensor,
    leave_one_out: bool, chunk_size: int, exclude: torch.Tensor | None = None,
) -> Iterator[tuple[int, int, torch.Tensor, torch.Tensor]]:
    """For each chunk of queries: (start, stop, (B, max k) reference columns, (B, N)
    distances), the first k[b] of row b its k[b] nearest references in order of (distance,
    index). In leave-one-out the query's own column is left out; ``exclude`` (Q,) names
    one column per query to leave out (-1: none). Left-out columns read inf in the
    distances, which are overwritten by the next chunk. Leave-one-out with at most
    ``SMALL_K`` neighbours a query goes to ``_search_symmetric`` (distances: None)."""
    if leave_one_out and exclude is None and int(k.max()) <= SMALL_K:
        yield from _search_symmetric(queries, distance, k, chunk_size)
        return
    pairwise = _chunk_pairwise(distance, reference)
    mask = torch.empty(0, dtype=torch.bool)
    if leave_one_out:
        exclude = torch.arange(len(queries), device=queries.device)
    for start, stop in ((s, min(s + chunk_size, len(queries)))
                        for s in range(0, len(queries), chunk_size)):
        dist = pairwise(queries[start:stop])
        if dist.dtype in (torch.float16, torch.bfloat16):
            dist = dist.float()  # exact, and the sort keys take 32-bit floats
        own = None
        if exclude is not None:
            cols = exclude[start:stop].to(dist.device)
            own = (torch.nonzero(cols >= 0).squeeze(1), cols[cols >= 0])
            dist[own] = float("inf")
        if mask.shape[0] < len(dist) or mask.device != dist.device:
            mask = torch.empty(dist.shape, dtype=torch.bool, device=dist.device)
        yield start, stop, _neighbours(dist, k[start:stop], mask[: len(dist)], own), dist


@torch.no_grad()
def nearest_neighbours(
    queries: torch.Tensor, reference: torch.Tensor, k: int, distance: Distance | None = None,
    exclude: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact search, the same as the metrics': the ``k`` nearest rows of (N, D) ``reference``
    for each of (Q, D) ``queries``, ordered by (distance, reference index). ``exclude`` (Q,):
    a reference row to leave out of each query's neighbours (its own item; -1 for none).
    Returns (Q, k) indices and (Q, k) distances; k is capped at the references available.
    The distances returned are computed again for the pairs found, difference first: the
    search's matrix form (|x|^2 + |y|^2 - 2 x.y) rounds d^2 by about |x|^2 x 1e-7, which
    near zero reads as thousandths in d (up to 0.007 among the default 2-D embedding's 8
    nearest, norms about 8), and an image's own copy would not read 0 away. The order
    stays the search's: the metrics' ranks do not change with it."""
    distance = distance if distance is not None else EuclideanDistance()
    k = min(k, len(reference) - int(exclude is not None and bool((exclude >= 0).any())))
    if len(queries) == 0 or k <= 0:
        empty = torch.zeros(len(queries), max(k, 0))
        return empty.long(), empty
    chunk_size = min(1024, max(16, 2**24 // len(reference)))
    ks = torch.full((len(queries),), k, dtype=torch.long, device=queries.device)
    # every item against all the others: the metrics' leave-one-out search, the same order
    loo = exclude is not None and len(queries) == len(reference) and torch.equal(
        exclude.cpu(), torch.arange(len(queries))) and torch.equal(queries, reference)
    idx, dist = [], []
    for start, stop, nn_idx, _ in _search(queries, reference, distance, ks, loo, chunk_size,
                                          None if loo else exclude):
        nn_idx = nn_idx[:, :k].to(queries.device)
        idx.append(nn_idx)
        rows = queries[start:stop].repeat_interleave(k, dim=0)
        dist.append(distance.paired(rows, reference[nn_idx.reshape(-1)]).view(-1, k))
    return torch.cat(idx), torch.cat(dist)


SMALL_K = 32  # leave-one-out needing at most this many neighbours a query: symmetric search
SYMMETRIC_BLOCK = 2048


def _search_symmetric(
    emb: torch.Tensor, distance: Distance, k: torch.Tensor, chunk_size: int,
) -> Iterator[tuple[int, int, torch.Tensor, None]]:
    """Leave-one-out search when every item needs few neighbours (classes of a few images,
    as in Stanford Online Products): each block of distances is computed once and serves
    its rows and its columns alike, half the multiply-adds of a search row by row. Order as
    in ``_search``, by (distance, index): every candidate is one int64 key, the distance's
    bits above its column, and each row keeps its ``k.max()`` smallest keys. Yields
    (start, stop, (B, max k) columns, None) in chunks of ``chunk_size`` rows."""
    n, width = len(emb), int(k.max())
    best = torch.full((n, width), torch.iinfo(torch.int64).max, dtype=torch.int64,
                      device=emb.device)
    blocks = [(s, min(s + SYMMETRIC_BLOCK, n)) for s in range(0, n, SYMMETRIC_BLOCK)]
    for a, (i0, i1) in enumerate(blocks):
        pairwise = _chunk_pairwise(distance, emb[i0:i1])
        for j0, j1 in blocks[a:]:
            dist = pairwise(emb[j0:j1])  # rows j0:j1 against columns i0:i1
            if dist.dtype != torch.float32:
                dist = dist.float()
            if j0 == i0:
                dist.fill_diagonal_(float("inf"))
            _keep_smallest(best[j0:j1], dist, i0, width)
            if j0 != i0:
                _keep_smallest(best[i0:i1], dist.T.contiguous(), j0, width)  # row topk: faster
    columns = best & 0xFFFFFFFF
    for start in range(0, n, chunk_size):
        stop = min(start + chunk_size, n)
        yield start, stop, columns[start:stop], None


def _keys(dist: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """float32 distances and their int64 columns (same shape) -> int64 keys ordered as
    (distance, column): the float's bits made monotone (negative values flipped, -0.0 as
    +0.0), shifted above the column."""
    bits = (dist + 0.0).view(torch.int32)  # + 0.0 turns -0.0 into +0.0
    bits = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    return (bits.long() << 32) | cols


def _keep_smallest(best: torch.Tensor, dist: torch.Tensor, col0: int, width: int) -> None:
    """Rows of ``best`` (B, width) keep their ``width`` smallest keys among theirs and
    those of (B, M) ``dist`` (columns col0..). A float topk picks each row's candidates;
    a row whose width-th and next distances are equal (a tie at the cut, where topk may
    pick any of them) takes all its keys instead."""
    take = min(width + 1, dist.shape[1])
    vals, idx = torch.topk(dist, take, dim=1, largest=False, sorted=True)
    keys = _keys(vals[:, :width], idx[:, :width] + col0)
    if take > width:
        tied = torch.nonzero(vals[:, width] == vals[:, width - 1]).squeeze(1)
        if len(tied):
            cols = torch.arange(col0, col0 + dist.shape[1], device=dist.device)
            full = _keys(dist[tied], cols.expand(len(tied), -1))
            keys[tied] = torch.topk(full, width, dim=1, largest=False).values
    best.copy_(torch.topk(torch.cat([best, keys], dim=1), width, dim=1, largest=False,
                          sorted=True).values)


def _neighbours(
    dist: torch.Tensor, k: torch.Tensor, mask: torch.Tensor,
    own: tuple[torch.Tensor, torch.Tensor] | None,
) -> torch.Tensor:
    """(B, N) distances -> (B, max k) columns of which the first k[b] in row b are its k[b]
    nearest, ordered by (distance, column). Only the columns within a threshold at or above
    the k[b]-th distance get sorted. ``own`` (rows, columns): entries left out (a query's
    own item). mask: a (B, N) bool work buffer."""
    row_starts = torch.arange(len(dist) + 1, device=dist.device) * dist.shape[1]
    torch.le(dist, _threshold(dist, k)[:, None], out=mask)
    for attempt in range(2):
        if own is not None:
            mask[own] = False
        flat = _flat_nonzero(mask)
        bounds = torch.searchsorted(flat, row_starts)
        short = bounds.diff() < k
        if attempt or not bool(short.any()):
            break
        # the sampled threshold fell below the k-th distance: take that from the sorted row
        short_rows = dist[short]
        mask[short] = short_rows <= _sorted_rows(short_rows.clone()).gather(1, k[short, None] - 1)
    if dist.device.type == "cpu" and dist.dtype == torch.float32 and mask.numel() < 2**31:
        return _leading_cpu(dist, flat, bounds, int(k.max()))
    return _leading(dist, flat, bounds, int(k.max()))


def _leading(
    dist: torch.Tensor, flat: torch.Tensor, bounds: torch.Tensor, width: int,
) -> torch.Tensor:
    """Flat indices into (B, N) dist, in order, row b's at flat[bounds[b]:bounds[b + 1]]
    -> (B, width) the columns of each row's first width, sorted by (distance, column);
    past a row's own entries, arbitrary columns. Any dtype and device."""
    if len(flat) == 0:  # only NaN distances
        return torch.zeros(len(dist), width, dtype=torch.long, device=dist.device)
    row_of = torch.repeat_interleave(torch.arange(len(dist), device=dist.device), bounds.diff())
    by_value = dist.view(-1)[flat].sort(stable=True).indices  # stable: equal ones by column
    flat = flat[by_value[row_of[by_value].sort(stable=True).indices]]
    lead = (bounds[:-1, None] + torch.arange(width, device=dist.device)).clamp_max(len(flat) - 1)
    cols = flat[lead] - torch.arange(len(dist), device=dist.device)[:, None] * dist.shape[1]
    return cols.clamp_(0, dist.shape[1] - 1)


def _leading_cpu(
    dist: torch.Tensor, flat: torch.Tensor, bounds: torch.Tensor, width: int,
) -> torch.Tensor:
    """_leading for float32 on the CPU, with numpy, blocks of rows in parallel threads: one
    int64 key per entry, its distance's bits then its flat index, all distinct."""
    d, flat_np, bounds_np = dist.numpy().ravel(), flat.numpy(), bounds.numpy()
    n_ref, flat_bits = dist.shape[1], max(1, (dist.numel() - 1).bit_length())
    out = np.empty((len(dist), width), dtype=np.int64)

    def rows(lo: int, hi: int) -> None:
        start, stop = bounds_np[lo], bounds_np[hi]
        if start == stop:  # only NaN distances
            out[lo:hi] = 0
            return
        bits = d.take(flat_np[start:stop]).view(np.int32)
        if bits.min() < 0:  # negative floats or -0.0: make the bits monotone
            bits = (bits.view(np.float32) + np.float32(0.0)).view(np.int32)  # -0.0 -> +0.0
            bits ^= (bits >> 31) & 0x7FFFFFFF
        keys = np.left_shift(bits, flat_bits, dtype=np.int64)
        keys += flat_np[start:stop]
        for b in range(lo, hi):
            keys[bounds_np[b] - start : bounds_np[b + 1] - start].sort()
        lead = bounds_np[lo:hi, None] - start + np.arange(width)
        cols = keys.take(np.minimum(lead, len(keys) - 1, out=lead))
        cols &= (1 << flat_bits) - 1
        cols -= np.arange(lo, hi)[:, None] * n_ref
        out[lo:hi] = cols.clip(0, n_ref - 1, out=cols)  # past a row's entries: never valid

    _in_threads(rows, len(dist), len(flat_np))
    return torch.from_numpy(out)


def _threshold(dist: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """(B,) thresholds, very likely at or above the k[b]-th smallest of row b, from a sorted
    sample of 16 columns out of every 128 (exact below 4096 columns: the row is sorted)."""
    n_rows, n_ref = dist.shape
    if n_ref < 4096:
        sample, pos = _sorted_rows(dist.clone()), k - 1
    else:
        n_blocks = n_ref // 128
        blocks = dist[:, : n_blocks * 128].view(n_rows, n_blocks, 128)[:, :, :16]
        sample = dist.new_empty(n_rows, n_blocks * 16)
        sample.view(n_rows, n_blocks, 16).copy_(blocks)
        sample = _sorted_rows(sample)
        # the k-th of n_ref is about the (k n / n_ref)-th of the sample: add 4 deviations
        expected = k.double() * sample.shape[1] / n_ref
        pos = (expected + 4 * expected.sqrt() + 2).ceil().long()
    thr = sample.gather(1, pos.clamp_max(sample.shape[1] - 1)[:, None]).squeeze(1)
    return torch.where(pos < sample.shape[1], thr, torch.full_like(thr, float("inf")))


def _flat_nonzero(mask: torch.Tensor) -> torch.Tensor:
    """Flat indices of the True entries of a contiguous (B, N) bool tensor, in order."""
    if mask.device.type != "cpu":
        return mask.view(-1).nonzero().squeeze(1)
    m = mask.numpy()
    parts: dict[int, np.ndarray] = {}

    def rows(lo: int, hi: int) -> None:
        part = np.flatnonzero(m[lo:hi])
        part += lo * m.shape[1]
        parts[lo] = part

    _in_threads(rows, len(m), m.size // 8)
    return torch.from_numpy(np.concatenate([parts[lo] for lo in sorted(parts)]))


_POOLS: dict[tuple[int, int], ThreadPoolExecutor] = {}


def _in_threads(fn: Callable[[int, int], None], n_rows: int, size: int) -> None:
    """Calls fn(lo, hi) on consecutive blocks of rows covering range(n_rows), one block per
    torch thread, in a thread pool kept for the process (numpy's sorts and most of its
    loops release the GIL); inline when size (the work, in elements) is small."""
    parts = max(1, min(torch.get_num_threads(), n_rows)) if size >= 1 << 16 else 1
    cuts = [round(i * n_rows / parts) for i in range(parts + 1)]
    if parts < 2:
        fn(0, n_rows)
        return
    key = (os.getpid(), parts)  # a forked child makes its own pool
    pool = _POOLS.get(key) or _POOLS.setdefault(key, ThreadPoolExecutor(parts))
    list(pool.map(fn, cuts[:-1], cuts[1:]))


def _sorted_rows(x: torch.Tensor) -> torch.Tensor:
    """Each row of a (B, M) tensor sorted ascending, values only; a contiguous x on the CPU
    is sorted in place (numpy's vectorised sort)."""
    if x.device.type != "cpu":
        return x.sort(dim=1).values
    a = x.contiguous().numpy()
    _in_threads(lambda lo, hi: a[lo:hi].sort(axis=1), len(a), a.size)
    return torch.from_numpy(a)


_BUILTIN = (SquaredEuclideanDistance, EuclideanDistance, CosineDistance, DotProductDistance)


def _chunk_pairwise(
    distance: Distance, reference: torch.Tensor,
) -> Callable[[torch.Tensor], torch.Tensor]:
    """A function (B, D) queries -> (B, N) ``distance.pairwise(queries, reference)``, bit for
    bit. For the built-in distances the reference is prepared once and each chunk is
    computed in place in two buffers kept between calls (the result is overwritten by the
    next call)."""
    kind = type(distance)
    if kind not in _BUILTIN:
        return lambda q: distance.pairwise(q, reference)
    y = distance._prep(reference)
    if kind is CosineDistance:
        y = F.normalize(y, dim=1)
    yy = (y * y).sum(1)[None, :]
    buffers: list[torch.Tensor] = []

    def pairwise(q: torch.Tensor) -> torch.Tensor:
        x = distance._prep(q)
        if not buffers or buffers[0].shape[0] < len(x):
            buffers[:] = [x.new_empty(len(x), len(y)) for _ in range(2)]
        out, prod = (b[: len(x)] for b in buffers)
        if kind is CosineDistance:
            torch.mm(F.normalize(x, dim=1), y.T, out=out)
            return out.neg_().add_(1.0)  # 1 - cos: -c + 1 rounds as 1 - c
        if kind is DotProductDistance:
            return torch.mm(x, y.T, out=out).neg_()
        # same operations, in the same order, as SquaredEuclideanDistance._pairwise
        torch.add((x * x).sum(1, keepdim=True), yy, out=out)
        out.sub_(torch.mm(2.0 * x, y.T, out=prod))
        if kind is SquaredEuclideanDistance:
            return out.clamp_min_(0.0)
        return out.clamp_min_(_EPS).sqrt_()  # max(max(d, 0), eps) = max(d, eps)

    return pairwise


