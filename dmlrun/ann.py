"""Approximate nearest-neighbour search with faiss (an optional dependency: the ``index``
extra): IVF (inverted lists over k-means cells, ``nprobe`` of them searched) and HNSW (a
navigable small-world graph, ``ef_search`` candidates kept). Both search in a space where
faiss's L2 or inner product orders items as the run's distance does, and their scores are
turned back into that distance:

- euclidean: L2 on the (normalised, if the run's distance normalises) vectors, square root;
- squared: the same, without the root;
- cosine: inner product of L2-normalised vectors, 1 - score;
- dot: inner product, -score.

IVF moves to the GPU when faiss was built with GPU support and sees one.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import numpy as np
import torch
import torch.nn.functional as F

from dmlrun.errors import UserError

INNER_PRODUCT = ("cosine", "dot")


def faiss_module() -> ModuleType:
    """faiss, or a ``UserError`` saying how to install it."""
    try:
        import faiss
    except ImportError as exc:
        raise UserError("approximate search needs faiss: pip install 'dmlrun[index]' (or "
                        "faiss-gpu); exact search needs nothing more") from exc
    return faiss


def _vectors(x: torch.Tensor, distance: dict) -> np.ndarray:
    """(N, D) embeddings in the space faiss searches."""
    x = x.float()
    if distance["normalize"] or distance["name"] == "cosine":
        x = F.normalize(x, dim=1)
    return np.ascontiguousarray(x.cpu().numpy())


def _gpu(faiss: ModuleType, index):
    if hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
        return faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
    return index


def build(kind: str, embeddings: torch.Tensor, distance: dict, nlist: int | None = None,
          nprobe: int = 16, m: int = 32, ef_construction: int = 80, ef_search: int = 64,
          seed: int = 0):
    """A faiss index of (N, D) ``embeddings``: ``kind`` ivf (``nlist`` cells, default about
    4 sqrt(N); ``nprobe`` searched) or hnsw (``m`` links per node, ``ef_construction``,
    ``ef_search``)."""
    faiss = faiss_module()
    x = _vectors(embeddings, distance)
    n, d = x.shape
    metric = faiss.METRIC_INNER_PRODUCT if distance["name"] in INNER_PRODUCT else faiss.METRIC_L2
    if kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, m, metric)
        index.hnsw.efConstruction = ef_construction
        index.hnsw.efSearch = ef_search
        index.add(x)
        return index
    nlist = nlist or max(1, min(int(4 * n**0.5), n // 39))  # faiss wants >= 39 points a cell
    quantizer = faiss.IndexFlatIP(d) if metric == faiss.METRIC_INNER_PRODUCT else \
        faiss.IndexFlatL2(d)
    index = faiss.IndexIVFFlat(quantizer, d, nlist, metric)
    index.cp.seed = seed
    index.train(x)
    index.add(x)
    index.nprobe = min(nprobe, nlist)
    return index


def add(index, embeddings: torch.Tensor, distance: dict) -> None:
    index.add(_vectors(embeddings, distance))


def options_of(index, given: dict) -> dict:
    """The settings an index searches with, for index.json."""
    faiss = faiss_module()
    if isinstance(index, faiss.IndexHNSW):
        return {"m": index.hnsw.nb_neighbors(1), "ef_search": index.hnsw.efSearch,
                "ef_construction": index.hnsw.efConstruction}
    return {"nlist": index.nlist, "nprobe": index.nprobe, **{k: v for k, v in given.items()
                                                              if k == "seed"}}


def search(index, queries: torch.Tensor, k: int, distance: dict,
           exclude: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(Q, k) item indices and distances in the run's distance, nearest first; ``exclude``
    (Q,): an item to leave out of each row (-1: none)."""
    faiss = faiss_module()
    extra = int(exclude is not None)
    k = min(k, index.ntotal - extra)
    if isinstance(index, faiss.IndexIVF):
        index = _gpu(faiss, index)  # HNSW has no GPU version
    scores, idx = index.search(_vectors(queries, distance), k + extra)
    idx, scores = torch.from_numpy(idx), torch.from_numpy(scores)
    if exclude is not None:
        keep = idx != exclude[:, None]
        # drop the excluded item where found, else the last column
        keep[torch.arange(len(keep)), torch.where(keep.all(1), k, keep.long().argmin(1))] = False
        idx, scores = idx[keep].view(len(idx), k), scores[keep].view(len(idx), k)
    name = distance["name"]
    if name == "euclidean":
        dist = scores.clamp_min(0).sqrt()
    elif name == "squared":
        dist = scores
    elif name == "cosine":
        dist = 1.0 - scores
    else:
        dist = -scores
    return idx.long(), dist


def write(index, path: Path) -> None:
    faiss = faiss_module()
    tmp = path.with_name(f".{path.name}.tmp")
    faiss.write_index(index, str(tmp))
    tmp.replace(path)


def read(path: Path):
    if not path.is_file():
        raise UserError(f"the approximate index {path} is missing")
    return faiss_module().read_index(str(path))
