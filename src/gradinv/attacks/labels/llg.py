"""LLG, LLG* and LLG+ (Wainakh et al. 2022, "User-Level Label Leakage from Gradients in Federated Learning").

LLG reads ``g_c = sum_d dW[c, d]``, the per-class sum of the classifier's weight gradient. With non-negative
features, ``g_c = offset_c + count_c * m``: every sample of class ``c`` adds about the same negative *impact*
``m``, and an absent class only a small positive *offset*. So (1) every class with ``g_c < 0`` is present
once; its impact is removed; (2) the remaining samples go one by one to the class whose corrected ``g`` is
lowest, removing one impact each time.

- ``llg``: no knowledge beyond the update; ``m = (1 + 1/K) * sum_{g_c < 0} g_c / B``, no offset.
- ``llg-star``: ``m`` and the offsets estimated by the server from *dummy* inputs (random, no data knowledge).
- ``llg-plus``: the same estimated from *auxiliary* data of the task's distribution.

The estimates follow the paper: for a probe batch all of class ``i``, ``g_i / B`` is the impact of one sample
and ``g_j`` (``j != i``) the offset of an absent class; since labels do not change the features, one forward
pass over the probe gives both for every class at once.
"""

from __future__ import annotations

import torch
from torch import Tensor

from gradinv.attacks.labels.base import (
    LabelEstimate,
    classifier_update,
    num_samples,
    probe_model,
    random_inputs,
    register_label_method,
    require_nonnegative_features,
)
from gradinv.errors import AttackError, MissingKnowledgeError
from gradinv.types import Observation

DEFAULT_PROBES = 32


def assign(g: Tensor, *, batch_size: int, impact: float, offset: Tensor | None = None) -> Tensor:
    """LLG's assignment: counts from per-class sums ``g``, a negative per-sample ``impact`` and offsets."""
    if not impact < 0:
        raise AttackError(f"LLG's impact estimate must be negative, got {impact:.3g}: the update carries no label sign")
    g = g.clone()
    counts = torch.zeros(g.numel(), dtype=torch.long)
    present = torch.nonzero(g < 0).flatten()
    if present.numel() > batch_size:  # more negative sums than samples (approximate updates): keep the lowest
        present = torch.argsort(g)[:batch_size]
    if offset is not None:
        g -= offset
    counts[present] = 1
    g[present] -= impact
    for _ in range(batch_size - present.numel()):
        j = int(torch.argmin(g))
        counts[j] += 1
        g[j] -= impact
    return counts


def _probe_statistics(observation: Observation, inputs: Tensor, batch_size: int, method: str) -> tuple[float, Tensor]:
    probe = probe_model(observation, inputs)
    require_nonnegative_features(observation, method, probe=probe)
    s = probe.feature_sums[:, None]
    k = probe.probs.shape[1]
    impact = float(((probe.probs - 1.0) * s).mean(dim=0).mean()) / batch_size * (1.0 + 1.0 / k)
    offset = (probe.probs * s).mean(dim=0)
    return impact, offset


@register_label_method(
    "llg",
    summary="LLG (Wainakh et al. 2022): counts from weight-gradient sums, impact from the update",
    gives_counts=True,
)
def llg_labels(observation: Observation) -> LabelEstimate:
    b = num_samples(observation, "llg")
    cu = classifier_update(observation)
    require_nonnegative_features(observation, "llg")
    g = cu.row_sums
    impact = float(g[g < 0].sum()) / b * (1.0 + 1.0 / cu.num_classes)
    return LabelEstimate.from_counts("llg", assign(g, batch_size=b, impact=impact), scores=g, impact=impact)


@register_label_method(
    "llg-star",
    summary="LLG* (Wainakh et al. 2022): impact and offsets estimated on random dummy inputs",
    gives_counts=True,
    options=("probes", "seed"),
)
def llg_star_labels(observation: Observation, *, probes: int = DEFAULT_PROBES, seed: int = 0) -> LabelEstimate:
    b = num_samples(observation, "llg-star")
    cu = classifier_update(observation)
    impact, offset = _probe_statistics(observation, random_inputs(observation, probes, seed=seed), b, "llg-star")
    counts = assign(cu.row_sums, batch_size=b, impact=impact, offset=offset)
    return LabelEstimate.from_counts("llg-star", counts, scores=cu.row_sums - offset, impact=impact)


@register_label_method(
    "llg-plus",
    summary="LLG+ (Wainakh et al. 2022): impact and offsets estimated on auxiliary data",
    gives_counts=True,
    options=("auxiliary",),
)
def llg_plus_labels(observation: Observation, *, auxiliary: Tensor | None = None) -> LabelEstimate:
    if auxiliary is None or len(auxiliary) == 0:
        raise MissingKnowledgeError(
            "llg-plus needs auxiliary inputs of the task (normalised, any labels): pass auxiliary=..., "
            "or use llg-star (dummy inputs) or llg"
        )
    b = num_samples(observation, "llg-plus")
    cu = classifier_update(observation)
    impact, offset = _probe_statistics(observation, auxiliary, b, "llg-plus")
    counts = assign(cu.row_sums, batch_size=b, impact=impact, offset=offset)
    return LabelEstimate.from_counts("llg-plus", counts, scores=cu.row_sums - offset, impact=impact)
