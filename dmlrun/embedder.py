"""A trained model, ready to embed outside dmlrun: ``load_embedder(run folder)``."""

from __future__ import annotations

from pathlib import Path

import torch
from hydra.utils import instantiate
from torch import nn

from dmlrun.checkpoint import load_checkpoint, resolve_checkpoint
from dmlrun.data.dataset import images_to_float
from dmlrun.distances import Distance, EuclideanDistance


class TrainedEmbedder(nn.Module):
    """(B, C, H, W) images -> (B, D) embeddings, as the run saw them: uint8 (0-255), or
    floats in [0, 1]; anything else is refused (floats in 0-255 would give garbage, since
    the model's input normalisation expects [0, 1]).

    ``distance`` is the run's own distance (``distance.pairwise(a, b)``, and
    ``distance.normalize``: whether embeddings are L2-normalised before distances), so
    that users grade with the run's metric, e.g. ``dmlrun.evaluate(q, ql, r, rl,
    distance=embedder.distance)``."""

    def __init__(self, model: nn.Module, distance: Distance, in_channels: int | None = None
                 ) -> None:
        super().__init__()
        self.model = model
        self.distance = distance
        self.in_channels = in_channels

    @property
    def normalize(self) -> bool:
        """True when the run's distance L2-normalises embeddings first."""
        return bool(getattr(self.distance, "normalize", False))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(self.as_input(images))

    def as_input(self, images: torch.Tensor) -> torch.Tensor:
        """Check ``images`` and return them as floats in [0, 1]."""
        if images.ndim != 4 or (self.in_channels and images.shape[1] != self.in_channels):
            raise ValueError(f"expected images (B, {self.in_channels or 'C'}, H, W), got "
                             f"shape {tuple(images.shape)}")
        if images.dtype == torch.uint8:
            return images_to_float(images)
        if not images.is_floating_point():
            raise ValueError(f"expected uint8 images (0-255) or floats in [0, 1], got "
                             f"{images.dtype}")
        lo, hi = (float(v) for v in torch.aminmax(images.detach()))
        if lo < 0.0 or hi > 1.0:
            raise ValueError(
                f"expected float images in [0, 1] (or uint8 0-255), got values in "
                f"[{lo:.4g}, {hi:.4g}]" + ("; divide by 255 first" if hi > 1.5 else ""))
        return images.float()


def load_embedder(path: str | Path, device: str = "cpu") -> TrainedEmbedder:
    """Trained embedder from a run folder (its best.pt, else last.pt) or a checkpoint file.

    Returns a ``TrainedEmbedder`` in eval mode: uint8 or [0, 1] float images
    (B, C, H, W) -> (B, D) embeddings (input normalisation is inside the model), with the run's
    ``distance``."""
    state = load_checkpoint(resolve_checkpoint(path), map_location=device)
    config = state["config"]
    # the checkpoint holds every weight: pretrained ones are not read again
    no_fetch = {"weights": None} if "weights" in config["model"] else {}
    model = instantiate(config["model"], **no_fetch)
    model.load_state_dict(state["model"])
    node = config.get("loss", {}).get("distance")
    distance = instantiate(node) if isinstance(node, dict) and "_target_" in node else \
        EuclideanDistance()
    channels = config["model"].get("in_channels")
    embedder = TrainedEmbedder(model, distance, int(channels) if channels else None)
    return embedder.to(device).eval()


class RunEmbedding:
    """A run's model embedding images exactly as the run graded them: the same memory
    layout (channels-last on the CPU when the run trained so), batch size and autocast
    (``trainer.amp=auto``: bf16 on CUDA and on CPUs with AMX tiles), so on the same kind of
    device embeddings, and every metric computed from them, equal the run's own.
    ``image_size`` and ``channels``: what the model takes."""

    def __init__(self, path: str | Path, device: str = "auto") -> None:
        from dmlrun.components import resolve_amp, resolve_device
        from dmlrun.metrics import EVAL_BATCH_SIZE

        self.checkpoint = resolve_checkpoint(path)
        state = load_checkpoint(self.checkpoint, map_location="cpu")
        self.config: dict = state["config"]
        self.epoch = state.get("epoch")
        self.device = resolve_device(device)
        self.embedder = load_embedder(self.checkpoint, device=str(self.device))
        trainer = self.config.get("trainer", {})
        self.model: nn.Module = self.embedder.model
        if trainer.get("channels_last", False) and self.device.type == "cpu":
            self.model = self.model.to(memory_format=torch.channels_last)
        self.batch_size = int(trainer.get("eval_batch_size", EVAL_BATCH_SIZE))
        self.amp_dtype = resolve_amp(trainer.get("amp", "auto"), self.device)
        dataset, model = self.config.get("dataset", {}), self.config["model"]
        self.channels = int(model.get("in_channels") or dataset.get("channels", 1))
        self.image_size = int(model.get("image_size") or dataset.get("image_size", 28))

    @property
    def distance(self) -> Distance:
        return self.embedder.distance

    @property
    def dim(self) -> int:
        return int(self.config["model"]["embedding_dim"])

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) uint8 images -> (B, D) float32 embeddings on the run's device."""
        from dmlrun.metrics import embed

        return embed(self.model, images, self.batch_size, self.amp_dtype)

    def split(self, split: object) -> torch.Tensor:
        """(N, D) embeddings of a dataset split (in memory or read from files)."""
        from dmlrun.metrics import embed_split

        return embed_split(self.model, split, self.batch_size, self.amp_dtype)
