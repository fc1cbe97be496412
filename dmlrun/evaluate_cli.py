"""``dmlrun-evaluate``: grade a trained model (run folder or checkpoint) on any configured
dataset and split, without training."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

from dmlrun.errors import UserError

SPLITS = ("test", "val", "train")


def _dataset_node(ckpt_config: dict, overrides: list[str]):
    """The run's dataset config with ``overrides`` applied; ``dataset=<name>`` swaps in a
    shipped dataset config (composed like the CLI does)."""
    bad = [o for o in overrides if not (o.startswith("dataset=") or o.startswith("dataset.")
                                        or o.startswith("paths."))]
    if bad:
        raise UserError(f"only dataset and paths settings can be changed here, got {bad}")
    if any(o.startswith("dataset=") for o in overrides):
        from hydra import compose, initialize_config_module
        from hydra.errors import HydraException

        import dmlrun.config  # noqa: F401

        try:
            with initialize_config_module(config_module="dmlrun.configs", version_base="1.3"):
                cfg = compose(config_name="config", overrides=overrides)
        except HydraException as exc:
            raise UserError(str(exc)) from exc
        return cfg.dataset
    base = OmegaConf.create({"dataset": ckpt_config["dataset"], "paths": ckpt_config["paths"]})
    try:
        return OmegaConf.merge(base, OmegaConf.from_dotlist(overrides)).dataset
    except Exception as exc:
        raise UserError(f"bad override in {overrides}: {exc}") from exc


def evaluate_checkpoint(
    path: str | Path, overrides: list[str] | None = None, split: str = "test",
    device: str = "cpu", batch_size: int = 2048,
) -> dict:
    """Metrics (leave-one-out on ``split``) of the model in ``path``; returns a dict with
    the metrics and what was evaluated."""
    from hydra.utils import instantiate

    from dmlrun import load_embedder
    from dmlrun.checkpoint import load_checkpoint, resolve_checkpoint
    from dmlrun.components import build
    from dmlrun.evaluate import embed, evaluate_embeddings

    if split not in SPLITS:
        raise UserError(f"split must be one of {SPLITS}, got {split!r}")
    ckpt = resolve_checkpoint(path)
    state = load_checkpoint(ckpt)
    config = state["config"]
    node = _dataset_node(config, list(overrides or []))
    data = build(node, "dataset", seed=int(config.get("seed", 0)))
    part = getattr(data, split)
    model = load_embedder(ckpt, device=device)
    distance = instantiate(config["loss"]["distance"]) if isinstance(
        config["loss"].get("distance"), dict) else None
    emb = embed(model, part.images, batch_size)
    knn_k = int(config.get("evaluation", {}).get("knn_k", 5))
    metrics = evaluate_embeddings(emb, part.labels.to(emb.device), distance, knn_k)
    return {"checkpoint": str(ckpt), "epoch": state.get("epoch"), "dataset": data.name,
            "split": split, "n": len(part), "metrics": metrics}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="dmlrun-evaluate",
        description="Evaluate a trained dmlrun model on a dataset split (leave-one-out "
                    "retrieval and clustering metrics).")
    parser.add_argument("path", help="run folder (uses checkpoints/best.pt) or checkpoint file")
    parser.add_argument("overrides", nargs="*",
                        help="dataset settings, e.g. dataset=fashion_mnist dataset.test_size=2000")
    parser.add_argument("--split", default="test", choices=SPLITS)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output", help="also write the result as JSON to this new file")
    args = parser.parse_args(argv)
    try:
        if args.output and Path(args.output).exists():
            raise UserError(f"{args.output} exists; refusing to overwrite it")
        result = evaluate_checkpoint(args.path, args.overrides, args.split, args.device)
    except UserError as exc:
        print(f"dmlrun-evaluate: error: {exc}", file=sys.stderr)
        return 2
    print(f"{result['dataset']} {result['split']} ({result['n']} images), "
          f"{result['checkpoint']} (epoch {result['epoch']})")
    for k, v in result["metrics"].items():
        print(f"  {k:<16}{v:.4f}")
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
