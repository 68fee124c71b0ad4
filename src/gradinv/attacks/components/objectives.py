"""Gradient-matching distances between a candidate update and the observed one (dicts keyed by parameter name).

An objective is prepared once from the observed update (and optional per-parameter weights) and returns the
distance evaluated every iteration. Layer weights (:func:`layer_weights`) let a preset stress some layers, as
breaching's ``layer_weights`` and SAPAG's per-layer terms do.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor

from gradinv.errors import ConfigError

Distance = Callable[[Mapping[str, Tensor]], Tensor]
Objective = Callable[..., Distance]
"""``objective(target, *, weights=None) -> distance``: prepared once from the observed update."""


def _weights(target: Mapping[str, Tensor], weights: Mapping[str, float] | None) -> dict[str, float]:
    return {k: 1.0 for k in target} if weights is None else {k: float(weights.get(k, 1.0)) for k in target}


def euclidean(target: Mapping[str, Tensor], *, weights: Mapping[str, float] | None = None) -> Distance:
    """Squared Euclidean distance summed over all parameters (DLG, Zhu et al. 2019, Eq. 4)."""
    w = _weights(target, weights)

    def distance(candidate: Mapping[str, Tensor]) -> Tensor:
        return sum(w[k] * ((candidate[k] - target[k]) ** 2).sum() for k in target if w[k])

    return distance


def cosine(target: Mapping[str, Tensor], *, weights: Mapping[str, float] | None = None) -> Distance:
    """``1 - cos(candidate, target)`` over all parameters jointly (Geiping et al. 2020, Eq. 4); with weights, the
    cosine of the weighted vectors."""
    w = _weights(target, weights)
    target_norm = torch.as_tensor(sum(w[k] * t.pow(2).sum() for k, t in target.items())).sqrt()

    def distance(candidate: Mapping[str, Tensor]) -> Tensor:
        dot = sum(w[k] * (candidate[k] * target[k]).sum() for k in target if w[k])
        cand_sq = sum(w[k] * candidate[k].pow(2).sum() for k in target if w[k])
        return 1 - dot / (cand_sq.sqrt() * target_norm).clamp_min(1e-30)

    return distance


def layer_cosine(target: Mapping[str, Tensor], *, weights: Mapping[str, float] | None = None) -> Distance:
    """Mean over parameters of ``1 - cos`` per parameter tensor (every layer counts the same whatever its norm)."""
    w = _weights(target, weights)
    norms = {k: t.pow(2).sum().sqrt() for k, t in target.items()}
    total = sum(w.values()) or 1.0

    def distance(candidate: Mapping[str, Tensor]) -> Tensor:
        terms = [
            w[k]
            * (1 - (candidate[k] * target[k]).sum() / (candidate[k].pow(2).sum().sqrt() * norms[k]).clamp_min(1e-30))
            for k in target
            if w[k]
        ]
        return sum(terms) / total

    return distance


def gaussian_kernel(
    target: Mapping[str, Tensor], *, weights: Mapping[str, float] | None = None, width: float = 1.0
) -> Distance:
    """SAPAG's distance (Wang et al. 2020, Eq. 3): ``sum_l w_l (1 - exp(-||g_l - t_l||^2 / sigma_l))`` with a
    per-layer width adapted to the observed update, ``sigma_l = width * numel_l * Var(t_l)`` (the expected
    squared distance to the update of an unrelated input of the same scale), so every layer's term lies in
    [0, 1) whatever its scale."""
    w = _weights(target, weights)
    sigma = {k: (width * t.numel() * t.var(unbiased=False)).clamp_min(1e-30) for k, t in target.items()}

    def distance(candidate: Mapping[str, Tensor]) -> Tensor:
        return sum(w[k] * (1 - torch.exp(-((candidate[k] - target[k]) ** 2).sum() / sigma[k])) for k in target if w[k])

    return distance


#: name -> objective; each takes the observed update and optional per-parameter weights
OBJECTIVES: dict[str, Objective] = {
    "euclidean": euclidean,
    "cosine": cosine,
    "layer_cosine": layer_cosine,
    "gaussian_kernel": gaussian_kernel,
}

#: how parameters are weighted by their depth (first parameter first)
LAYER_WEIGHTS = ("equal", "linear", "exp", "first", "last")


def layer_weights(names: list[str], scheme: str) -> dict[str, float] | None:
    """Weights per parameter by depth: ``equal`` (None), ``linear`` (from 1 at the input down to 1/L),
    ``exp`` (halving every layer from the input), ``first``/``last`` (only the first/last parameter tensor pair,
    weight and bias). Names are in the model's order."""
    n = len(names)
    if scheme == "equal" or n == 0:
        return None
    if scheme == "linear":
        return {k: (n - i) / n for i, k in enumerate(names)}
    if scheme == "exp":
        return {k: 0.5 ** (i // 2) for i, k in enumerate(names)}
    if scheme in ("first", "last"):
        keep = set(names[:2] if scheme == "first" else names[-2:])
        return {k: 1.0 if k in keep else 0.0 for k in names}
    raise ConfigError(f"layer weights must be one of {', '.join(LAYER_WEIGHTS)}, got {scheme!r}")
