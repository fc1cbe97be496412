"""Miners pick informative tuples inside a batch. Contract:
``miner(embeddings (B, D), labels (B,)) -> MiningResult`` with pairs ``(a1, p, a2, n)``
or triplets ``(a, p, n)`` as LongTensors on the batch device.

Adding a miner: subclass ``Miner``, set ``yields`` ("pairs" or "triplets"), write
``mine`` with (B, B) masks (no Python loops over anchors), add ``configs/miner/<name>.yaml``.
"""

from dmlrun.miners.base import Miner, MiningResult
from dmlrun.miners.batch import BatchAllMiner, HardMiner, RandomMiner, SemiHardMiner
from dmlrun.miners.distance_weighted import DistanceWeightedMiner
from dmlrun.miners.pairs import MultiSimilarityMiner, PairMarginMiner

__all__ = [
    "BatchAllMiner", "DistanceWeightedMiner", "HardMiner", "Miner", "MiningResult",
    "MultiSimilarityMiner", "PairMarginMiner", "RandomMiner", "SemiHardMiner",
]
