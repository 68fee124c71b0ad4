"""Distinct-label rule of Yin et al. 2021 ("See through Gradients: Image Batch Recovery via GradInversion").

With non-negative features entering the classifier (ReLU), a class absent from the batch has an all-positive
weight-gradient row (``p_nc * h_n >= 0`` for every sample), while a present class's row holds negative entries
where its own samples' features dominate. For a batch of distinct labels, the ``B`` classes with the most
negative row minimum are the labels. The rule cannot count repeated labels: when fewer than ``B`` rows have a
negative entry, the labels repeat and the rule says so.
"""

from __future__ import annotations

import torch

from gradinv.attacks.labels.base import (
    LabelEstimate,
    classifier_update,
    num_samples,
    register_label_method,
    require_nonnegative_features,
)
from gradinv.errors import AttackError
from gradinv.types import Observation


@register_label_method(
    "yin",
    summary="Yin et al. 2021: the B most negative per-class minima of the weight gradient (distinct labels)",
    gives_counts=False,
)
def yin_labels(observation: Observation) -> LabelEstimate:
    """The ``B`` classes with the most negative classifier weight-gradient rows (labels must be distinct)."""
    b = num_samples(observation, "yin")
    cu = classifier_update(observation)
    if b > cu.num_classes:
        raise AttackError(
            f"Yin et al.'s rule assumes distinct labels, impossible with {b} samples and {cu.num_classes} classes: "
            "use ilrg or llg"
        )
    require_nonnegative_features(observation, "yin")
    minima = cu.weight.min(dim=1).values
    negative = int((minima < 0).sum())
    if negative < b:
        raise AttackError(
            f"only {negative} classes show a negative gradient entry for a batch of {b}: labels repeat, which "
            "Yin et al.'s rule cannot count; use ilrg or llg"
        )
    labels = torch.argsort(minima)[:b]
    return LabelEstimate.from_classes("yin", labels, num_classes=cu.num_classes, scores=minima)
