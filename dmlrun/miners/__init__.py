"""Miners pick informative tuples inside a batch. Contract:
``miner(embeddings (B, D), labels (B,)) -> MiningResult`` with pairs ``(a1, p, a2, n)``
or triplets ``(a, p, n)`` as LongTensors on the batch device.
"""

from dmlrun.miners.base import Miner, MiningResult
from dmlrun.miners.batch import HardMiner, RandomMiner, SemiHardMiner

__all__ = ["HardMiner", "Miner", "MiningResult", "RandomMiner", "SemiHardMiner"]
