"""Semi-supervised DML: the pseudo-labelling methods and their bookkeeping
(``labels``), the task that trains with them (``task``), its plot (``plots``)."""

from dmlrun.semi.labels import (
    FEATURE_LAYERS,
    GRAPH_SPACES,
    MIN_GRAPH_DIM,
    KMeansPseudoLabeler,
    LabelPropagation,
    PseudoLabels,
    SemiSupervision,
    feature_layer,
    keep_most_confident,
    knn_indices,
    pca,
    pick_labeled,
    pseudo_label_quality,
    weighted_pk_batches,
)

__all__ = ["FEATURE_LAYERS", "GRAPH_SPACES", "MIN_GRAPH_DIM", "KMeansPseudoLabeler",
           "LabelPropagation", "PseudoLabels", "SemiSupervision", "feature_layer",
           "keep_most_confident", "knn_indices", "pca",
           "pick_labeled", "pseudo_label_quality", "weighted_pk_batches"]
