"""Peak memory and time of leave-one-out evaluation on a large embedding set.

    python scripts/bench_eval_memory.py            # 60,000 x 64, 10 classes
    python scripts/bench_eval_memory.py --n 20000 --dim 128
    python scripts/bench_eval_memory.py --dim 512 --classes 12000 --no-clustering  # SOP-shaped

Peak memory is the largest resident set size seen while evaluating (sampled every 5 ms
from /proc/self/statm), minus the resident size just before (embeddings allocated, imports
and a warm-up done).
"""

from __future__ import annotations

import argparse
import resource
import threading
import time

import torch

from dmlrun.metrics import clustering_metrics, retrieval_metrics


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


class PeakRSS(threading.Thread):
    """The largest resident set size while running, sampled every 5 ms."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak, self.done = rss_mib(), threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.005):
            self.peak = max(self.peak, rss_mib())

    def stop(self) -> float:
        self.done.set()
        self.join()
        return max(self.peak, rss_mib())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=60_000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--no-clustering", action="store_true",
                   help="retrieval only (k-means with k = classes is slow for many classes)")
    args = p.parse_args()
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, args.classes, (args.n,), generator=g)
    centres = torch.randn(args.classes, args.dim, generator=g) * 0.3  # overlapping classes
    emb = centres[labels] + torch.randn(args.n, args.dim, generator=g)
    retrieval_metrics(emb[:1000], labels[:1000])  # warm-up: kernels, allocator
    before = rss_mib()
    sampler = PeakRSS()
    sampler.start()
    t0 = time.perf_counter()
    metrics = retrieval_metrics(emb, labels)
    t_retrieval = time.perf_counter() - t0
    t0 = time.perf_counter()
    if not args.no_clustering:
        metrics.update(clustering_metrics(emb, labels))
    t_cluster = time.perf_counter() - t0
    after = sampler.stop()
    size = emb.numel() * 4 / 2**20
    print(f"embeddings {args.n} x {args.dim} float32 = {size:.0f} MiB, torch threads "
          f"{torch.get_num_threads()}")
    print(f"RSS before {before:.0f} MiB, peak while evaluating {after:.0f} MiB: "
          f"+{after - before:.0f} MiB for evaluation")
    print(f"retrieval (P@1, Recall@K, R-precision, MAP@R, kNN) {t_retrieval:.1f} s; "
          f"k-means NMI/AMI {t_cluster:.1f} s")
    print("  " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))


if __name__ == "__main__":
    main()
