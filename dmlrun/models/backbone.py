"""A torchvision classification network as the trunk of an embedding: ImageNet-pretrained
weights (read from torch's hub folder, ``TORCH_HOME``) or a file of the user's, global
pooling, then a linear embedding layer. Optionally every BatchNorm kept in eval mode
(``freeze_bn``) and a learning rate of its own for the trunk (``trunk_lr``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torchvision
from torch import nn

from dmlrun.errors import ConfigError, UserError
from dmlrun.models.base import Embedder

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLASSIFIER_NAMES = ("fc", "classifier", "head", "heads")


class GlobalPool(nn.Module):
    """(B, C, H, W) -> (B, C, 1, 1): average, or average plus maximum (``avg+max``)."""

    def __init__(self, kind: str = "avg") -> None:
        super().__init__()
        if kind not in ("avg", "avg+max"):
            raise ValueError(f"pooling must be avg or avg+max, got {kind!r}")
        self.kind = kind

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x.mean((2, 3), keepdim=True)
        return out + x.amax((2, 3), keepdim=True) if self.kind == "avg+max" else out


def imagenet_weights(arch: str, weights: str | None, download: bool = False
                     ) -> dict[str, torch.Tensor] | None:
    """The state dict ``weights`` names for ``arch``: None (random initialisation), a file
    path, or a torchvision weights name (``IMAGENET1K_V1``, ``DEFAULT``, ...) read from
    ``torch.hub.get_dir()/checkpoints`` under torchvision's file name. A missing file is a
    ``UserError`` naming the file and the folder; it is fetched only with ``download``."""
    if weights is None or str(weights).lower() in ("null", "none"):
        return None
    path = Path(str(weights)).expanduser()
    if path.suffix in (".pth", ".pt") or path.exists():
        if not path.is_file():
            raise UserError(f"model.weights={weights}: no such file")
        state = torch.load(path, map_location="cpu", weights_only=True)
        return state.get("state_dict", state.get("model", state)) if isinstance(state, dict) \
            else state
    try:
        enum = torchvision.models.get_model_weights(arch)
        chosen = enum.DEFAULT if weights == "DEFAULT" else enum[str(weights)]
    except (KeyError, ValueError) as exc:
        names = ", ".join(w.name for w in torchvision.models.get_model_weights(arch))
        raise ConfigError(f"model.weights={weights}: {arch} offers {names}, DEFAULT, null "
                          "(random initialisation) or a path to a .pth file") from exc
    folder = Path(torch.hub.get_dir()) / "checkpoints"
    file = folder / os.path.basename(chosen.url)
    if not file.is_file():
        if not download:
            raise UserError(
                f"the ImageNet weights of {arch} ({chosen.name}) are not on this machine: put "
                f"{file.name} (published at {chosen.url}) into {folder} (the folder follows "
                "TORCH_HOME), or add model.download=true to fetch it, or model.weights=null "
                "to start from random weights")
        torch.hub.load_state_dict_from_url(chosen.url, progress=True)
    return torch.load(file, map_location="cpu", weights_only=True)


def _classifier(net: nn.Module) -> tuple[str, int]:
    """The attribute holding the network's last classification layer and its input size."""
    for name in CLASSIFIER_NAMES:
        layer = getattr(net, name, None)
        if layer is None:
            continue
        linears = [m for m in layer.modules() if isinstance(m, nn.Linear)]
        if linears:  # the first Linear of the head takes the pooled features
            return name, linears[0].in_features
    raise ConfigError(f"cannot find the classification layer of {type(net).__name__} "
                      f"(looked for {', '.join(CLASSIFIER_NAMES)})")


class TorchvisionEmbedder(Embedder):
    """(B, 3, H, W) float in [0, 1] -> (B, embedding_dim): a torchvision network ``arch``
    without its classifier (pooled features), then ``nn.Linear`` to ``embedding_dim``.
    Networks with an ``avgpool`` stage take ``pooling`` (avg or avg+max) there."""

    def __init__(
        self,
        arch: str = "resnet50",
        weights: str | None = "IMAGENET1K_V1",
        embedding_dim: int = 128,
        pooling: str = "avg",
        l2_normalize: bool = True,
        freeze_bn: bool = False,
        trunk_lr: float | None = None,
        download: bool = False,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        in_channels: int = 3,
        **_: object,
    ) -> None:
        super().__init__(embedding_dim, l2_normalize, mean, std)
        if in_channels != 3:
            raise ConfigError(f"model={arch} takes RGB images; the dataset gives {in_channels} "
                              "channels (use an RGB dataset, or dataset.channels=3)")
        if arch not in torchvision.models.list_models(torchvision.models):
            raise ConfigError(f"model.arch={arch} is not a torchvision classification model")
        trunk = torchvision.models.get_model(arch, weights=None)
        state = imagenet_weights(arch, weights, download)
        if state is not None:
            try:
                trunk.load_state_dict(state)
            except RuntimeError as exc:
                raise UserError(f"model.weights={weights} does not fit {arch}: "
                                f"{str(exc).splitlines()[0]}") from exc
        name, features = _classifier(trunk)
        setattr(trunk, name, nn.Identity())
        if hasattr(trunk, "avgpool"):
            trunk.avgpool = GlobalPool(pooling)
        self.trunk, self.embedding = trunk, nn.Linear(features, embedding_dim)
        self.freeze_bn, self.trunk_lr = freeze_bn, trunk_lr

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.embedding(torch.flatten(self.trunk(x), 1))

    def train(self, mode: bool = True) -> TorchvisionEmbedder:
        """With ``freeze_bn``, every BatchNorm stays in eval mode (its running statistics
        are kept as they are) while the rest trains."""
        super().train(mode)
        if self.freeze_bn:
            for m in self.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def parameter_groups(self) -> list[dict]:
        """The trunk at ``trunk_lr`` (when set) and the embedding layer at the optimizer's
        rate."""
        if self.trunk_lr is None:
            return [{"params": list(self.parameters())}]
        return [{"params": list(self.trunk.parameters()), "lr": float(self.trunk_lr)},
                {"params": list(self.embedding.parameters())}]
