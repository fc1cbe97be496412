"""The classic MNIST embedding convnet (as in DrLIM-style Siamese experiments)."""

from collections.abc import Sequence

import torch
from torch import nn

from dmlrun.models.base import Embedder


class ConvNet(Embedder):
    """Conv(5x5)[+BatchNorm]+PReLU+MaxPool blocks, then an MLP head to ``embedding_dim``
    (``batch_norm``: also BatchNorm1d after each hidden linear layer; ``dropout``: that
    fraction of the last hidden layer's units zeroed in training, before the embedding
    layer, where no BatchNorm follows to see the shifted variance).

    ``pool_first`` max-pools before the PReLU: the same function while every PReLU slope
    is >= 0 (a max commutes with a non-decreasing map), with the activation and its
    backward pass on a quarter of the values; on a CPU the PReLU's backward is about a
    quarter of a training step otherwise. Its parameter names differ from the plain
    order's, so a checkpoint loads only into the order it was trained with.

    In evaluation the plain order pools first anyway while every slope is >= 0: the
    outputs are bit-identical (a max picks the same element before or after a
    non-decreasing map, and the map is applied to that element alike) and embedding runs
    about twice as fast on a CPU. Training keeps the order it was built with, since the
    slopes' gradients would be summed in another order.

    Input (B, in_channels, H, W) float in [0, 1]; output (B, embedding_dim).
    """

    def __init__(
        self,
        embedding_dim: int = 2,
        in_channels: int = 1,
        channels: Sequence[int] = (32, 64),
        hidden_dim: int = 256,
        image_size: int = 28,
        l2_normalize: bool = False,
        mean: float = 0.1307,
        std: float = 0.3081,
        batch_norm: bool = False,
        pool_first: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__(embedding_dim, l2_normalize, mean, std)
        blocks: list[nn.Module] = []
        size, c_in = image_size, in_channels
        for c_out in channels:
            act_pool = [nn.PReLU(), nn.MaxPool2d(2)]
            blocks += [nn.Conv2d(c_in, c_out, kernel_size=5, bias=not batch_norm),
                       *([nn.BatchNorm2d(c_out)] if batch_norm else []),
                       *(act_pool[::-1] if pool_first else act_pool)]
            size, c_in = (size - 4) // 2, c_out
        if size < 1:
            raise ValueError(f"image_size={image_size} is too small for {len(channels)} blocks")
        self.features = nn.Sequential(*blocks)
        # module order for evaluation: each block's PReLU after its MaxPool (plain order)
        self._pool_then_act: list[int] | None = None
        if not pool_first:
            order = list(range(len(blocks)))
            for i, m in enumerate(blocks):
                if isinstance(m, nn.MaxPool2d):
                    order[i - 1], order[i] = i, i - 1
            self._pool_then_act = order
        def hidden(n_in: int) -> list[nn.Module]:
            norm = [nn.BatchNorm1d(hidden_dim)] if batch_norm else []
            return [nn.Linear(n_in, hidden_dim, bias=not batch_norm), *norm, nn.PReLU()]

        if not 0 <= dropout < 1:
            raise ValueError(f"dropout={dropout} must be in [0, 1)")
        # no module at 0: the head's parameter names stay those of earlier checkpoints
        drop = [nn.Dropout(dropout)] if dropout > 0 else []
        self.head = nn.Sequential(nn.Flatten(), *hidden(c_in * size * size),
                                  *hidden(hidden_dim), *drop,
                                  nn.Linear(hidden_dim, embedding_dim))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        if self._pool_first_now():
            for i in self._pool_then_act:
                x = self.features[i](x)
            return self.head(x)
        return self.head(self.features(x))

    def _pool_first_now(self) -> bool:
        """Evaluate pooling before the PReLUs: in eval mode, plain order, every slope
        >= 0, and not while tracing or compiling (a branch on the weights' values)."""
        if self.training or self._pool_then_act is None or torch.jit.is_tracing() \
                or torch.compiler.is_compiling():
            return False
        return all(bool((m.weight >= 0).all()) for m in self.features
                   if isinstance(m, nn.PReLU))
