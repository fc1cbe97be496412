"""Which recipe makes the default 2-D MNIST run: each lever, measured.

    python scripts/ablate_default.py                  # every arm, seed 0, then the chosen
                                                      # default over seeds 0-2 and 64-D
    python scripts/ablate_default.py --arms contrastive triplet_hard_8
    python scripts/ablate_default.py --list           # the arms and what they change
    python scripts/ablate_default.py --report-only    # tabulate what --out already holds
    python scripts/ablate_default.py --final          # side-by-side timing: the shipped
                                                      # `dmlrun` over seeds 0-2 against the
                                                      # previous default and itself in
                                                      # fp32 (seed 0)
    python scripts/ablate_default.py --write-docs     # also put the tables in docs/results.md

Each arm is a real `dmlrun <overrides> seed=<s>` run (full MNIST: 55,000 train / 5,000
validation / 10,000 test, the hold-out the recipe was chosen with; the arms `default` and
`hinge`, the shipped `dmlrun` and its hinge, hold out 1,000 and train on 59,000; see
VAL_5K) in its own folder under --out; an arm whose folder already holds
summary.json is read, not run again. Arms are chosen on the validation columns (val P@1
and MAP@R of the tested epoch: the best validation epoch, or the last where the arm sets
trainer.select=last, as the shipped default does); the test columns are reported, never
used to choose. Whole-command wall times depend on the machine and
its load: the script prints them and writes the thread count it ran under; compare them
only within one --final run, which alternates the commands on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "docs" / "results.md"
BEGIN, END = "<!-- ablate_default: begin -->", "<!-- ablate_default: end -->"
FINAL_BEGIN = "<!-- ablate_default final: begin -->"
FINAL_END = "<!-- ablate_default final: end -->"

# The previous default (before the recipe below became it): contrastive loss on batch-hard
# pairs, 4 epochs, cosine stepped once per epoch. experiment=contrastive spells it out.
PREVIOUS = ["experiment=contrastive"]
# The hard-triplet recipe of configs/loss_miner/triplet_hard.yaml at the previous budget.
TRIPLET = ["experiment=triplet_hard"]
T8 = [*TRIPLET, "trainer.max_epochs=8"]
T8C = [*T8, "scheduler=cosine_steps"]
BN_PF = [*T8C, "model=convnet_bn", "model.channels=[32,64]", "augment=affine"]
# 5,000 training images held out for validation, as every arm was measured until the
# shipped `dmlrun` took 1,000 (configs/experiment_dataset/default_mnist.yaml: the recipe
# fixed, it trains on the rest); the arms on top of `dmlrun` measured before pin it, so
# they rerun as measured
VAL_5K = ["dataset.val_size=5000"]
# the default's warp on every epoch, as before its last epoch trained unwarped (and with
# 5,000 held out, as then)
EVERY_EPOCH = ["trainer.no_aug_epochs=0", *VAL_5K]
# augment=affine's warp (12 degrees, 2.5 px, scale 0.9-1.1, shear 8 degrees) on every
# epoch, which the default used until it took the weaker one (default_warp_weak, now
# augment=affine_mild); the arms measured beside that default pin it, so they rerun as
# measured
WARP_12 = ["augment=affine", *EVERY_EPOCH]
# the shipped default with the hinge (loss=triplet, margin 1) instead of its soft margin,
# testing the best validation epoch as the default did when these arms were measured
HINGE = ["loss=triplet", "trainer.select=best", *WARP_12]


def warp(degrees: float, shift: float, scale: tuple[float, float], shear: float) -> list[str]:
    """Overrides for a warp of these ranges on every epoch."""
    return [f"augment.degrees={degrees}", f"augment.shift={shift}",
            f"augment.scale=[{scale[0]},{scale[1]}]", f"augment.shear={shear}", *EVERY_EPOCH]


# name -> (overrides, what the arm changes). The arms before the 16/32-channel ones name
# their whole recipe; those from bn_pf_affine_12_ch16 on are overrides on top of `dmlrun`
# alone (they pin trainer.select where the table's rows need it); "default" is exactly the
# shipped `dmlrun`.
ARMS: dict[str, tuple[list[str], str]] = {
    "contrastive": (PREVIOUS, "previous default: contrastive, batch-hard pairs, 4 epochs, "
                              "cosine per epoch"),
    "contrastive_8": ([*PREVIOUS, "trainer.max_epochs=8"], "contrastive, 8 epochs"),
    "contrastive_8_cos_steps": ([*PREVIOUS, "trainer.max_epochs=8", "scheduler=cosine_steps"],
                                "contrastive, 8 epochs, cosine per step to zero"),
    "triplet_hard": (TRIPLET, "hard triplets (growing pools, mean over active, lr 3e-3, "
                              "1-epoch warm-up), 4 epochs, cosine per epoch"),
    "triplet_hard_8": (T8, "hard triplets, 8 epochs, cosine per epoch"),
    "triplet_hard_8_cos_steps": (T8C, "hard triplets, 8 epochs, cosine per step to zero"),
    "triplet_hard_8_cos_steps_ema": ([*T8C, "trainer.ema_decay=0.998"],
                                     "triplet_hard_8_cos_steps, validated and tested on an "
                                     "average of the weights (EMA, decay 0.998)"),
    "triplet_hard_8_cos_steps_lr1e-3": ([*T8C, "optimizer.lr=1e-3"],
                                        "triplet_hard_8_cos_steps at lr 1e-3"),
    "triplet_hard_8_cos_steps_10x50": ([*T8C, "sampler.k=50"],
                                       "triplet_hard_8_cos_steps, 10 x 50 batches (same "
                                       "images, half the steps)"),
    "triplet_hard_8_cos_steps_10x12": ([*T8C, "sampler.k=12"],
                                       "triplet_hard_8_cos_steps, 10 x 12 batches (same "
                                       "images, twice the steps)"),
    "triplet_hard_8_cos_steps_l2": ([*T8C, "model.l2_normalize=true", "loss.margin=0.2"],
                                    "triplet_hard_8_cos_steps, L2-normalised embedding "
                                    "(unit circle), margin 0.2"),
    "triplet_hard_8_cos_steps_bn": ([*T8C, "model.batch_norm=true"],
                                    "triplet_hard_8_cos_steps, BatchNorm after every conv "
                                    "and hidden linear layer"),
    "triplet_hard_8_cos_steps_bn_64d": ([*T8C, "model.batch_norm=true",
                                         "model.embedding_dim=64"],
                                        "triplet_hard_8_cos_steps_bn in 64-D"),
    "triplet_hard_8_cos_steps_bn_affine": ([*T8C, "model.batch_norm=true", "augment=affine"],
                                           "triplet_hard_8_cos_steps_bn with random affine "
                                           "augmentation"),
    "triplet_hard_8_cos_steps_bn_affine_64d": ([*T8C, "model.batch_norm=true",
                                                "augment=affine", "model.embedding_dim=64"],
                                               "triplet_hard_8_cos_steps_bn_affine in 64-D"),
    "triplet_hard_8_cos_steps_affine": ([*T8C, "augment=affine"],
                                        "triplet_hard_8_cos_steps with random affine "
                                        "augmentation"),
    "triplet_hard_8_cos_steps_affine_lr1e-3": ([*T8C, "augment=affine", "optimizer.lr=1e-3"],
                                               "triplet_hard_8_cos_steps_affine at lr 1e-3"),
    "contrastive_8_cos_steps_affine": ([*PREVIOUS, "trainer.max_epochs=8",
                                        "scheduler=cosine_steps", "augment=affine"],
                                       "contrastive_8_cos_steps with random affine "
                                       "augmentation"),
    # with model=convnet_bn's BatchNorm and max-pooling before each conv block's PReLU (the
    # same function, faster; dmlrun/models/convnet.py), first at the plain convnet's width
    "bn_pf_affine_8": (BN_PF, "triplet_hard_8_cos_steps_bn_affine with max-pooling before "
                              "each PReLU (model=convnet_bn at 32 and 64 channels)"),
    "bn_pf_affine_6": ([*BN_PF, "trainer.max_epochs=6"], "bn_pf_affine_8, 6 epochs"),
    "bn_pf_affine_7": ([*BN_PF, "trainer.max_epochs=7"], "bn_pf_affine_8, 7 epochs"),
    "bn_pf_affine_8_wd": ([*BN_PF, "optimizer.weight_decay=5e-4"],
                          "bn_pf_affine_8, L2 weight decay 5e-4"),
    "bn_pf_affine_8_lr6e-3": ([*BN_PF, "optimizer.lr=6e-3"], "bn_pf_affine_8 at lr 6e-3"),
    "bn_pf_elastic_8": ([*BN_PF, "augment=elastic"],
                        "bn_pf_affine_8 with an elastic distortion on top of the warp"),
    "bn_pf_affine_8_ch16": ([*BN_PF, "model.channels=[16,32]"],
                            "bn_pf_affine_8 with 16- and 32-channel conv blocks (half the "
                            "time per step)"),
    "bn_pf_affine_16_ch16": ([*BN_PF, "model.channels=[16,32]", "trainer.max_epochs=16"],
                             "bn_pf_affine_8_ch16, 16 epochs"),
    "bn_pf_affine_12_ch16": (HINGE, "bn_pf_affine_8_ch16 for 12 epochs"),
    "bn_pf_affine_12_ch16_64d": ([*HINGE, "model.embedding_dim=64"],
                                 "bn_pf_affine_12_ch16 in 64-D"),
    "bn_pf_affine_12_ch16_10x12": ([*HINGE, "sampler.k=12"],
                                   "bn_pf_affine_12_ch16 on 10 x 12 batches (same images, "
                                   "twice the steps)"),
    "bn_pf_elastic_12_ch16": ([*HINGE, "augment=elastic"],
                              "bn_pf_affine_12_ch16 with an elastic distortion on top of the "
                              "warp"),
    "bn_pf_elastic_16_ch16": ([*HINGE, "augment=elastic", "trainer.max_epochs=16"],
                              "bn_pf_elastic_12_ch16, 16 epochs"),
    "hinge": (["loss=triplet"], "the shipped `dmlrun` with the hinge (loss=triplet, margin "
                                "1), its last epoch tested"),
    # the arms below to default_sgd were measured beside the default of the 12-degree warp
    # (default_warp12) and change it in one thing
    "default_best": (["trainer.select=best", *WARP_12],
                     "default_warp12 testing its best validation epoch (the default until "
                     "it tested its last)"),
    "default_hidden512": (["model.hidden_dim=512", *WARP_12],
                          "default_warp12 with hidden layers of 512 instead of 256"),
    "default_adamw": (["optimizer=adamw", *WARP_12],
                      "default_warp12 with AdamW: weight decay 0.05 decoupled from Adam's "
                      "moments"),
    "default_adamw_wd0.2": (["optimizer=adamw", "optimizer.weight_decay=0.2",
                             "trainer.select=best", *WARP_12],
                            "default_best with AdamW at weight decay 0.2"),
    "default_sgd": (["optimizer=sgd", "optimizer.lr=0.2", "optimizer.weight_decay=5e-4",
                     *WARP_12],
                    "default_warp12 with SGD: Nesterov momentum 0.9, lr 0.2, weight decay "
                    "5e-4"),
    "default_warp_strong": (warp(15, 3, (0.85, 1.15), 10),
                            "the shipped `dmlrun` with a stronger warp: 15 degrees, 3 px, "
                            "scale 0.85-1.15, shear 10 degrees"),
    "default_warp_weak": (warp(8, 1.5, (0.93, 1.07), 5),
                          "a weaker warp: 8 degrees, 1.5 px, scale 0.93-1.07, shear 5 "
                          "degrees (augment=affine_mild, which the shipped `dmlrun` took "
                          "when it met the rule), on every epoch"),
    "default_warp_milder": (warp(5, 1, (0.95, 1.05), 3),
                            "the shipped `dmlrun` with a milder warp still: 5 degrees, 1 px, "
                            "scale 0.95-1.05, shear 3 degrees"),
    "default_aug_every_epoch": (EVERY_EPOCH, "the shipped `dmlrun` warping every epoch, "
                                             "its last too (the default before it trained "
                                             "its last epoch unwarped)"),
    "default_warp12": (WARP_12, "the shipped `dmlrun` with augment=affine's warp (12 "
                                "degrees, 2.5 px, scale 0.9-1.1, shear 8 degrees): the "
                                "default before the weaker warp"),
    "default_val5k": (VAL_5K, "the shipped `dmlrun` holding out 5,000 training images, "
                              "as the recipe was chosen (the default before it trained on "
                              "59,000)"),
    "vgg_64d_val5k": (["model=vgg", "model.embedding_dim=64", *VAL_5K],
                      "the shipped `dmlrun` in 64-D with model=vgg (two 3x3 conv layers per "
                      "block at full resolution, 16 and 32 channels), 5,000 held out"),
    "vgg_val5k": (["model=vgg", *VAL_5K], "vgg_64d_val5k in 2-D"),
    "vgg_64d": (["model=vgg", "model.embedding_dim=64"],
                "the shipped `dmlrun` in 64-D with model=vgg, 1,000 held out, 59,000 trained "
                "on"),
    "default": ([], "the shipped `dmlrun`: bn_pf_affine_12_ch16 with the soft margin "
                    "softplus(d_ap - d_an) (Hermans et al. 2017) and the weaker warp, off "
                    "for the last epoch, which is tested; 1,000 images held out, 59,000 "
                    "trained on"),
    # trainer.amp=auto trains in bf16 on CPUs with AMX tiles (this project's machine) and
    # in fp32 on others: this arm is the shipped run as such a CPU runs it
    "default_fp32": (["trainer.amp=false"], "the shipped `dmlrun` in fp32 (trainer.amp=false)"),
}
CHOSEN_SEEDS = [0, 1, 2]


def run_arm(name: str, seed: int, out: Path, extra: list[str] | None = None,
            run: bool = True, tag: str = "") -> dict | None:
    """Run (or read) one arm; its row (None: not run, and ``run`` is off)."""
    extra = extra or []
    folder = out / f"{name}{tag}-s{seed}"
    wall = None
    if not (folder / "summary.json").exists():
        if not run:
            return None
        overrides = [*ARMS[name][0], *extra, f"seed={seed}", f"hydra.run.dir={folder}",
                     "trainer.progress_bar=false"]
        print(f"running {name}{tag} (seed {seed}) ...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "dmlrun", *overrides],
                              capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if done.returncode:
            raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
        (folder / "command_seconds.txt").write_text(
            f"{wall:.1f} {os.environ.get('OMP_NUM_THREADS', 'all')}\n")
    summary = json.loads((folder / "summary.json").read_text())
    epochs = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
    timing = folder / "command_seconds.txt"
    if wall is None and timing.exists():
        wall = float(timing.read_text().split()[0])
    threads = timing.read_text().split()[1] if timing.exists() else "?"
    return {"arm": f"{name}{tag}", "seed": seed, "epochs": len(epochs),
            "steps": sum(1 for _ in (folder / "steps.jsonl").open()),
            # the tested epoch's (trainer.select: the best validation epoch or the last)
            "val_p_at_1": summary["val"]["precision_at_1"],
            "val_map_at_r": summary["val"]["map_at_r"],
            "p_at_1": summary["test"]["precision_at_1"], "map_at_r": summary["test"]["map_at_r"],
            "wall_seconds": wall, "threads": threads,
            "collapsed": any(w in (folder / "dmlrun.log").read_text()
                             for w in ("collapsed", "stuck at the margin")),
            "what": ARMS[name][1] + (f" ({' '.join(extra)})" if extra else "")}


def table(rows: list[dict]) -> str:
    head = ("| arm | seed | epochs | steps | val P@1 | val MAP@R | test P@1 | "
            "test MAP@R | collapse warning | what it is |\n" + "|---" * 10 + "|")
    body = [f"| {r['arm']} | {r['seed']} | {r['epochs']} | {r['steps']} | "
            f"{r['val_p_at_1']:.4f} | {r['val_map_at_r']:.4f} | {r['p_at_1']:.4f} | "
            f"{r['map_at_r']:.4f} | {'yes' if r['collapsed'] else 'no'} | {r['what']} |"
            for r in rows]
    return "\n".join([head, *body])


def seed_summary(rows: list[dict]) -> str:
    """Mean +- sd (n - 1) and min of every arm run on more than one seed."""
    lines = ["| arm | seeds | test P@1 | test MAP@R |", "|---" * 4 + "|"]
    for arm in dict.fromkeys(r["arm"] for r in rows):
        runs = [r for r in rows if r["arm"] == arm]
        if len(runs) < 2:
            continue
        cells = []
        for key in ("p_at_1", "map_at_r"):
            v = [r[key] for r in runs]
            cells.append(f"{statistics.mean(v):.4f} +- {statistics.stdev(v):.4f} "
                         f"(min {min(v):.4f})")
        lines.append(f"| {arm} | {', '.join(str(r['seed']) for r in runs)} | {cells[0]} | "
                     f"{cells[1]} |")
    return "\n".join(lines) if len(lines) > 2 else ""


def final(out: Path, rounds: int) -> str:
    """The shipped `dmlrun` on seeds 0, 1, 2, the previous default and the shipped run in
    fp32 on seed 0, in alternation (previous, fp32, new seed 0, 1, 2 per round), fresh
    folders, whole-command wall time; the acceptance check of the default."""
    rows = []
    labels = {"contrastive": "previous default", "default_fp32": "fp32 on the CPU"}
    for r in range(rounds):
        for name, seed in [("contrastive", 0), ("default_fp32", 0),
                           *(("default", s) for s in CHOSEN_SEEDS)]:
            folder = out / f"final-r{r}-{name}-s{seed}"
            if folder.exists():
                raise SystemExit(f"{folder} exists: --final times fresh runs; use another --out")
            print(f"final round {r + 1}: {name} seed {seed} ...", file=sys.stderr, flush=True)
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-m", "dmlrun", *ARMS[name][0], f"seed={seed}",
                            f"hydra.run.dir={folder}", "trainer.progress_bar=false"],
                           check=True, capture_output=True)
            wall = time.perf_counter() - t0
            test = json.loads((folder / "summary.json").read_text())["test"]
            rows.append((r, name, seed, wall, test["precision_at_1"], test["map_at_r"]))
    threads = os.environ.get("OMP_NUM_THREADS", f"all {os.cpu_count()} cores")
    lines = [f"Threads: {threads}; {os.cpu_count()} CPUs visible.", "",
             "| round | command | seed | whole command, s | x previous default | test P@1 | "
             "test MAP@R | P@1 >= 0.99 and MAP@R >= 0.98 | within 150 s (or 150/70 x the "
             "previous default) |", "|---" * 9 + "|"]
    previous = {r: wall for r, name, _, wall, _, _ in rows if name == "contrastive"}
    for r, name, seed, wall, p1, mapr in rows:
        command = "`dmlrun`" if name == "default" else "`dmlrun " + " ".join(
            ARMS[name][0]) + f"` ({labels[name]})"
        ok = "yes" if p1 >= 0.99 and mapr >= 0.98 else "no"
        ratio = wall / previous[r]
        fast = "yes" if wall <= 150 or ratio <= 150 / 70 else "no"
        lines.append(f"| {r + 1} | {command} | {seed} | {wall:.1f} | {ratio:.2f} | {p1:.4f} | "
                     f"{mapr:.4f} | {ok if name == 'default' else '-'} | "
                     f"{fast if name == 'default' else '-'} |")
    return "\n".join(lines)


def write_docs(section: str, begin: str = BEGIN, end: str = END) -> None:
    """Replace the text between the markers in docs/results.md with ``section``."""
    text = RESULTS.read_text()
    pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.S)
    if not pattern.search(text):
        raise SystemExit(f"{RESULTS} has no {begin} ... {end} block")
    RESULTS.write_text(pattern.sub(lambda _: f"{begin}\n{section}\n{end}", text))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--chosen-seeds", nargs="+", type=int, default=CHOSEN_SEEDS,
                        help="seeds of the default arm (and of its 64-D run)")
    parser.add_argument("--no-64d", action="store_true",
                        help="skip the default at model.embedding_dim=64")
    parser.add_argument("--out", type=Path, default=Path("outputs/ablate_default"))
    parser.add_argument("--list", action="store_true", help="print the arms and exit")
    parser.add_argument("--report-only", action="store_true",
                        help="tabulate the arms already run under --out; run nothing")
    parser.add_argument("--final", action="store_true",
                        help="instead of the arms: time the shipped `dmlrun` (seeds 0-2) "
                             "against the previous default and itself in fp32 (seed 0), "
                             "alternating")
    parser.add_argument("--rounds", type=int, default=1, help="rounds of --final")
    parser.add_argument("--write-docs", action="store_true",
                        help="write the tables into docs/results.md")
    args = parser.parse_args()
    if args.list:
        for name, (overrides, what) in ARMS.items():
            print(f"{name:34s} {what}\n{'':34s} {' '.join(overrides) or '(no overrides)'}")
        return
    args.out.mkdir(parents=True, exist_ok=True)
    if args.final:
        text = final(args.out, args.rounds)
        (args.out / "final.md").write_text(text + "\n")
        print(text)
        if args.write_docs:
            write_docs(text, FINAL_BEGIN, FINAL_END)
        return
    rows = []
    for arm in args.arms:
        seeds = args.chosen_seeds if arm == "default" else args.seeds
        rows += [r for s in seeds if (r := run_arm(arm, s, args.out, run=not args.report_only))]
    if "default" in args.arms and not args.no_64d:
        rows += [r for s in args.chosen_seeds[:1] if (r := run_arm(
            "default", s, args.out, ["model.embedding_dim=64"], not args.report_only, "_64d"))]
    text = "\n\n".join(part for part in (table(rows), seed_summary(rows)) if part)
    (args.out / "ablation.md").write_text(text + "\n")
    (args.out / "ablation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(text)
    if args.write_docs:
        write_docs(text)


if __name__ == "__main__":
    main()
