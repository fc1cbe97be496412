"""Embedding networks. Each maps float images in [0, 1] to (B, D) embeddings."""

from dmlrun.models.convnet import ConvNet
from dmlrun.models.mlp import MLP
from dmlrun.models.vgg import VGGNet

__all__ = ["ConvNet", "MLP", "VGGNet"]
