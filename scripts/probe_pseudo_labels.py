"""How right can pseudo-labels get from a semi-supervised run's embedding?

    python scripts/probe_pseudo_labels.py outputs/<semi run>
    python scripts/probe_pseudo_labels.py outputs/<semi run> --variants --views 4

For a run of the semi_supervised task (its best.pt, else last.pt, and its
labeled_indices.json), this embeds the run's training images and reports:

- the share of unlabeled training images that label propagation (the shipped
  `semi=propagation` settings) labels right from the run's labels, and with --variants
  the same for other propagation settings (iterations, k, no PCA, no class balancing);
- kNN (k=5) accuracy and P@1 with the true labels, leave-one-out, on 10,000 training
  images and on the test set: how well the embedding sorts training images against test
  ones;
- with --views N, propagation on features averaged over the plain image and N views
  warped by the shipped `augment=affine`;
- for a run trained on part of the training set (`dataset.train_size`), the same for the
  training images it never saw (graph: the labeled images and those), beside the ones it
  trained on: a model that memorised its own wrong pseudo-labels would label unseen
  images better.

Needs the data root (DMLRUN_DATA_DIR or --data).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from dmlrun.augment import RandomAffine
from dmlrun.checkpoint import resolve_checkpoint
from dmlrun.data.dataset import images_to_float
from dmlrun.embedder import RunEmbedding
from dmlrun.errors import UserError
from dmlrun.evaluate_cli import load_dataset
from dmlrun.metrics import retrieval_metrics
from dmlrun.semi.labels import LabelPropagation

VARIANTS = {
    "shipped (k 10, 50 iterations, 32 PCA dims, balanced)": {},
    "20 iterations": {"iterations": 20},
    "200 iterations": {"iterations": 200},
    "1000 iterations": {"iterations": 1000},
    "k 5": {"k": 5},
    "k 20": {"k": 20},
    "no PCA": {"pca_dims": None},
    "no class balancing": {"balance": False},
}


def pseudo_accuracy(features: torch.Tensor, truth: torch.Tensor, labeled: torch.Tensor,
                    num_classes: int, **settings) -> float:
    """Share of the non-labeled rows of (N, D) ``features`` that propagation from the
    ``labeled`` rows' true labels labels right."""
    pseudo = LabelPropagation(**settings)(features, labeled, truth[labeled], num_classes)
    unlabeled = torch.ones(len(truth), dtype=torch.bool)
    unlabeled[labeled] = False
    return (pseudo.labels.cpu() == truth)[unlabeled].float().mean().item()


def sorting(features: torch.Tensor, truth: torch.Tensor, n: int = 10_000) -> str:
    """kNN (k=5) accuracy and P@1 with the true labels on ``n`` seeded rows."""
    rows = torch.randperm(len(truth), generator=torch.Generator().manual_seed(0))[:n]
    m = retrieval_metrics(features[rows], truth[rows])
    return f"kNN {m['knn_accuracy']:.4f}, P@1 {m['precision_at_1']:.4f} ({len(rows)})"


@torch.no_grad()
def warped(run: RunEmbedding, images: torch.Tensor, warp: RandomAffine,
           gen: torch.Generator, batch: int = 4096) -> torch.Tensor:
    """(N, D) embeddings of (N, C, H, W) uint8 ``images``, each warped once by ``warp``."""
    model = run.embedder.model
    return torch.cat([model(warp(images_to_float(images[i:i + batch]), gen))
                      for i in range(0, len(images), batch)])


def rows_within(part: torch.Tensor, whole: torch.Tensor) -> torch.Tensor:
    """Positions in ``whole`` (N, ...) of the rows of ``part`` (M, ...), a subset taken in
    ``whole``'s order (as the seeded split's sorted picks are)."""
    flat_whole, flat_part = whole.flatten(1), part.flatten(1)
    out, j = [], 0
    for i in range(len(flat_whole)):
        if j < len(flat_part) and torch.equal(flat_whole[i], flat_part[j]):
            out.append(i)
            j += 1
    if j != len(flat_part):
        raise SystemExit("the run's training images are not a subset of the full training set")
    return torch.tensor(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run", type=Path, help="semi-supervised run folder")
    ap.add_argument("--variants", action="store_true", help="other propagation settings")
    ap.add_argument("--views", type=int, default=0, help="warped views to average")
    ap.add_argument("--data", default=os.environ.get("DMLRUN_DATA_DIR"), help="data root")
    args = ap.parse_args()
    run = RunEmbedding(resolve_checkpoint(args.run), device="cpu")
    picks = args.run / "labeled_indices.json"
    if not picks.exists():
        raise SystemExit(f"{picks} not found: not a semi-supervised run folder")
    labeled = torch.tensor(json.loads(picks.read_text())["indices"])
    overrides = [f"dataset.root={args.data}"] if args.data else []
    data = load_dataset(run.config, overrides)
    truth, classes = data.train.labels, data.num_classes
    feats = run(data.train.images)
    print(f"{args.run} (epoch {run.epoch}): {len(truth)} training images, {len(labeled)} "
          "labeled")
    for name, settings in VARIANTS.items() if args.variants else list(VARIANTS.items())[:1]:
        acc = pseudo_accuracy(feats, truth, labeled, classes, **settings)
        print(f"  pseudo-labels right, {name}: {100 * acc:.2f}%")
    print(f"  training images: {sorting(feats, truth)}")
    print(f"  test images: {sorting(run(data.test.images), data.test.labels)}")
    if args.views:
        warp = RandomAffine()
        gen = torch.Generator().manual_seed(0)
        views = [feats] + [warped(run, data.train.images, warp, gen)
                           for _ in range(args.views)]
        acc = pseudo_accuracy(torch.stack(views).mean(0), truth, labeled, classes)
        print(f"  pseudo-labels right, features averaged over {args.views} warped views and "
              f"the plain image: {100 * acc:.2f}%")
    if run.config["dataset"].get("train_size") is not None:
        full = load_dataset(run.config, [*overrides, "dataset.train_size=null"])
        seen = torch.zeros(len(full.train.labels), dtype=torch.bool)
        seen[rows_within(data.train.images, full.train.images)] = True
        unseen = torch.nonzero(~seen).flatten()
        nodes = torch.cat([labeled, torch.arange(len(unseen)) + len(truth)])
        all_feats = torch.cat([feats, run(full.train.images[unseen])])
        all_truth = torch.cat([truth, full.train.labels[unseen]])
        graph_feats, graph_truth = all_feats[nodes], all_truth[nodes]
        acc = pseudo_accuracy(graph_feats, graph_truth, torch.arange(len(labeled)), classes)
        print(f"  {len(unseen)} training images the run never saw: pseudo-labels right "
              f"{100 * acc:.2f}%; {sorting(graph_feats[len(labeled):], full.train.labels[unseen])}")


if __name__ == "__main__":
    try:
        main()
    except UserError as exc:  # a missing run, checkpoint or data: one line, not a traceback
        raise SystemExit(f"error: {exc}") from None
