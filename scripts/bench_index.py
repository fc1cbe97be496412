"""Index, search, cluster and export with a trained run, measured (docs/benchmarks.md).

    DMLRUN_DATA_DIR=../shared/data python scripts/bench_index.py <run folder> [--out DIR]

1. an exact index of the run's test split, searched with each test image (itself left
   out): P@1 against the run's summary.json;
2. exact, IVF and HNSW indexes of all 70,000 MNIST images (train, val and test): build
   time, recall@10 of the approximate ones against exact search on 1,000 sampled items
   and their speed-up, and the time to search 10,000 items;
3. k-means (k = 10) of the test split by the run's embedding against raw pixels: NMI, AMI;
4. TorchScript and ONNX exports against load_embedder on 256 test images.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from dmlrun import load_embedder
from dmlrun.cluster_cli import run_clustering
from dmlrun.export import export
from dmlrun.index import Index


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("run")
    p.add_argument("--out", help="keep the indexes here (default: a temporary folder)")
    args = p.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="bench-index-"))
    summary = json.loads((Path(args.run) / "summary.json").read_text())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, run {args.run} "
          f"({summary['embedding_dim']}-D)")

    test = Index.build(args.run, ["split=test"], out / "test", progress=False)
    hits = test.search_items(k=1)
    p1 = (hits.labels[:, 0] == test.labels).double().mean().item()
    print(f"\n1. test split: index P@1 {p1!r}, summary.json {summary['test']['precision_at_1']!r}"
          f" -> {'equal' if p1 == summary['test']['precision_at_1'] else 'DIFFERENT'}")

    print("\n2. all 70,000 images\n| index | build s | recall@10 (1,000 items) | speed-up "
          "| search 10,000 items, s |\n|---|---|---|---|---|")
    items = torch.randperm(70000, generator=torch.Generator().manual_seed(1))[:10000]
    for kind in ("exact", "ivf", "hnsw"):
        t0 = time.perf_counter()
        index = Index.build(args.run, ["split=all"], out / f"all-{kind}", kind=kind,
                            progress=False)
        built = time.perf_counter() - t0
        t0 = time.perf_counter()
        index.search_items(items, 10)
        searched = time.perf_counter() - t0
        ann = index.meta.get("ann", {})
        print(f"| {kind} {ann.get('options', '')} | {built:.1f} | "
              f"{ann.get('recall_at_k', 1.0):.4f} | {ann.get('speedup', 1.0):.1f}x "
              f"| {searched:.2f} |")

    print("\n3. k-means, k = 10, test split")
    result = run_clustering(args.run, ["split=test"], out / "clusters", k=10, progress=False)
    print(f"embedding NMI {result['nmi']:.4f} AMI {result['ami']:.4f}; raw pixels NMI "
          f"{result['raw_pixels']['nmi']:.4f} AMI {result['raw_pixels']['ami']:.4f}")

    print("\n4. exports, 256 test images, largest |difference| from load_embedder")
    source, _ = test.source(0)
    images = torch.cat([b.images for b in source.batches(256)])[:256]
    want = load_embedder(args.run)(images).detach()
    for fmt in ("torchscript", "onnx"):
        path = out / f"model.{fmt}"
        export(args.run, path, fmt)
        if fmt == "torchscript":
            got = torch.jit.load(str(path))(images).detach()
        else:
            import onnxruntime

            session = onnxruntime.InferenceSession(str(path))
            got = torch.from_numpy(session.run(None, {"images": images.numpy()})[0])
        print(f"{fmt}: {float((got - want).abs().max()):.3g}")


if __name__ == "__main__":
    main()
