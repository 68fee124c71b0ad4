"""Gradient-matching distances between a candidate update and the observed one (dicts keyed by name)."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor

from gradinv.errors import ConfigError

Objective = Callable[[Mapping[str, Tensor], Mapping[str, Tensor]], Tensor]


def euclidean(candidate: Mapping[str, Tensor], target: Mapping[str, Tensor]) -> Tensor:
    """Squared Euclidean distance summed over all parameters (DLG, Zhu et al. 2019, Eq. 4)."""
    return sum(((candidate[k] - target[k]) ** 2).sum() for k in target)


def cosine(candidate: Mapping[str, Tensor], target: Mapping[str, Tensor]) -> Tensor:
    """``1 - cos(candidate, target)`` over all parameters jointly (Geiping et al. 2020, Eq. 4)."""
    dot = sum((candidate[k] * target[k]).sum() for k in target)
    cand_sq = sum(candidate[k].pow(2).sum() for k in target)
    target_sq = sum(target[k].pow(2).sum() for k in target)
    return 1 - dot / (cand_sq.sqrt() * torch.as_tensor(target_sq).sqrt()).clamp_min(1e-30)


OBJECTIVES: dict[str, Objective] = {"euclidean": euclidean, "cosine": cosine}


def check_matching_settings(name: str, settings) -> None:
    """Reject iteration counts below one and unknown objectives before an attack starts."""
    if settings.iterations < 1 or settings.restarts < 1:
        raise ConfigError(f"{name} needs iterations >= 1 and restarts >= 1")
    if settings.objective not in OBJECTIVES:
        raise ConfigError(f"unknown objective {settings.objective!r}: choose one of {sorted(OBJECTIVES)}")
