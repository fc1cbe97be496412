"""Datasets held in memory as uint8 tensors, splits, and batch samplers."""

from dmlrun.data.dataset import Split, TensorDataset, images_to_float
from dmlrun.data.idx import load_fashion_mnist, load_mnist
from dmlrun.data.image_folder import load_image_folder
from dmlrun.data.samplers import Epoch, PairSampler, PKSampler, TripletSampler

__all__ = [
    "Epoch",
    "PKSampler",
    "PairSampler",
    "Split",
    "TensorDataset",
    "TripletSampler",
    "images_to_float",
    "load_fashion_mnist",
    "load_image_folder",
    "load_mnist",
]
