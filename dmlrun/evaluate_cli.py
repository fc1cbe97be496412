"""``dmlrun-evaluate``: grade a trained model (run folder or checkpoint) on any configured
dataset and split, without training. Graded as the run graded itself (same distance,
memory layout, batch size, kNN k and clustering seed), so a run's own split gives its
summary's numbers exactly.

torch and Hydra are imported inside ``evaluate_checkpoint``, deliberately: ``--help`` and
argument errors answer at once.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_module
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf

import dmlrun.config  # noqa: F401  (resolvers)
from dmlrun.errors import EXIT_USER_ERROR, UserError

SPLITS = ("test", "val", "train")


def data_root(stored: dict[str, Any], overrides: list[str]) -> str | None:
    """The data root to read: one given in ``overrides`` (``paths.data_dir=`` or
    ``dataset.root=``) first, then ``DMLRUN_DATA_DIR``, then the run's own, a relative one
    taken from the folder the run started in. None when the run's dataset root was set
    apart from the data root (an image folder): that one is kept."""
    given = [o for o in overrides if o.startswith(("paths.data_dir=", "dataset.root="))]
    if given:
        return None  # applied as given with the other overrides
    paths, dataset = stored.get("paths", {}), stored.get("dataset", {})
    if dataset.get("root") not in (None, paths.get("data_dir")):
        root = Path(str(dataset["root"]))
    elif os.environ.get("DMLRUN_DATA_DIR"):
        return os.environ["DMLRUN_DATA_DIR"]
    else:
        root = Path(str(paths.get("data_dir", "data")))
    if not root.is_absolute():
        root = Path(str(paths.get("root_dir", "."))) / root
    return str(root)


def _dataset_node(config: dict, overrides: list[str]) -> DictConfig:
    """The run's dataset config with ``overrides`` applied; ``dataset=<name>`` swaps in a
    shipped dataset config (composed like the CLI does). Naming the run's own dataset
    keeps the run's node, so its hold-out and caps stay: a fresh config would split
    validation anew, over images the run trained on."""
    bad = [o for o in overrides if not o.startswith(("dataset=", "dataset.", "paths."))]
    if bad:
        raise UserError(f"only dataset and paths settings can be changed here, got {bad}")
    own = config.get("dataset", {}).get("name")
    if own is not None and f"dataset={own}" in overrides:
        overrides = [o for o in overrides if not o.startswith("dataset=")]
    root = data_root(config, overrides)
    if any(o.startswith("dataset=") for o in overrides):
        extra = [f"paths.data_dir={root}"] if root is not None else []
        try:
            with initialize_config_module(config_module="dmlrun.configs", version_base="1.3"):
                cfg = compose(config_name="config", overrides=[*overrides, *extra])
        except HydraException as exc:
            raise UserError(str(exc)) from exc
        return cfg.dataset
    extra = [f"dataset.root={root}"] if root is not None else []
    given = [o.replace("paths.data_dir=", "dataset.root=") for o in overrides]
    base = OmegaConf.create({"dataset": config["dataset"], "paths": config["paths"]})
    try:
        return OmegaConf.merge(base, OmegaConf.from_dotlist([*extra, *given])).dataset
    except Exception as exc:
        raise UserError(f"bad override in {overrides}: {exc}") from exc


def _split_seed(config: dict) -> int:
    """The seed the run split its data with (``dataset.split_seed``, else its seed)."""
    from dmlrun.settings import data_seed

    return data_seed(int(config.get("seed", 0)), config.get("dataset", {}).get("split_seed"))


def load_dataset(config: dict, overrides: list[str]):
    """The run's dataset (``TensorDataset``), or another with ``overrides`` applied, split
    as the run split it."""
    from dmlrun.components import build

    return build(_dataset_node(config, overrides), "dataset", seed=_split_seed(config))


def evaluate_checkpoint(
    path: str | Path, overrides: list[str] | None = None, split: str = "test",
    device: str = "auto", plots_dir: str | Path | bool | None = None,
) -> dict:
    """Metrics (leave-one-out on ``split``, or its queries against its gallery) of the
    model in ``path``, graded with the run's own settings; returns a dict with the
    metrics and what was evaluated. With
    ``plots_dir`` (a new folder; True: ``default_plots_dir``), also the embedding,
    gallery, distance, confusion and per-class plots there, and per-class metrics in the
    result."""
    from dmlrun.checkpoint import load_checkpoint, resolve_checkpoint
    from dmlrun.components import build
    from dmlrun.embedder import RunEmbedding
    from dmlrun.metrics import RECALL_KS, evaluate_embeddings

    if split not in SPLITS:
        raise UserError(f"split must be one of {SPLITS}, got {split!r}")
    ckpt = resolve_checkpoint(path)
    state = load_checkpoint(ckpt)
    config = state["config"]
    data_config = _dataset_node(config, list(overrides or []))
    data = build(data_config, "dataset", seed=_split_seed(config))
    part = getattr(data, split)
    model = RunEmbedding(ckpt, device)
    emb = model.split(part)
    evaluation = config.get("evaluation", {})
    metrics = evaluate_embeddings(emb, part.labels.to(emb.device), model.distance,
                                  int(evaluation.get("knn_k", 5)), int(config.get("seed", 0)),
                                  getattr(part, "query_count", None),
                                  tuple(data_config.get("recall_ks") or RECALL_KS),
                                  bool(evaluation.get("clustering", True)))
    result = {"checkpoint": str(ckpt), "epoch": state.get("epoch"), "dataset": data.name,
              "overrides": list(overrides or []), "split": split, "n": len(part),
              "metrics": metrics}
    if plots_dir is not None and plots_dir is not False:
        out = default_plots_dir(path, data.name, split) if plots_dir is True else \
            Path(plots_dir)
        if out.exists():
            raise UserError(f"{out} exists; refusing to overwrite it (--plots DIR)")
        result["per_class"] = _plots(emb, part.to(emb.device), data, config, model.distance,
                                     out, f"{data.name} {split}")["per_class"]
        result["plots"] = str(out)
    return result


def _plots(emb, part, data, config: dict, distance, out: Path, title: str) -> dict:
    from hydra.utils import instantiate

    from dmlrun import retrieval_plots
    from dmlrun.outputs import split_plots

    margin = retrieval_plots.loss_margin(instantiate(config["loss"]))
    return split_plots(emb, part, data, distance, margin, str(config.get("evaluation", {}).get(
        "projection", "pca")), int(config.get("seed", 0)), out, title)[1]


def default_plots_dir(path: str | Path, dataset: str, split: str) -> Path:
    """<run folder>/plots/evaluate-<dataset>-<split> (the run folder of a checkpoint file:
    two folders up)."""
    path = Path(path)
    run_dir = path if path.is_dir() else path.parent.parent
    return run_dir / "plots" / f"evaluate-{dataset}-{split}"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dmlrun-evaluate",
        description="Grade a trained dmlrun model on a dataset split: leave-one-out "
                    "retrieval (a query/gallery split, as In-Shop's test: its queries "
                    "against its gallery; P@1, R@K, R-precision, MAP@R, kNN accuracy) and "
                    "clustering "
                    "(NMI, AMI), with the run's own distance and settings.",
        epilog="examples:\n"
               "  dmlrun-evaluate outputs/2026-11-26/10-00-00\n"
               "  dmlrun-evaluate outputs/2026-11-26/10-00-00 --split val --output val.json\n"
               "  dmlrun-evaluate outputs/2026-11-26/10-00-00 dataset=fashion_mnist\n"
               "data root: paths.data_dir=<dir> here, else DMLRUN_DATA_DIR, else the run's.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", help="a run folder (its checkpoints/best.pt, else last.pt) or a "
                                "checkpoint file")
    p.add_argument("overrides", nargs="*",
                   help="dataset and paths settings, e.g. dataset=fashion_mnist "
                        "dataset.test_size=2000 paths.data_dir=/data")
    p.add_argument("--split", default="test", choices=SPLITS,
                   help="which split of the dataset to grade (default: test)")
    p.add_argument("--device", default="auto",
                   help="cpu, cuda, cuda:N or auto (CUDA when present; default)")
    p.add_argument("--output", help="also write the result as JSON to this file (which must "
                                    "not exist yet)")
    p.add_argument("--plots", nargs="?", const="", metavar="DIR",
                   help="also draw the embedding, a retrieval gallery, distance histograms, "
                        "nearest-neighbour confusion and per-class metrics into DIR (a new "
                        "folder; default <run>/plots/evaluate-<dataset>-<split>)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_intermixed_args(argv)  # settings after options too
    try:
        if args.output and Path(args.output).exists():
            raise UserError(f"{args.output} exists; refusing to overwrite it")
        plots_dir = None if args.plots is None else (args.plots or True)
        if isinstance(plots_dir, str) and Path(plots_dir).exists():  # before the work
            raise UserError(f"{plots_dir} exists; refusing to overwrite it (--plots DIR)")
        result = evaluate_checkpoint(args.path, args.overrides, args.split, args.device,
                                     plots_dir)
    except UserError as exc:
        print(f"dmlrun-evaluate: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    print(f"{result['dataset']} {result['split']} ({result['n']} images), "
          f"{result['checkpoint']} (epoch {result['epoch']})")
    for k, v in result["metrics"].items():
        print(f"  {k:<16}{v:.4f}")
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    if "plots" in result:
        print(f"plots: {result['plots']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
