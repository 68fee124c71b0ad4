"""Distinct-label rule of Yin et al. 2021 ("See through Gradients: Image Batch Recovery via GradInversion").

For a batch whose labels are distinct and non-negative features feed the classifier, the classes present
are those whose weight-gradient rows hold the most negative entries: take the ``B`` classes with the
smallest row minimum. With a bias, the ``B`` most negative bias gradients say the same more directly.
"""

from __future__ import annotations

import torch

from gradinv.attacks.labels.base import LabelEstimate, classifier_update, num_samples, register_label_method
from gradinv.errors import AttackError
from gradinv.types import Observation


@register_label_method("yin")
def yin_labels(observation: Observation) -> LabelEstimate:
    """The ``B`` classes with the most negative classifier-gradient rows (labels assumed distinct)."""
    b = num_samples(observation)
    cu = classifier_update(observation)
    if b > cu.num_classes:
        raise AttackError(
            f"Yin et al.'s rule assumes distinct labels, impossible with {b} samples and {cu.num_classes} classes"
        )
    score = cu.bias if cu.bias is not None else cu.weight.min(dim=1).values
    labels = torch.argsort(score)[:b]
    return LabelEstimate(labels=torch.sort(labels).values, method="yin", counts_exact=False)
