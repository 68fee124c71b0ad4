"""The bias-gradient sign rule (iDLG's observation extended to batches; see Wainakh et al. 2022, Sec. 4).

``db_c = (1/B) sum_n (p_nc - y_nc)``: a class absent from the batch has ``db_c = mean_n p_nc > 0``, so every
negative entry is a class present in the batch. It holds for any activation. A present class can still show a
positive entry when the model is confident on other samples, so the set it gives may miss classes; it gives
no counts.
"""

from __future__ import annotations

import torch

from gradinv.attacks.labels.base import LabelEstimate, classifier_update, register_label_method
from gradinv.types import Observation


@register_label_method(
    "bias-sign", summary="classes whose bias gradient is negative (the set; any activation)", gives_counts=False
)
def bias_sign_labels(observation: Observation) -> LabelEstimate:
    """The classes with a negative bias gradient."""
    cu = classifier_update(observation)
    bias = cu.require_bias("the bias-sign rule")
    return LabelEstimate.from_classes(
        "bias-sign", torch.nonzero(bias < 0).flatten(), num_classes=cu.num_classes, scores=bias
    )
