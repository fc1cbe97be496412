"""k-means and the information-theoretic scores used to grade an embedding's clusters."""

from __future__ import annotations

import math

import torch


@torch.no_grad()
def kmeans(
    x: torch.Tensor,
    k: int,
    n_init: int = 3,
    max_iter: int = 100,
    tol: float = 1e-6,
    seed: int = 0,
    chunk_size: int = 8192,
) -> torch.Tensor:
    """Lloyd's k-means with k-means++ seeding on (N, D) points; returns (N,) cluster ids.

    The best of ``n_init`` restarts (lowest inertia) wins. Distances are computed in
    chunks of rows so memory stays O(chunk_size * k).
    """
    x = x.float()
    n = len(x)
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}], got {k}")
    g = torch.Generator(device="cpu").manual_seed(seed)
    best_inertia, best_assign = math.inf, None
    for _ in range(n_init):
        centres = _kmeans_pp(x, k, g)
        prev = math.inf
        for _ in range(max_iter):
            assign, inertia = _assign(x, centres, chunk_size)
            sums = torch.zeros_like(centres).index_add_(0, assign, x)
            counts = torch.bincount(assign, minlength=k).to(x.dtype)
            empty = counts == 0
            centres = torch.where(empty[:, None], centres, sums / counts.clamp_min(1)[:, None])
            if prev - inertia <= tol * max(prev, 1e-12):
                break
            prev = inertia
        assign, inertia = _assign(x, centres, chunk_size)
        if inertia < best_inertia:
            best_inertia, best_assign = inertia, assign
    assert best_assign is not None
    return best_assign


def _assign(x: torch.Tensor, centres: torch.Tensor, chunk: int) -> tuple[torch.Tensor, float]:
    ids, total = [], 0.0
    c_sq = (centres * centres).sum(1)
    for s in range(0, len(x), chunk):
        xb = x[s : s + chunk]
        d = (xb * xb).sum(1, keepdim=True) + c_sq[None] - 2 * xb @ centres.T
        m, i = d.min(1)
        ids.append(i)
        total += float(m.clamp_min(0).sum())
    return torch.cat(ids), total


def _kmeans_pp(x: torch.Tensor, k: int, g: torch.Generator, chunk: int = 4096) -> torch.Tensor:
    """(k, D) k-means++ starting centres among the (N, D) points: each next one drawn with
    probability proportional to its squared distance to the closest one so far."""
    n = len(x)
    # the squared distances to each new centre are written chunk by chunk into one reused
    # buffer: the (N, D) difference a plain ((x - c) ** 2).sum(1) allocates at every one of
    # the k draws was most of the time (SOP's 60,502 x 128 and k = 11,316: 228 s a start).
    # The same operations row by row, so the same values and the same draws.
    buf = x.new_empty(min(chunk, n), x.shape[1])
    new = x.new_empty(n)

    def squared_distances(c: torch.Tensor) -> torch.Tensor:
        for s in range(0, n, chunk):
            b = buf[: min(chunk, n - s)]
            torch.sub(x[s : s + chunk], c, out=b)
            torch.sum(b.square_(), 1, out=new[s : s + chunk])
        return new

    first = int(torch.randint(n, (1,), generator=g))
    picked = [first]
    closest = squared_distances(x[first]).clone()
    for _ in range(1, k):
        probs = closest.cpu().double()
        total = probs.sum()
        if total <= 0:
            idx = int(torch.randint(n, (1,), generator=g))
        else:
            idx = int(torch.multinomial(probs / total, 1, generator=g))
        picked.append(idx)
        torch.minimum(closest, squared_distances(x[idx]), out=closest)
    return x[picked]


class Contingency:
    """The non-zero cells of two labelings' contingency table, and its row and column
    sums: never the dense (A, B) table, which for thousands of classes and clusters
    (Stanford Online Products tests on 11,316) would not fit in memory."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor) -> None:
        _, ai = torch.unique(a.cpu(), return_inverse=True)
        _, bi = torch.unique(b.cpu(), return_inverse=True)
        kb = int(bi.max()) + 1
        cells, counts = torch.unique(ai.long() * kb + bi.long(), return_counts=True)
        self.rows, self.cols = cells // kb, cells % kb
        self.counts = counts.double()  # (cells,)
        self.row_sums = torch.bincount(ai).double()  # (A,)
        self.col_sums = torch.bincount(bi).double()  # (B,)
        self.n = float(len(a))


def _entropy(counts: torch.Tensor) -> float:
    p = counts[counts > 0] / counts.sum()
    return float(-(p * p.log()).sum())


def _mutual_information(c: Contingency) -> float:
    outer = c.row_sums[c.rows] * c.col_sums[c.cols]
    return float((c.counts / c.n * (c.counts * c.n / outer).log()).sum())


def mutual_information(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mutual information (nats) between two labelings of the same N items."""
    return _mutual_information(Contingency(a, b))


def normalized_mutual_info(a: torch.Tensor, b: torch.Tensor) -> float:
    """NMI with the arithmetic mean of the entropies (scikit-learn's default)."""
    c = Contingency(a, b)
    ha, hb = _entropy(c.row_sums), _entropy(c.col_sums)
    if ha == 0 and hb == 0:
        return 1.0
    return _mutual_information(c) / max((ha + hb) / 2, 1e-15)


def expected_mutual_information(row_sums: torch.Tensor, col_sums: torch.Tensor) -> float:
    """E[MI] of two labelings with these row and column sums of their contingency table
    under the hypergeometric model of random permutation (Vinh, Epps & Bailey 2010).

    The sum over cells (i, j) and their possible counts v depends on a cell only through
    its row sum a_i and column sum b_j, so it runs over the distinct sums, each weighted
    by how many rows and columns have it: the same value as the sum over every cell, in
    (distinct a) x (distinct b) x min(max a, max b) terms."""
    a_values, a_count = torch.unique(row_sums.long(), return_counts=True)
    b_values, b_count = torch.unique(col_sums.long(), return_counts=True)
    n = float(row_sums.sum())
    v = torch.arange(1, int(min(a_values.max(), b_values.max())) + 1,
                     dtype=torch.float64)[None, None, :]
    A, B = a_values[:, None, None].double(), b_values[None, :, None].double()
    valid = (v >= torch.clamp(A + B - n, min=1.0)) & (v <= torch.minimum(A, B))
    term1 = v / n * (torch.log(v * n) - torch.log(A * B))
    lg = torch.lgamma
    log_p = (lg(A + 1) + lg(B + 1) + lg(n - A + 1) + lg(n - B + 1) - math.lgamma(n + 1.0)
             - lg(v + 1) - lg(A - v + 1) - lg(B - v + 1) - lg(n - A - B + v + 1))
    terms = torch.where(valid, term1 * torch.exp(torch.where(valid, log_p, 0.0)), 0.0)
    weight = (a_count[:, None] * b_count[None, :]).double()
    return float((terms.sum(2) * weight).sum())


def adjusted_mutual_info(a: torch.Tensor, b: torch.Tensor) -> float:
    """AMI with the arithmetic mean of the entropies (scikit-learn's default)."""
    c = Contingency(a, b)
    ka, kb = len(c.row_sums), len(c.col_sums)
    if ka == kb == 1 or ka == kb == int(c.n):
        return 1.0
    mi = _mutual_information(c)
    emi = expected_mutual_information(c.row_sums, c.col_sums)
    mean_h = (_entropy(c.row_sums) + _entropy(c.col_sums)) / 2
    denom = mean_h - emi
    if abs(denom) < 1e-15:
        denom = math.copysign(1e-15, denom) if denom else 1e-15
    return (mi - emi) / denom
