"""``dmlrun-cluster``: group images (a folder or a dataset split) by a trained run's
embedding. k-means with a given k, k chosen by the silhouette over a range, or average-
linkage agglomerative clustering cut at a distance threshold. Writes assignments.csv,
clusters.json and clusters.html (a contact sheet per cluster) into a new folder; with
labels, NMI and AMI against them beside k-means on raw pixels with the same k.
"""

from __future__ import annotations

import argparse
import csv
import html
import json
import os
import shutil
import sys
from pathlib import Path

from dmlrun.errors import UserError, run_command

SILHOUETTE_SAMPLE = 5000  # points the silhouette is estimated on (seeded)
AGGLOMERATIVE_MAX = 20000  # agglomerative clustering keeps all N^2 distances
PIXELS_MAX_BYTES = 1 << 28  # raw-pixel baseline only when the images fit this
SHEET_IMAGES = 40  # images shown per cluster


def embed_source(run, source, progress: bool | None = None, keep_pixels: bool = False):
    """(N, D) embeddings of a source's readable items, their positions (N,), the unreadable
    ones [(position, message)], and (N, pixels) uint8 raw images when ``keep_pixels``."""
    import torch

    from dmlrun.sources import embed_batches

    embs, positions, skipped, pixels = [], [], [], []
    for batch, emb in embed_batches(run, source, progress):
        skipped += batch.errors
        embs.append(emb)
        positions.append(batch.positions)
        if keep_pixels:
            pixels.append(batch.images.flatten(1).cpu())
    if not sum(len(e) for e in embs):
        raise UserError(f"no readable images in the source ({len(skipped)} unreadable)")
    return (torch.cat(embs), torch.cat(positions), skipped,
            torch.cat(pixels) if keep_pixels else None)


def _space(emb, distance):
    """Points in which euclidean k-means and silhouettes follow the run's distance."""
    import torch.nn.functional as F

    if distance.normalize or distance.name == "cosine":
        return F.normalize(emb.float(), dim=1)
    return emb.float()


def silhouette(x, clusters, seed: int) -> float:
    from sklearn.metrics import silhouette_score

    n_clusters = len(set(clusters.tolist()))
    if not 2 <= n_clusters < len(x):
        return float("nan")
    return float(silhouette_score(x.numpy(), clusters.numpy(),
                                  sample_size=min(len(x), SILHOUETTE_SAMPLE),
                                  random_state=seed))


def cluster(x, k: int | None, k_range: tuple[int, int] | None, threshold: float | None,
            distance_name: str, seed: int) -> tuple[object, dict]:
    """(N,) cluster ids of points ``x`` and how they were found."""
    from dmlrun.clustering import kmeans

    if threshold is not None:
        return _agglomerative(x, threshold, distance_name)
    if k is not None:
        if not 1 <= k <= len(x):
            raise UserError(f"--k must be between 1 and the {len(x)} images")
        return kmeans(x, k, seed=seed), {"method": "kmeans", "k": k}
    lo, hi = k_range
    hi = min(hi, len(x) - 1)
    if not 2 <= lo <= hi:
        raise UserError(f"--k-range {lo}:{hi} must have 2 <= lo <= hi < images ({len(x)})")
    scores = {}
    best = None
    for kk in range(lo, hi + 1):
        ids = kmeans(x, kk, seed=seed)
        scores[kk] = silhouette(x, ids, seed)
        if best is None or scores[kk] > scores[best[0]]:
            best = (kk, ids)
    return best[1], {"method": "kmeans, k by silhouette", "k": best[0],
                     "silhouette_by_k": {str(kk): round(v, 4) for kk, v in scores.items()}}


