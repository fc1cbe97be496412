"""dmlrun: a command-line experiment runner for deep metric learning.

The public API: ``load_embedder`` (a trained model from a run folder, as a
``TrainedEmbedder``), ``evaluate`` (query/reference retrieval metrics) and ``Index``
(embed images with a run's model, search them).
They load lazily (PEP 562), deliberately: the commands' ``--help`` answers without
importing torch.
"""

from __future__ import annotations

import importlib
from typing import Any

from dmlrun import config as _config  # noqa: F401  (registers resolvers)

__version__ = "0.1.0"

_LAZY = {"TrainedEmbedder": "dmlrun.embedder", "load_embedder": "dmlrun.embedder",
         "evaluate": "dmlrun.metrics", "Index": "dmlrun.index"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'dmlrun' has no attribute {name!r}")


__all__ = ["Index", "TrainedEmbedder", "__version__", "evaluate", "load_embedder"]
