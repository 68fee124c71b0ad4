"""Gradient-matching distances between a candidate update and the observed one (dicts keyed by name)."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor

Distance = Callable[[Mapping[str, Tensor]], Tensor]
Objective = Callable[[Mapping[str, Tensor]], Distance]
"""An objective is prepared once from the observed update and returns the distance to evaluate per iteration."""


def euclidean(target: Mapping[str, Tensor]) -> Distance:
    """Squared Euclidean distance summed over all parameters (DLG, Zhu et al. 2019, Eq. 4)."""

    def distance(candidate: Mapping[str, Tensor]) -> Tensor:
        return sum(((candidate[k] - target[k]) ** 2).sum() for k in target)

    return distance


def cosine(target: Mapping[str, Tensor]) -> Distance:
    """``1 - cos(candidate, target)`` over all parameters jointly (Geiping et al. 2020, Eq. 4)."""
    target_norm = torch.as_tensor(sum(t.pow(2).sum() for t in target.values())).sqrt()

    def distance(candidate: Mapping[str, Tensor]) -> Tensor:
        dot = sum((candidate[k] * target[k]).sum() for k in target)
        cand_sq = sum(candidate[k].pow(2).sum() for k in target)
        return 1 - dot / (cand_sq.sqrt() * target_norm).clamp_min(1e-30)

    return distance


OBJECTIVES: dict[str, Objective] = {"euclidean": euclidean, "cosine": cosine}
