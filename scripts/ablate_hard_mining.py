"""What makes `dmlrun loss=triplet miner=hard` train: each lever, measured.

    python scripts/ablate_hard_mining.py                 # every arm, 2-D and 64-D, seed 0,
                                                         # then the default over seeds 0-2
    python scripts/ablate_hard_mining.py --arms default plain --dims 2 --seeds 0 1 2
    python scripts/ablate_hard_mining.py --list          # the arms and what they change
    python scripts/ablate_hard_mining.py --time-rounds 2 # wall time against the contrastive
                                                         # recipe (experiment=contrastive)

Each arm is a real `dmlrun experiment=triplet_hard <overrides>` run (full MNIST, 4
epochs, P x K = 10 x 25 unless the arm says otherwise) in its own folder under --out;
an arm whose folder already holds summary.json is read, not run again. The table (test
P@1 / MAP@R with the best-validation checkpoint, the last epoch's loss per triplet and
inverted fraction, collapse warnings) is printed as Markdown and written to
<out>/ablation.md. Wall times come from --time-rounds, run on a quiet machine.

The `pml` arm trains pytorch-metric-learning's BatchHardMiner + TripletMarginLoss
(margin 1, its default reducer, unnormalised Euclidean distance as dmlrun's) inside the
same loop, on the same batches: the peers' batch-hard, as the collapsing reference.
Needs the [dev] extras.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from dmlrun.losses.base import LossOutput, MetricLoss
from dmlrun.miners.base import Miner

REPO = Path(__file__).resolve().parents[1]

# name -> (overrides on top of `loss=triplet miner=hard`, what the arm changes). PLAIN undoes
# loss_miner/triplet_hard.yaml and loss_miner_optimizer/triplet_hard_adam.yaml.
DEFAULTS = ["loss.reduction=mean", "optimizer.lr=1e-3", "trainer.warmup_epochs=0"]
PLAIN = ["miner.pool_k=null", "miner.grow=false", *DEFAULTS]
POOLS = ["miner.pool_k=2", "miner.grow=false", *DEFAULTS]
ARMS: dict[str, tuple[list[str], str]] = {
    "plain": (PLAIN, "plain batch-hard: whole 10 x 25 batch, hinge, mean, lr 1e-3, no warm-up"),
    "pml": (PLAIN + ["loss._target_=ablate_hard_mining.PMLTripletMarginLoss",
                     "miner._target_=ablate_hard_mining.PMLBatchHardMiner"],
            "pytorch-metric-learning BatchHardMiner + TripletMarginLoss, same batches"),
    "small_batch": (PLAIN + ["sampler.k=2"],
                    "plain, on 10 x 2 batches (2,750 steps per epoch)"),
    "low_lr": (PLAIN + ["optimizer.lr=1e-4"], "plain, lr 1e-4"),
    "high_lr": (PLAIN + ["optimizer.lr=3e-3"], "plain, lr 3e-3"),
    "warmup": (PLAIN + ["trainer.warmup_epochs=1"], "plain, linear warm-up over epoch 1"),
    "squared": (PLAIN + ["distance=squared"], "plain, squared Euclidean distance"),
    "soft": (PLAIN + ["loss.soft=true", "loss.margin=0"],
             "plain, soft margin softplus(d_ap - d_an)"),
    "mean_active": (PLAIN + ["loss.reduction=mean_active"],
                    "plain, mean over triplets with non-zero loss"),
    "push": (PLAIN + ["loss.inverted=push"],
             "plain; inverted triplets only push the negative out to the margin"),
    "pools": (POOLS, "mining pools of 10 x 2 inside each 10 x 25 batch"),
    "pools_grow_half": (POOLS + ["miner.grow=true", "miner.max_inverted=0.5"],
                        "pools, growing while at most 50% of triplets are inverted"),
    "pools_grow": (POOLS + ["miner.grow=true", "miner.max_inverted=0.1"],
                   "pools, growing while at most 10% of triplets are inverted"),
    "pools_grow_active": (POOLS + ["miner.grow=true", "miner.max_inverted=0.1",
                                   "loss.reduction=mean_active"],
                          "pools_grow, mean over triplets with non-zero loss"),
    "pools_grow_active_lr": (POOLS + ["miner.grow=true", "miner.max_inverted=0.1",
                                      "loss.reduction=mean_active", "optimizer.lr=3e-3"],
                             "pools_grow_active, lr 3e-3 (no warm-up)"),
    "default": ([], "the shipped default: pools_grow_active, lr 3e-3, warm-up over epoch 1"),
}


class PMLTripletMarginLoss(MetricLoss):
    """pytorch-metric-learning's TripletMarginLoss behind dmlrun's loss contract."""

    accepts = ("triplets",)
    distance_params = ("margin",)

    def __init__(self, distance=None, margin: float = 1.0, **_ignored) -> None:
        from pytorch_metric_learning import distances, losses

        super().__init__(distance)
        self.margin = margin
        lp = distances.LpDistance(normalize_embeddings=False)  # dmlrun's euclidean
        self.pml = losses.TripletMarginLoss(margin=margin, distance=lp)

    def _compute(self, embeddings, labels, indices) -> LossOutput:
        n = torch.tensor(len(indices[0]), device=embeddings.device)
        loss = self.pml(embeddings, labels, indices)
        a, p, neg = indices
        d = torch.cdist(embeddings, embeddings)
        active = ((d[a, p] - d[a, neg] + self.margin) > 0).sum()
        return LossOutput(loss, n, active)


class PMLBatchHardMiner(Miner):
    """pytorch-metric-learning's BatchHardMiner behind dmlrun's miner contract."""

    def __init__(self, distance=None, **_ignored) -> None:
        from pytorch_metric_learning import distances, miners

        super().__init__(distance)
        self.pml = miners.BatchHardMiner(distance=distances.LpDistance(normalize_embeddings=False))

    def mine(self, embeddings, labels):
        return self.pml(embeddings, labels)


def run_arm(name: str, dim: int, seed: int, out: Path, run: bool = True) -> dict | None:
    """Run (or read) one arm; its row of the table (None: not run, and ``run`` is off)."""
    folder = out / f"{name}-d{dim}-s{seed}"
    if not (folder / "summary.json").exists():
        if not run:
            return None
        # experiment=triplet_hard: loss=triplet miner=hard on the 4-epoch budget this
        # ablation was measured on (the default experiment has its own epochs and schedule)
        overrides = ["experiment=triplet_hard", *ARMS[name][0],
                     f"model.embedding_dim={dim}", f"seed={seed}",
                     f"hydra.run.dir={folder}", "trainer.progress_bar=false"]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [str(REPO / "scripts"), os.environ.get("PYTHONPATH", "")])}
        print(f"running {name} (dim {dim}, seed {seed}) ...", file=sys.stderr, flush=True)
        done = subprocess.run([sys.executable, "-m", "dmlrun", *overrides], env=env,
                              capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
    summary = json.loads((folder / "summary.json").read_text())
    epochs = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
    log = (folder / "dmlrun.log").read_text()
    return {"arm": name, "dim": dim, "seed": seed,
            "p_at_1": summary["test"]["precision_at_1"], "map_at_r": summary["test"]["map_at_r"],
            "train_loss": epochs[-1]["train_loss"],
            "tuple_loss": epochs[-1].get("train_tuple_loss", epochs[-1]["train_loss"]),
            "inverted": epochs[-1].get("inverted_fraction", float("nan")),
            "collapse_warning": "collapsed" in log or "stuck at the margin" in log,
            "wall_seconds": summary["wall_seconds"]}


def table(rows: list[dict]) -> str:
    head = ("| arm | dim | seed | test P@1 | test MAP@R | last epoch: loss per triplet | "
            "inverted | collapse warning | what it changes |\n" + "|---" * 9 + "|")
    body = [f"| {r['arm']} | {r['dim']} | {r['seed']} | {r['p_at_1']:.4f} | "
            f"{r['map_at_r']:.4f} | {r['tuple_loss']:.4f} | {r['inverted']:.3f} | "
            f"{'yes' if r['collapse_warning'] else 'no'} | {ARMS[r['arm']][1]} |"
            for r in rows]
    return "\n".join([head, *body])


def seed_summary(rows: list[dict]) -> str:
    """Mean +- standard deviation (n - 1) of the default arm over its seeds, per dim."""
    lines = ["| default over seeds | dim | seeds | test P@1 | test MAP@R |", "|---" * 5 + "|"]
    for dim in sorted({r["dim"] for r in rows}):
        runs = [r for r in rows if r["arm"] == "default" and r["dim"] == dim]
        if len(runs) < 2:
            continue
        cells = []
        for key in ("p_at_1", "map_at_r"):
            v = torch.tensor([r[key] for r in runs], dtype=torch.float64)
            cells.append(f"{float(v.mean()):.4f} +- {float(v.std()):.4f} "
                         f"(min {float(v.min()):.4f})")
        lines.append(f"| `loss=triplet miner=hard` | {dim} | "
                     f"{', '.join(str(r['seed']) for r in runs)} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)


def time_against_default(rounds: int, out: Path) -> str:
    """Whole-command wall time of `dmlrun` and `dmlrun loss=triplet miner=hard`, run in
    alternation (so both see the same machine), fresh folders each time."""
    commands = {"dmlrun experiment=contrastive": ["experiment=contrastive"],
                "dmlrun experiment=triplet_hard": ["experiment=triplet_hard"]}
    seconds: dict[str, list[float]] = {name: [] for name in commands}
    for r in range(rounds):
        for i, (name, args) in enumerate(commands.items()):
            folder = out / f"timing-{i}-r{r}"
            shutil.rmtree(folder, ignore_errors=True)
            print(f"timing {name} (round {r + 1}) ...", file=sys.stderr, flush=True)
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-m", "dmlrun", *args, f"hydra.run.dir={folder}",
                            "trainer.progress_bar=false"], check=True, capture_output=True)
            seconds[name].append(time.perf_counter() - t0)
    base = seconds["dmlrun experiment=contrastive"]
    lines = ["| command | wall seconds per round | mean | ratio to `dmlrun experiment=contrastive` "
             "|", "|---" * 4 + "|"]
    for name, values in seconds.items():
        mean = sum(values) / len(values)
        lines.append(f"| `{name}` | {', '.join(f'{v:.1f}' for v in values)} | {mean:.1f} | "
                     f"{mean / (sum(base) / len(base)):.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS))
    parser.add_argument("--dims", nargs="+", type=int, default=[2, 64])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0],
                        help="seeds for every arm (the default arm also runs --default-seeds)")
    parser.add_argument("--default-seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=Path("outputs/ablate_hard_mining"))
    parser.add_argument("--list", action="store_true", help="print the arms and exit")
    parser.add_argument("--report-only", action="store_true",
                        help="tabulate the arms already run under --out; run nothing")
    parser.add_argument("--time-rounds", type=int, default=0,
                        help="instead of the arms: time `dmlrun` against `dmlrun loss=triplet "
                             "miner=hard` over this many alternating rounds")
    args = parser.parse_args()
    if args.time_rounds:
        text = time_against_default(args.time_rounds, args.out)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "timing.md").write_text(text + "\n")
        print(text)
        return
    if args.list:
        for name, (overrides, what) in ARMS.items():
            print(f"{name:12s} {what}\n{'':12s} {' '.join(overrides) or '(no overrides)'}")
        return
    def seeds(arm: str) -> list[int]:
        extra = args.default_seeds if arm == "default" else []
        return list(dict.fromkeys([*args.seeds, *extra]))

    runs = [(a, d, s) for d in args.dims for a in args.arms for s in seeds(a)]
    rows = [r for a, d, s in runs if (r := run_arm(a, d, s, args.out, not args.report_only))]
    text = table(rows) + "\n\n" + seed_summary(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ablation.md").write_text(text + "\n")
    (args.out / "ablation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(text)


if __name__ == "__main__":
    main()
