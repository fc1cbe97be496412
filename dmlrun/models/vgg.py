"""A small VGG-style embedding net: stacks of 3 x 3 convolutions at full resolution."""

from collections.abc import Sequence

import torch
from torch import nn

from dmlrun.models.base import Embedder


class VGGNet(Embedder):
    """Blocks of ``convs_per_block`` x [Conv(3x3, same padding) + BatchNorm + ReLU], each
    block ending in a 2 x 2 max-pool, then Linear + BatchNorm + ReLU to ``hidden_dim`` and
    Linear to ``embedding_dim`` (Simonyan & Zisserman's pattern, at MNIST's scale).

    Against ``ConvNet`` (one 5 x 5 valid convolution per block, pooled at once) the first
    block sees the image at full resolution through two layers, and the padding keeps the
    border: a deeper trunk, at about three times the training time per image on a CPU in
    fp32 (about twice in bf16 with AMX tiles).

    Input (B, in_channels, H, W) float in [0, 1]; output (B, embedding_dim).
    """

    def __init__(
        self,
        embedding_dim: int = 64,
        in_channels: int = 1,
        channels: Sequence[int] = (16, 32),
        convs_per_block: int = 2,
        hidden_dim: int = 256,
        image_size: int = 28,
        l2_normalize: bool = False,
        mean: float = 0.1307,
        std: float = 0.3081,
    ) -> None:
        super().__init__(embedding_dim, l2_normalize, mean, std)
        if convs_per_block < 1:
            raise ValueError(f"convs_per_block={convs_per_block} must be >= 1")
        if image_size // 2 ** len(channels) < 1:  # each block halves the side
            raise ValueError(f"image_size={image_size} is too small for {len(channels)} blocks")
        layers: list[nn.Module] = []
        c_in, size = in_channels, image_size
        for c_out in channels:
            for _ in range(convs_per_block):
                layers += [nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, bias=False),
                           nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
                c_in = c_out
            layers.append(nn.MaxPool2d(2))
            size //= 2
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Flatten(),
                                  nn.Linear(c_in * size * size, hidden_dim, bias=False),
                                  nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True),
                                  nn.Linear(hidden_dim, embedding_dim))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))
