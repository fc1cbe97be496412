"""100 labels, 64-D: three teachers and their student, one command per seed.

    python scripts/semi_teachers.py --out outputs/semi_teachers --seeds 0 1 2
    python scripts/semi_teachers.py --out outputs/semi_teachers --seeds 0 1 2 --write-docs
    python scripts/semi_teachers.py --out /tmp/t --seeds 0 -- dataset.train_size=5000
    python scripts/semi_teachers.py --students-of outputs/semi_teachers \
        --out outputs/semi_students --seeds 0 --write-docs      # the student's levers

For each seed S, in a fresh folder --out/s<S>/:

1. teacher_1 .. teacher_N: `dmlrun experiment=semi_propagation_64d seed=<100 k + S>
   dataset.split_seed=S`, the shipped 64-D preset with other initialisations and
   batches and the same validation and labeled images as the student (without the
   baselines and epoch plots);
2. student: `dmlrun experiment=semi_teachers_64d seed=S dataset.split_seed=S
   semi.teachers=[teacher_1,...]`: pseudo-labels from label propagation over the
   teachers' unit-length embeddings side by side, then the default's supervised recipe
   in 64-D on them, distilling the teachers' distances as it trains (semi.distill).

It prints (and with --write-docs puts in docs/results.md) each seed's teachers' and
student's test P@1, the share of pseudo-labels right, and the wall time of the whole
chain: the student's time includes its teachers'. Run it on a quiet machine; the
thread count is written beside the table. Overrides after `--` go to every run.

With --students-of <folder of earlier chains>, it trains no teachers: for each seed it
trains the student arms (STUDENT_ARMS, or --arms) on that folder's teachers into
--out/s<S>/<arm> (an arm whose folder holds summary.json is read, not run again) and
tabulates their validation MAP@R (the 100 held-out images: what chooses) and test
metrics (read after).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from ablate_default import write_docs

BEGIN, END = "<!-- semi_teachers: begin -->", "<!-- semi_teachers: end -->"
ARMS_BEGIN, ARMS_END = "<!-- semi_students: begin -->", "<!-- semi_students: end -->"

# the preset's student before it distilled: semi_propagation_64d's contrastive recipe
LABELS_CONTRASTIVE = ["loss=contrastive", "model=convnet", "scheduler=cosine",
                      "augment=affine", "sampler.k=10", "sampler.batches_per_epoch=100",
                      "trainer.max_epochs=10", "trainer.no_aug_epochs=0"]
# name: (overrides of experiment=semi_teachers_64d, what the arm is)
STUDENT_ARMS = {
    **{f"contrastive_distill{w}": ([*LABELS_CONTRASTIVE, f"semi.distill={w}"],
                                   f"semi_propagation_64d's contrastive recipe (plain "
                                   f"convnet, 10 epochs of 100 steps), distillation weight {w}"
                                   + (": the preset before" if w == 0 else ""))
       for w in (0, 1, 10, 100, 1000)},
    "contrastive_semihard": ([*LABELS_CONTRASTIVE, "semi.distill=0", "miner=semihard"],
                             "the contrastive recipe on labels alone, semi-hard pairs"),
    "contrastive_easy_hard": ([*LABELS_CONTRASTIVE, "semi.distill=0", "miner=easy_hard"],
                              "the contrastive recipe on labels alone, easiest positive "
                              "and hardest negative"),
    **{f"distill{w}": ([f"semi.distill={w}"] if w != 1000 else [],
                       f"the default's supervised recipe, 12 epochs of 236 steps, "
                       f"distillation weight {w}" + (": shipped" if w == 1000 else ""))
       for w in (0, 100, 1000, 10000)},
}


def dmlrun(overrides: list[str], folder: Path) -> float:
    """Run ``dmlrun`` into ``folder``; its wall time in seconds."""
    print(f"dmlrun {' '.join(overrides)} -> {folder}", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "dmlrun", *overrides,
                           f"hydra.run.dir={folder}", "trainer.progress_bar=false"],
                          capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{folder} failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - t0


def test_p1(folder: Path) -> float:
    return json.loads((folder / "summary.json").read_text())["test"]["precision_at_1"]


def student_overrides(seed: int, teachers: list[Path]) -> list[str]:
    """The student's command line: the preset, the seed's split and its teachers."""
    return ["experiment=semi_teachers_64d", f"seed={seed}", f"dataset.split_seed={seed}",
            f"semi.teachers=[{','.join(repr(str(t.resolve())) for t in teachers)}]"]


def chain(out: Path, seed: int, teachers: int, extra: list[str] | None = None) -> dict:
    """Train the teachers and the student of one seed (``extra``: overrides for every
    run); what the table shows."""
    extra = list(extra or [])
    folders, seconds = [], 0.0
    for k in range(1, teachers + 1):
        folders.append(out / f"teacher_{k}")
        # a teacher's own baselines and epoch plots serve nobody: off
        seconds += dmlrun(["experiment=semi_propagation_64d", f"seed={100 * k + seed}",
                           f"dataset.split_seed={seed}",
                           "evaluation.baselines=false", "trainer.epoch_plots=false", *extra],
                          folders[-1])
    student = out / "student"
    seconds += dmlrun([*student_overrides(seed, folders), *extra], student)
    records = [json.loads(x) for x in (student / "metrics.jsonl").read_text().splitlines()]
    test = json.loads((student / "summary.json").read_text())["test"]
    return {"seed": seed, "teachers": [test_p1(f) for f in folders],
            "pseudo": records[0]["pseudo_accuracy"], "p_at_1": test["precision_at_1"],
            "map_at_r": test["map_at_r"], "minutes": seconds / 60}


def table(rows: list[dict]) -> str:
    threads = os.environ.get("OMP_NUM_THREADS", f"all {os.cpu_count()} cores")
    lines = [f"Threads: {threads}; {os.cpu_count()} CPUs visible.", "",
             "| seed | teachers' test P@1 | pseudo-labels right | student test P@1 | "
             "student test MAP@R | minutes, teachers and student |", "|---" * 6 + "|"]
    for r in rows:
        lines.append(f"| {r['seed']} | {', '.join(f'{p:.4f}' for p in r['teachers'])} | "
                     f"{100 * r['pseudo']:.2f}% | {r['p_at_1']:.4f} | {r['map_at_r']:.4f} | "
                     f"{r['minutes']:.1f} |")
    return "\n".join(lines)


def student_arm(chain_dir: Path, out: Path, seed: int, arm: str,
                extra: list[str] | None = None) -> dict:
    """Train (or read, when done) the student ``arm`` of seed ``seed`` on the teachers in
    ``chain_dir``/s<seed>/; its table row."""
    teachers = sorted((chain_dir / f"s{seed}").glob("teacher_*"))
    if not teachers:
        raise SystemExit(f"{chain_dir / f's{seed}'} holds no teacher_* folders")
    folder = out / f"s{seed}" / arm
    if not (folder / "summary.json").is_file():
        dmlrun([*student_overrides(seed, teachers), *STUDENT_ARMS[arm][0], *(extra or [])],
               folder)
    summary = json.loads((folder / "summary.json").read_text())
    return {"arm": arm, "seed": seed, "val_map_at_r": summary["val"]["map_at_r"],
            "p_at_1": summary["test"]["precision_at_1"],
            "map_at_r": summary["test"]["map_at_r"]}


def arms_table(rows: list[dict]) -> str:
    lines = ["| arm | what it is | seed | validation MAP@R | test P@1 | test MAP@R |",
             "|---" * 6 + "|"]
    lines += [f"| {r['arm']} | {STUDENT_ARMS[r['arm']][1]} | {r['seed']} | "
              f"{r['val_map_at_r']:.4f} | {r['p_at_1']:.4f} | {r['map_at_r']:.4f} |"
              for r in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="a new folder")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--teachers", type=int, default=3)
    parser.add_argument("--students-of", type=Path,
                        help="a folder of earlier chains: train student arms on its teachers")
    parser.add_argument("--arms", nargs="+", choices=list(STUDENT_ARMS),
                        default=list(STUDENT_ARMS), help="with --students-of")
    parser.add_argument("--write-docs", action="store_true",
                        help="write the table into docs/results.md")
    parser.add_argument("overrides", nargs="*", help="after --: overrides for every run")
    args = parser.parse_args()
    if args.teachers < 1:
        raise SystemExit("--teachers must be >= 1")
    if args.students_of is not None:
        rows = [student_arm(args.students_of, args.out, seed, arm, args.overrides)
                for seed in args.seeds for arm in args.arms]
        text = arms_table(rows)
        print(text)
        if args.write_docs:
            write_docs(text, ARMS_BEGIN, ARMS_END)
        return
    if args.out.exists():
        raise SystemExit(f"{args.out} exists: the script times fresh runs; use another --out")
    rows = [chain(args.out / f"s{seed}", seed, args.teachers, args.overrides)
            for seed in args.seeds]
    text = table(rows)
    print(text)
    if args.write_docs:
        write_docs(text, BEGIN, END)


if __name__ == "__main__":
    main()