def _agglomerative(x, threshold: float, distance_name: str):
    import torch
    from sklearn.cluster import AgglomerativeClustering

    if len(x) > AGGLOMERATIVE_MAX:
        raise UserError(f"--threshold keeps all pairwise distances: at most "
                        f"{AGGLOMERATIVE_MAX} images, got {len(x)} (use --k or --k-range)")
    if distance_name == "dot":
        raise UserError("--threshold needs a distance; the run's dot product is not one "
                        "(use --k or --k-range)")
    metric = "cosine" if distance_name == "cosine" else "euclidean"
    cut = threshold ** 0.5 if distance_name == "squared" else threshold
    model = AgglomerativeClustering(n_clusters=None, distance_threshold=cut, metric=metric,
                                    linkage="average").fit(x.numpy())
    return torch.from_numpy(model.labels_).long(), {
        "method": f"agglomerative (average linkage, {metric}), threshold {threshold}",
        "k": int(model.n_clusters_)}


def by_size(ids):
    """Cluster ids renumbered by size, largest first (ties by old id)."""
    import torch

    counts = torch.bincount(ids)
    order = sorted(range(len(counts)), key=lambda c: (-int(counts[c]), c))
    new = torch.empty(len(counts), dtype=torch.long)
    new[torch.tensor(order)] = torch.arange(len(order))
    return new[ids]


def run_clustering(run_path: str, source_tokens: list[str], out: Path, k: int | None = None,
                   k_range: tuple[int, int] | None = None, threshold: float | None = None,
                   labels: bool = False, device: str = "auto", seed: int = 0,
                   progress: bool | None = None) -> dict:
    """Cluster a source with a run's embedding and write the folder ``out`` (new)."""
    from dmlrun.embedder import RunEmbedding
    from dmlrun.sources import parse_source

    if out.exists():
        raise UserError(f"{out} exists; refusing to overwrite it (choose a new --out)")
    if k_range is None and k is None and threshold is None:
        k_range = (2, 20)
    run = RunEmbedding(run_path, device)
    source = parse_source(source_tokens, run.config, run.image_size, run.channels, labels)
    pixels_ok = source.labels is not None and \
        len(source) * run.channels * run.image_size**2 <= PIXELS_MAX_BYTES
    emb, positions, skipped, pixels = embed_source(run, source, progress, pixels_ok)
    x = _space(emb, run.distance)
    ids, how = cluster(x, k, k_range, threshold, run.distance.name, seed)
    ids = by_size(ids)
    result = {"run": str(run.checkpoint), "source": source.spec, "images": len(emb),
              "skipped": len(skipped), "skipped_names": [source.names[i] for i, _ in
                                                          skipped[:50]],
              **how, "silhouette": round(silhouette(x, ids, seed), 4),
              "sizes": [int(c) for c in ids.bincount()]}
    if source.labels is not None:
        result.update(_against_labels(ids, source.labels[positions], pixels, seed))
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    try:
        tmp.mkdir(parents=True)
        _write(tmp, source, positions, ids, result)
        os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return result


def _against_labels(ids, labels, pixels, seed: int) -> dict:
    from dmlrun.clustering import adjusted_mutual_info, kmeans, normalized_mutual_info

    out = {"nmi": round(normalized_mutual_info(ids, labels), 4),
           "ami": round(adjusted_mutual_info(ids, labels), 4)}
    if pixels is not None:
        raw = kmeans(pixels.float() / 255.0, int(ids.max()) + 1, seed=seed)
        out["raw_pixels"] = {"nmi": round(normalized_mutual_info(raw, labels), 4),
                             "ami": round(adjusted_mutual_info(raw, labels), 4)}
    return out


