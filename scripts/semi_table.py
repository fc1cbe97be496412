"""Markdown table of semi-supervised arms from their run folders.

Each run is tagged with its arm (``tag=<arm>``); rows are (arm, embedding dim) with the
test P@1, MAP@R and NMI as mean +- sample sd over seeds and each seed's values, plus raw
pixels (the same for every run: read from the runs' baselines).

    python scripts/semi_table.py RUNS_DIR [RUNS_DIR ...]
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path

METRICS = (("precision_at_1", "P@1"), ("map_at_r", "MAP@R"), ("nmi", "NMI"))


def load(dirs: list[Path]) -> list[dict]:
    return [json.loads(p.read_text()) for d in dirs for p in sorted(d.rglob("summary.json"))]


def cell(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def table(runs: list[dict]) -> str:
    groups: dict[tuple[str, int], list[dict]] = defaultdict(list)
    for r in runs:
        groups[(r["tag"] or "untagged", int(r["embedding_dim"]))].append(r)
    seeds = sorted({r["seed"] for r in runs})
    each = f"seeds {', '.join(map(str, seeds))}"
    head = ["arm", "dim", *(name for _, name in METRICS),
            *(f"{name}, {each}" for _, name in METRICS), "minutes per run"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    order = list(dict.fromkeys(r["tag"] or "untagged" for r in runs))
    for dim in sorted({d for _, d in groups}):
        for arm in order:
            rs = sorted(groups.get((arm, dim), []), key=lambda r: r["seed"])
            if not rs:
                continue
            means = [cell([r["test"][m] for r in rs]) for m, _ in METRICS]
            per_seed = [", ".join(f"{r['test'][m]:.4f}" for r in rs) for m, _ in METRICS]
            if [r["seed"] for r in rs] != seeds:
                per_seed = [f"{v} (seeds {', '.join(str(r['seed']) for r in rs)})"
                            for v in per_seed]
            minutes = statistics.mean(r["wall_seconds"] for r in rs) / 60
            lines.append(f"| {arm} | {dim} | " + " | ".join(means + per_seed) +
                         f" | {minutes:.1f} |")
    pixels = runs[0]["baselines"]["raw_pixels"]
    lines.append("| raw pixels | 784 | " + " | ".join(f"{pixels[m]:.4f}" for m, _ in METRICS)
                 + " | | | | |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dirs", nargs="+", type=Path)
    args = parser.parse_args()
    runs = load(args.dirs)
    if not runs:
        raise SystemExit(f"no summary.json under {', '.join(map(str, args.dirs))}")
    print(table(runs))


if __name__ == "__main__":
    main()
