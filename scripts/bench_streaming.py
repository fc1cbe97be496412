"""Streaming image folders against images held in memory, on MNIST saved as PNG files.

    python scripts/bench_streaming.py                 # 2 rounds of the default 4-epoch run
    python scripts/bench_streaming.py --epochs 1 --rounds 1

MNIST's 60k training and 10k test images are written once as ``<folder>/train/<digit>/`` and
``<folder>/test/<digit>/`` PNG files. Then the default run (contrastive, batch-hard, 2-D,
P x K = 10 x 25) trains on ``dataset=image_folder`` twice per round, alternating: with the
images decoded into memory at the start (``dataset.stream=false``) and read from the files
per batch by DataLoader workers (``dataset.stream=true``). Reported: test P@1 and MAP@R,
training samples/s, and the streamed/in-memory speed ratio per round. Needs
DMLRUN_DATA_DIR (MNIST in torchvision's raw layout).
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from hydra import compose, initialize_config_module
from PIL import Image

import dmlrun  # noqa: F401  (resolvers)
from dmlrun.data.idx import load_mnist
from dmlrun.run import run


def export_pngs(data_dir: str, folder: Path) -> None:
    """MNIST train and test images as PNG files, unless already there."""
    if (folder / "done").exists():
        return
    d = load_mnist(data_dir, val_size=1, download=False, seed=0)
    pools = {"train": (d.train, d.val), "test": (d.test,)}
    for part, splits in pools.items():
        n = 0
        for split in splits:
            for img, label in zip(split.images, split.labels.tolist(), strict=True):
                out = folder / part / str(label)
                out.mkdir(parents=True, exist_ok=True)
                Image.fromarray(img[0].numpy()).save(out / f"{n}.png")
                n += 1
    (folder / "done").write_text("ok\n")


def one_run(folder: Path, stream: bool, epochs: int, workers: int, out: Path) -> dict:
    with initialize_config_module(config_module="dmlrun.configs", version_base="1.3"):
        cfg = compose(config_name="config", overrides=[
            "dataset=image_folder", f"dataset.root={folder / 'train'}",
            f"dataset.test_root={folder / 'test'}", "dataset.val_size=5000",
            "dataset.mean=0.1307", "dataset.std=0.3081", f"dataset.stream={stream}",
            f"dataset.workers={workers}", f"trainer.max_epochs={epochs}",
            "trainer.device=cpu", "trainer.progress_bar=false", "trainer.epoch_plots=false",
            "evaluation.baselines=false"])
    return run(cfg, out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--folder", default=os.path.join(tempfile.gettempdir(),
                                                         "dmlrun_mnist_png"))
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    folder = Path(args.folder)
    export_pngs(os.environ.get("DMLRUN_DATA_DIR", "data"), folder)
    print(f"{'round':<6}{'path':<11}{'test P@1':>9}{'MAP@R':>8}{'samples/s':>11}{'wall s':>8}")
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            speed = {}
            for stream in (False, True):
                name = "streamed" if stream else "in memory"
                s = one_run(folder, stream, args.epochs, args.workers,
                            Path(tmp) / f"{r}_{name.replace(' ', '_')}")
                speed[stream] = s["train_samples_per_s"]
                print(f"{r:<6}{name:<11}{s['test']['precision_at_1']:>9.4f}"
                      f"{s['test']['map_at_r']:>8.4f}{speed[stream]:>11.0f}"
                      f"{s['wall_seconds']:>8.1f}", flush=True)
            print(f"{r:<6}streamed / in memory: {speed[True] / speed[False]:.2f}")


if __name__ == "__main__":
    main()