def _write(folder: Path, source, positions, ids, result: dict) -> None:
    import torch

    from dmlrun.pages import write_cluster_page

    has_labels = source.labels is not None
    with open(folder / "assignments.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["name", "cluster", *(["label"] if has_labels else [])])
        for p, c in zip(positions.tolist(), ids.tolist(), strict=True):
            w.writerow([source.names[p], c, *([int(source.labels[p])] if has_labels else [])])
    (folder / "clusters.json").write_text(json.dumps(result, indent=1) + "\n")
    g = torch.Generator().manual_seed(0)
    sheets = []
    for c, size in enumerate(result["sizes"]):
        members = positions[ids == c]
        shown = members[torch.randperm(len(members), generator=g)[:SHEET_IMAGES]].sort().values
        text = ""
        if has_labels:
            counts = torch.bincount(source.labels[members])
            top = int(counts.argmax())
            name = source.class_names[top] if source.class_names else str(top)
            text = f"most common label: {name} ({float(counts[top]) / size:.0%})"
        sheets.append((c, size, text, [(source.display(int(i)), source.short_name(int(i)))
                                       for i in shown]))
    where = source.spec.get("folder") or " ".join([*source.spec["dataset"],
                                                   f"split={source.spec['split']}"])
    facts = (f"<p>source: {html.escape(where)}<br>run: {html.escape(result['run'])}<br>"
             + html.escape(", ".join(f"{k}: {result[k]}" for k in (
                 "images", "method", "k", "silhouette", "nmi", "ami") if k in result))
             + "</p>")
    write_cluster_page(folder / "clusters.html", f"Clusters of {len(positions)} images", sheets,
                       facts)


def _k_range(text: str) -> tuple[int, int]:
    try:
        lo, hi = (int(v) for v in text.split(":"))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected LO:HI, e.g. 2:20, got {text!r}") from exc
    return lo, hi


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dmlrun-cluster",
        description="Cluster images by a trained dmlrun model's embedding; writes "
                    "assignments.csv, clusters.json and clusters.html into a new folder.",
        epilog="examples:\n"
               "  dmlrun-cluster outputs/2026-12-06/10-00-00 dataset=mnist split=test "
               "--out clusters --k 10\n"
               "  dmlrun-cluster outputs/2026-12-06/10-00-00 ~/photos --out groups "
               "--k-range 2:30\n"
               "  dmlrun-cluster outputs/2026-12-06/10-00-00 ~/photos --out groups "
               "--threshold 0.5",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="a run folder (best.pt, else last.pt) or a checkpoint file")
    p.add_argument("source", nargs="+", help="an image folder (any depth), or dataset "
                                             "settings such as dataset=mnist split=test")
    p.add_argument("--out", required=True, help="the folder to create (must not exist)")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--k", type=int, help="k-means with this many clusters")
    how.add_argument("--k-range", type=_k_range, metavar="LO:HI",
                     help="k-means for each k in LO..HI, keep the best silhouette (default "
                          "2:20)")
    how.add_argument("--threshold", type=float,
                     help="agglomerative clustering (average linkage) cut at this distance, "
                          "in the run's distance")
    p.add_argument("--labels", action="store_true",
                   help="folder source: its first-level sub-folders are labels (for NMI)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_intermixed_args(argv)  # settings after options too
    return run_command("dmlrun-cluster", lambda: _cluster(args))


def _cluster(args: argparse.Namespace) -> int:
    r = run_clustering(args.run, args.source, Path(args.out), args.k, args.k_range,
                       args.threshold, args.labels, args.device, args.seed)
    print(f"{r['images']} images -> {r['k']} clusters ({r['method']}), silhouette "
          f"{r['silhouette']:.4f}; sizes {r['sizes'][:12]}{' ...' if len(r['sizes']) > 12 else ''}")
    if r["skipped"]:
        print(f"skipped {r['skipped']} unreadable images (named in clusters.json)")
    if "nmi" in r:
        base = r.get("raw_pixels")
        print(f"against the labels: NMI {r['nmi']:.4f}, AMI {r['ami']:.4f}"
              + (f" (raw pixels, same k: NMI {base['nmi']:.4f}, AMI {base['ami']:.4f})"
                 if base else ""))
    print(f"wrote {args.out}/assignments.csv, clusters.json, clusters.html")
    return 0


if __name__ == "__main__":
    sys.exit(main())
