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


def _kmeans_pp(x: torch.Tensor, k: int, g: torch.Generator) -> torch.Tensor:
    n = len(x)
    first = int(torch.randint(n, (1,), generator=g))
    centres = [x[first]]
    closest = ((x - x[first]) ** 2).sum(1)
    for _ in range(1, k):
        probs = closest.cpu().double()
        if probs.sum() <= 0:
            idx = int(torch.randint(n, (1,), generator=g))
        else:
            idx = int(torch.multinomial(probs / probs.sum(), 1, generator=g))
        centres.append(x[idx])
        closest = torch.minimum(closest, ((x - x[idx]) ** 2).sum(1))
    return torch.stack(centres)


def _contingency(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    _, ai = torch.unique(a.cpu(), return_inverse=True)
    _, bi = torch.unique(b.cpu(), return_inverse=True)
    ka, kb = int(ai.max()) + 1, int(bi.max()) + 1
    return torch.bincount(ai * kb + bi, minlength=ka * kb).view(ka, kb).double()


def _entropy(counts: torch.Tensor) -> float:
    p = counts[counts > 0] / counts.sum()
    return float(-(p * p.log()).sum())


def mutual_information(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mutual information (nats) between two labelings of the same N items."""
    c = _contingency(a, b)
    n = c.sum()
    nz = c > 0
    outer = c.sum(1, keepdim=True) * c.sum(0, keepdim=True)
    return float((c[nz] / n * (c[nz] * n / outer[nz]).log()).sum())


def normalized_mutual_info(a: torch.Tensor, b: torch.Tensor) -> float:
    """NMI with the arithmetic mean of the entropies (scikit-learn's default)."""
    c = _contingency(a, b)
    ha, hb = _entropy(c.sum(1)), _entropy(c.sum(0))
    if ha == 0 and hb == 0:
        return 1.0
    return mutual_information(a, b) / max((ha + hb) / 2, 1e-15)


def expected_mutual_information(c: torch.Tensor) -> float:
    """E[MI] of two labelings with the row/column sums of contingency ``c`` under the
    hypergeometric model of random permutation (Vinh, Epps & Bailey 2010)."""
    n = int(c.sum())
    a = c.sum(1).long()
    b = c.sum(0).long()
    nij = torch.arange(1, int(max(a.max(), b.max())) + 1, dtype=torch.float64)
    A, B, N = a[:, None, None].double(), b[None, :, None].double(), float(n)
    lo = torch.clamp(A + B - N, min=1.0)
    hi = torch.minimum(A, B)
    v = nij[None, None, :]
    valid = (v >= lo) & (v <= hi)
    term1 = v / N * (torch.log(v * N) - torch.log(A * B))
    lg = torch.lgamma
    log_p = (lg(A + 1) + lg(B + 1) + lg(N - A + 1) + lg(N - B + 1) - lg(torch.tensor(N + 1.0))
             - lg(v + 1) - lg(A - v + 1) - lg(B - v + 1) - lg(N - A - B + v + 1))
    terms = torch.where(valid, term1 * torch.exp(torch.where(valid, log_p, 0.0)), 0.0)
    return float(terms.sum())


def adjusted_mutual_info(a: torch.Tensor, b: torch.Tensor) -> float:
    """AMI with the arithmetic mean of the entropies (scikit-learn's default)."""
    c = _contingency(a, b)
    if c.shape[0] == c.shape[1] == 1 or c.shape[0] == c.shape[1] == int(c.sum()):
        return 1.0
    mi = mutual_information(a, b)
    emi = expected_mutual_information(c)
    mean_h = (_entropy(c.sum(1)) + _entropy(c.sum(0))) / 2
    denom = mean_h - emi
    if abs(denom) < 1e-15:
        denom = math.copysign(1e-15, denom) if denom else 1e-15
    return (mi - emi) / denom
