"""``dmlrun-folds``: the models of the class-disjoint folds of one experiment (the Metric
Learning Reality Check trains one per fold, ``dataset.fold=0..3``), graded on their common
test set one by one and as one model: each fold's test embeddings L2-normalised,
concatenated (4 x 128 = 512-D) and normalised again.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from dmlrun.errors import UserError, run_command


def grade_folds(runs: list[str], device: str = "auto") -> dict:
    """Metrics of each run's model on its test split, their mean and sample sd, and those
    of the concatenated embedding. The runs must share the dataset and its test split."""
    import torch
    import torch.nn.functional as F

    from dmlrun.embedder import RunEmbedding
    from dmlrun.evaluate_cli import load_dataset

    if len(runs) < 2:
        raise UserError("give the run folders of at least 2 folds")
    embs, rows, first = [], {}, None
    for path in runs:
        run = RunEmbedding(path, device)
        data = load_dataset(run.config, [])
        if first is None:
            first = (run, data)
        elif data.name != first[1].name or not torch.equal(data.test.labels.cpu(),
                                                           first[1].test.labels.cpu()):
            raise UserError(f"{path} was tested on another test set than {runs[0]}")
        emb = run.split(data.test).cpu()
        rows[str(path)] = _grade(emb, run, data.test)
        embs.append(F.normalize(emb, dim=1))
    run, data = first
    joined = F.normalize(torch.cat(embs, dim=1), dim=1)
    folds = list(rows.values())
    summary = {name: {"mean": sum(r[name] for r in folds) / len(folds),
                      "sd": _sd([r[name] for r in folds])} for name in folds[0]}
    return {"dataset": data.name, "test_images": len(data.test), "folds": rows,
            "fold_mean": summary, "concatenated_dim": joined.shape[1],
            "concatenated": _grade(joined, run, data.test)}


def _grade(emb, run, split) -> dict[str, float]:
    """Every metric of (N, D) test embeddings, graded as ``run`` grades its test set."""
    from dmlrun.metrics import RECALL_KS, evaluate_embeddings

    evaluation, dataset = run.config.get("evaluation", {}), run.config.get("dataset", {})
    return evaluate_embeddings(emb, split.labels.cpu(), run.distance,
                               int(evaluation.get("knn_k", 5)),
                               int(run.config.get("seed", 0)),
                               getattr(split, "query_count", None),
                               tuple(dataset.get("recall_ks") or RECALL_KS),
                               bool(evaluation.get("clustering", True)))


def _sd(values: list[float]) -> float:
    if len(values) < 2:
        return math.nan
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dmlrun-folds",
        description="Grade the models of class-disjoint folds (dataset.fold=0..3) on their "
                    "test set, each alone and concatenated (L2-normalised), as the Metric "
                    "Learning Reality Check reports them.",
        epilog="example:\n  dmlrun-folds multirun/2026-12-06/10-00-00/{0,1,2,3}_*",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="the run folders of the folds")
    p.add_argument("--output", help="also write the result as JSON (a new file)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    return p


def _main(args: argparse.Namespace) -> int:
    if args.output and Path(args.output).exists():
        raise UserError(f"{args.output} exists; refusing to overwrite it")
    result = grade_folds(args.runs, args.device)
    names = [n for n in ("precision_at_1", "r_precision", "map_at_r") if n in
             result["concatenated"]]
    print(f"{result['dataset']} test ({result['test_images']} images)")
    print(f"{'model':<40}" + "".join(f"{n:>16}" for n in names))
    for path, row in result["folds"].items():
        print(f"{Path(path).name[-40:]:<40}" + "".join(f"{row[n]:>16.4f}" for n in names))
    mean = result["fold_mean"]
    print(f"{'folds, mean +- sd':<40}" + "".join(
        f"{mean[n]['mean']:>9.4f}+-{mean[n]['sd']:.4f}"[-16:].rjust(16) for n in names))
    print(f"{'concatenated (' + str(result['concatenated_dim']) + '-D)':<40}"
          + "".join(f"{result['concatenated'][n]:>16.4f}" for n in names))
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=1) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return run_command("dmlrun-folds", lambda: _main(args))


if __name__ == "__main__":
    sys.exit(main())
