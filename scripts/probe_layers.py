"""How good is each layer of a trained convnet run, and how much does its output layer cost?

    python scripts/probe_layers.py outputs/<run>                # every layer's test metrics
    python scripts/probe_layers.py outputs/<run> --heads 3      # + fresh 2-D heads, 3 seeds

For a run of `model=convnet` or `model=convnet_bn` (its best.pt, else last.pt), this
embeds the MNIST-style test set and grades, leave-one-out as the run did, the output of
every stage: the flattened conv features, each hidden layer of the head, and the
embedding. With --heads N it then trains N fresh 2-D heads (Linear-BatchNorm-PReLU-Linear,
as the run's own head ends) on the frozen output of the first hidden layer, with the
default's loss and miner (soft-margin triplets, batch-hard, Euclidean), P x K = 10 x 25
batches of unaugmented training images, Adam at 3e-3 with a one-cycle schedule, and grades
each on the test set: how far a 2-D layer placed on these features can get, apart from
how the trunk was trained. Needs the data root (DMLRUN_DATA_DIR or --data).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from dmlrun.data.dataset import images_to_float
from dmlrun.embedder import RunEmbedding
from dmlrun.errors import UserError
from dmlrun.evaluate_cli import load_dataset
from dmlrun.losses.triplet import TripletLoss
from dmlrun.metrics import retrieval_metrics
from dmlrun.miners.batch import HardMiner
from dmlrun.models.convnet import ConvNet

SHOWN = ("precision_at_1", "map_at_r", "knn_accuracy")


@torch.no_grad()
def stage_outputs(model: ConvNet, images: torch.Tensor, batch: int = 4096
                  ) -> dict[str, torch.Tensor]:
    """(N, D_stage) features of ``images`` (N, C, H, W) uint8 at each stage: ``conv``, then
    ``hidden1``, ``hidden2``, ... (after each hidden layer's activation), ``embedding``."""
    parts: dict[str, list[torch.Tensor]] = {}
    for start in range(0, len(images), batch):
        x = images_to_float(images[start:start + batch])
        z = model.features((x - model.mean) / model.std).flatten(1)
        outs = [("conv", z)]
        for layer in list(model.head)[1:]:  # the Flatten is done
            z = layer(z)
            if isinstance(layer, nn.PReLU):
                outs.append((f"hidden{len(outs)}", z))
        outs.append(("embedding", F.normalize(z, dim=1) if model.l2_normalize else z))
        for name, value in outs:
            parts.setdefault(name, []).append(value)
    return {name: torch.cat(values) for name, values in parts.items()}


def train_head(features: torch.Tensor, labels: torch.Tensor, seed: int, steps: int = 3000,
               p: int = 10, k: int = 25, lr: float = 3e-3) -> nn.Module:
    """A fresh 2-D head on frozen (N, D) ``features``, trained as the default trains."""
    torch.manual_seed(seed)
    width = features.shape[1]
    head = nn.Sequential(nn.Linear(width, width, bias=False), nn.BatchNorm1d(width),
                         nn.PReLU(), nn.Linear(width, 2))
    loss_fn, miner = TripletLoss(margin=0.0, soft=True), HardMiner()
    opt = torch.optim.Adam(head.parameters(), lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps, pct_start=0.1)
    members = [torch.nonzero(labels == c).flatten() for c in torch.unique(labels)]
    for _ in range(steps):
        classes = torch.randperm(len(members))[:p].tolist()
        idx = torch.cat([members[c][torch.randint(len(members[c]), (k,))] for c in classes])
        emb, y = head(features[idx]), labels[idx]
        loss = loss_fn.compute(emb, y, miner(emb, y).indices).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return head.eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run", type=Path, help="run folder or checkpoint")
    ap.add_argument("--heads", type=int, default=0, help="fresh 2-D heads to train (seeds 0..N-1)")
    ap.add_argument("--data", default=os.environ.get("DMLRUN_DATA_DIR"), help="data root")
    args = ap.parse_args()
    run = RunEmbedding(args.run, device="cpu")
    model = run.embedder.model
    if not isinstance(model, ConvNet):
        raise SystemExit(f"{args.run} is not a convnet run ({type(model).__name__})")
    overrides = [f"dataset.root={args.data}"] if args.data else []
    data = load_dataset(run.config, overrides)
    test = stage_outputs(model, data.test.images)
    print("| stage | dims | test P@1 | MAP@R | kNN (k=5) |\n|---|---|---|---|---|")
    for name, feats in test.items():
        m = retrieval_metrics(feats, data.test.labels)
        print(f"| {name} | {feats.shape[1]} | " + " | ".join(f"{m[s]:.4f}" for s in SHOWN) + " |")
    if args.heads:
        train = stage_outputs(model, data.train.images)["hidden1"]
        print("\n| fresh 2-D head on hidden1, seed | test P@1 | MAP@R | kNN (k=5) |")
        print("|---|---|---|---|")
        for seed in range(args.heads):
            head = train_head(train, data.train.labels, seed)
            with torch.no_grad():
                m = retrieval_metrics(head(test["hidden1"]), data.test.labels)
            print(f"| {seed} | " + " | ".join(f"{m[s]:.4f}" for s in SHOWN) + " |")


if __name__ == "__main__":
    try:
        main()
    except UserError as exc:  # a missing run, checkpoint or data: one line, not a traceback
        raise SystemExit(f"error: {exc}") from None
