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
        return _user_file(str(weights))
    try:
        enum = torchvision.models.get_model_weights(arch)
        chosen = enum.DEFAULT if weights == "DEFAULT" else enum[str(weights)]
    except (KeyError, ValueError) as exc:
        names = ", ".join(w.name for w in torchvision.models.get_model_weights(arch))
        raise ConfigError(f"model.weights={weights}: {arch} offers {names}, DEFAULT, null "
                          "(random initialisation) or a path to a .pth file") from exc
    return hub_file(chosen.url, f"{arch} ({chosen.name})", download)


def hub_file(url: str, what: str, download: bool = False) -> dict[str, torch.Tensor]:
    """The state dict published at ``url``, read from ``torch.hub.get_dir()/checkpoints``
    under the URL's file name (where torch.hub puts downloads); fetched only with
    ``download``, else a missing file is a ``UserError`` naming it and the folder."""
    folder = Path(torch.hub.get_dir()) / "checkpoints"
    file = folder / os.path.basename(url)
    if not file.is_file():
        if not download:  # found before any data loads, so the run leaves no folder
            raise ConfigError(
                f"the ImageNet weights of {what} are not on this machine: put {file.name} "
                f"(published at {url}) into {folder} (the folder follows TORCH_HOME), or add "
                "model.download=true to fetch it, or model.weights=null to start from "
                "random weights")
        torch.hub.load_state_dict_from_url(url, progress=True)
    return torch.load(file, map_location="cpu", weights_only=True)


def _user_file(weights: str) -> dict[str, torch.Tensor]:
    path = Path(str(weights)).expanduser()
    if not path.is_file():
        raise UserError(f"model.weights={weights}: no such file")
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("state_dict", state.get("model", state)) if isinstance(state, dict) \
        else state


def _load(trunk: nn.Module, state: dict[str, torch.Tensor] | None, weights: object,
          arch: str) -> None:
    if state is None:
        return
    try:
        trunk.load_state_dict(state)
    except RuntimeError as exc:
        detail = " ".join(line.strip() for line in str(exc).splitlines()[1:3])
        raise UserError(f"model.weights={weights} does not fit {arch}: {detail}") from exc


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


class TrunkEmbedder(Embedder):
    """A pretrained ``trunk`` giving pooled features, then ``nn.Linear`` to
    ``embedding_dim``; with ``freeze_bn`` every BatchNorm stays in eval mode (subclasses
    ask for it only when weights were loaded: random weights have no statistics worth
    keeping), with ``trunk_lr`` the trunk has a learning rate of its own."""

    def __init__(self, trunk: nn.Module, features: int, embedding_dim: int,
                 l2_normalize: bool, freeze_bn: bool, trunk_lr: float | None,
                 mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__(embedding_dim, l2_normalize, mean, std)
        self.trunk, self.embedding = trunk, nn.Linear(features, embedding_dim)
        self.freeze_bn, self.trunk_lr = freeze_bn, trunk_lr

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.embedding(torch.flatten(self.trunk(x), 1))

    def train(self, mode: bool = True) -> TrunkEmbedder:
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


def _rgb(in_channels: int, arch: str) -> None:
    if in_channels != 3:
        raise ConfigError(f"model={arch} takes RGB images; the dataset gives {in_channels} "
                          "channels (use an RGB dataset, or dataset.channels=3)")


class TorchvisionEmbedder(TrunkEmbedder):
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
        _rgb(in_channels, arch)
        if arch not in torchvision.models.list_models(torchvision.models):
            raise ConfigError(f"model.arch={arch} is not a torchvision classification model")
        trunk = torchvision.models.get_model(arch, weights=None)
        state = imagenet_weights(arch, weights, download)
        _load(trunk, state, weights, arch)
        freeze_bn = freeze_bn and state is not None  # random weights: no statistics to keep
        name, features = _classifier(trunk)
        setattr(trunk, name, nn.Identity())
        if hasattr(trunk, "avgpool"):
            trunk.avgpool = GlobalPool(pooling)
        super().__init__(trunk, features, embedding_dim, l2_normalize, freeze_bn, trunk_lr,
                         mean, std)


BN_INCEPTION_URL = "http://data.lip6.fr/cadene/pretrainedmodels/bn_inception-52deb4733.pth"
# BN-Inception's own input: BGR in 0-255 minus (104, 117, 128) per channel; as [0, 1] RGB
# statistics (the model flips the channels): mean (128, 117, 104) / 255, std 1 / 255
BN_INCEPTION_MEAN = (128 / 255, 117 / 255, 104 / 255)
BN_INCEPTION_STD = (1 / 255, 1 / 255, 1 / 255)


class BNInceptionEmbedder(TrunkEmbedder):
    """BN-Inception (Ioffe & Szegedy 2015) from the ``pretrainedmodels`` package, the
    trunk of the Metric Learning Reality Check: ImageNet weights ``imagenet`` (its file
    ``bn_inception-52deb4733.pth`` in torch's hub folder), null or a path; 1024 pooled
    features, then ``nn.Linear`` to ``embedding_dim``. Takes [0, 1] RGB like every model
    here; the BGR 0-255 input the weights expect is made inside."""

    def __init__(
        self,
        weights: str | None = "imagenet",
        embedding_dim: int = 128,
        pooling: str = "avg",
        l2_normalize: bool = True,
        freeze_bn: bool = True,
        trunk_lr: float | None = None,
        download: bool = False,
        mean: Sequence[float] = BN_INCEPTION_MEAN,
        std: Sequence[float] = BN_INCEPTION_STD,
        in_channels: int = 3,
        **_: object,
    ) -> None:
        _rgb(in_channels, "bninception")
        try:
            from pretrainedmodels.models.bninception import BNInception
        except ImportError as exc:
            raise UserError("model=bninception needs the pretrainedmodels package: pip "
                            "install 'dmlrun[bninception]'") from exc
        trunk = BNInception(num_classes=1000)
        state = None
        if weights == "imagenet":
            state = hub_file(BN_INCEPTION_URL, "bninception (imagenet)", download)
        elif weights is not None and str(weights).lower() not in ("null", "none"):
            state = _user_file(str(weights))
        if state is not None:  # the published file stores 1-D BatchNorm weights as (1, C)
            state = {k: v.squeeze(0) if v.ndim == 2 and v.shape[0] == 1 and "linear" not in
                     k else v for k, v in state.items()}
        _load(trunk, state, weights, "bninception")
        freeze_bn = freeze_bn and state is not None  # random weights: no statistics to keep
        trunk.global_pool = GlobalPool(pooling)
        trunk.last_linear = nn.Identity()
        super().__init__(trunk, 1024, embedding_dim, l2_normalize, freeze_bn, trunk_lr,
                         mean, std)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return super().embed(x.flip(1))  # RGB -> BGR
