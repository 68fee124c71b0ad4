"""iDLG label rule (Zhao et al. 2020, "iDLG: Improved Deep Leakage from Gradients"), batch of one.

With cross-entropy, the classifier's gradient for class ``c`` is ``(p_c - y_c) * h``: the true class is the
only one with a negative factor. With a bias the factor is the bias gradient itself; without one, the true
class's weight row points against every other row, whatever the sign of the features.
"""

from __future__ import annotations

import torch

from gradinv.attacks.labels.base import LabelEstimate, classifier_update, num_samples, register_label_method
from gradinv.errors import AttackError
from gradinv.types import Observation


@register_label_method(
    "idlg", summary="iDLG (Zhao et al. 2020): the one negative entry of a single sample's gradient", gives_counts=True
)
def idlg_labels(observation: Observation) -> LabelEstimate:
    """The label of a single-sample update."""
    if num_samples(observation, "idlg") != 1:
        raise AttackError("the iDLG label rule needs a batch of one; use 'ilrg', 'llg' or 'auto' for larger batches")
    cu = classifier_update(observation)
    if cu.bias is not None and int((cu.bias < 0).sum()) == 1:
        label = int(torch.argmin(cu.bias))
        scores = cu.bias
    else:
        rows = cu.weight
        ref = int(torch.argmax(rows.norm(dim=1)))
        scores = rows @ rows[ref]
        negative = torch.nonzero(scores < 0).flatten()
        # if the largest row is the true one, every other row points against it
        label = ref if len(negative) != 1 else int(negative[0])
    counts = torch.zeros(cu.num_classes, dtype=torch.long)
    counts[label] = 1
    return LabelEstimate.from_counts("idlg", counts, scores=scores)
