"""A pair or triplet loss with a class-level term beside it: ``main`` takes the miner's
tuples, ``auxiliary`` (a proxy or classifier loss) sees every sample of the batch, and
the two are summed as ``main + weight * auxiliary``. Re-identification's strong baselines
train this way (triplet plus a classifier, Luo et al. 2019): the tuples order local
neighbourhoods, the class term places whole classes apart."""

from __future__ import annotations

from dmlrun.losses.base import LossOutput, MetricLoss


class WithAuxiliaryLoss(MetricLoss):
    """``main(embeddings, labels, indices) + weight * auxiliary(embeddings, labels)``.
    Tuple counts, the distance and the margin are the main loss's; the auxiliary's own
    parameters (proxies) train at its ``param_lr``."""

    def __init__(self, main: MetricLoss, auxiliary: MetricLoss, weight: float = 1.0) -> None:
        super().__init__(main.distance, main.reduction)
        if auxiliary.accepts:
            raise ValueError(f"the auxiliary loss must use the whole batch (a proxy or "
                             f"classifier loss); {type(auxiliary).__name__} takes mined "
                             "tuples")
        if weight < 0:
            raise ValueError(f"weight must be >= 0, got {weight}")
        self.main, self.auxiliary, self.weight = main, auxiliary, float(weight)
        self.accepts = main.accepts
        self.distances = main.distances
        self.distance_params = main.distance_params
        self.param_lr = auxiliary.param_lr

    def __getattr__(self, name: str):
        # hyper-parameters the run reads from its loss (margin, soft) are the main loss's
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name.startswith("_") or "main" not in self.__dict__.get("_modules", {}):
                raise
            return getattr(self._modules["main"], name)

    def _check(self, embeddings, labels, indices) -> None:
        pass  # main.compute and auxiliary.compute check their own inputs

    def _compute(self, embeddings, labels, indices) -> LossOutput:
        main = self.main.compute(embeddings, labels, indices)
        aux = self.auxiliary.compute(embeddings, labels, None)
        return main._replace(loss=main.loss + self.weight * aux.loss)

    def epoch_warnings(self, record: dict, first_neg_distance: float) -> list[str]:
        return self.main.epoch_warnings(record, first_neg_distance)

    def plot_margin(self) -> float | None:
        return self.main.plot_margin()

    def extra_repr(self) -> str:
        return f"weight={self.weight}"
