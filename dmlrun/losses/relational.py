"""Relational knowledge distillation, distance-wise (RKD-D; Park et al., CVPR 2019).

A student learns the geometry of a teacher's embedding rather than its coordinates or its
labels: the distances among a batch's images in the student's space, each divided by
their mean, are pulled towards the same in the teacher's space. Dividing by the mean
makes the target free of scale, so the teacher may have another width (e.g. several
teachers' embeddings side by side) and the student keeps its own scale for its metric
loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def normalised_distances(x: torch.Tensor) -> torch.Tensor:
    """(B, D) points -> (B * (B - 1),) Euclidean distances between distinct points (row-major,
    the diagonal left out), divided by their mean."""
    d = torch.cdist(x, x)
    off = ~torch.eye(len(x), dtype=torch.bool, device=x.device)
    d = d[off]
    return d / d.mean().clamp_min(1e-12)


def relational_distance_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """RKD-D: Huber loss (smooth L1, threshold 1) between the normalised pairwise distances
    of (B, D) ``student`` and (B, T) ``teacher`` embeddings of the same B >= 2 images.
    No gradient reaches ``teacher``. Zero when the student's points are the teacher's up to
    a rotation, translation and scale."""
    if len(student) != len(teacher) or len(student) < 2:
        raise ValueError(f"need the same B >= 2 images in both, got {len(student)} and "
                         f"{len(teacher)}")
    with torch.no_grad():
        target = normalised_distances(teacher.float())
    return F.smooth_l1_loss(normalised_distances(student.float()), target)
