"""iDLG label rule (Zhao et al. 2020, "iDLG: Improved Deep Leakage from Gradients"), batch of one.

With cross-entropy, the classifier's update for class ``c`` is ``(p_c - y_c) * h``: the true class is the
only one with a negative factor. With a bias the factor is the bias gradient itself; without one, the true
class's weight row points against every other row, whatever the sign of the features.
"""

from __future__ import annotations

import torch

from gradinv.attacks.labels.base import LabelEstimate, classifier_update, num_samples, register_label_method
from gradinv.errors import AttackError
from gradinv.types import Observation


@register_label_method("idlg")
def idlg_labels(observation: Observation) -> LabelEstimate:
    """The label of a single-sample update."""
    if num_samples(observation) != 1:
        raise AttackError("the iDLG label rule needs a batch of one; use 'yin' or 'auto' for larger batches")
    cu = classifier_update(observation)
    if cu.bias is not None and (cu.bias < 0).sum() == 1:
        label = int(torch.argmin(cu.bias))
    else:
        rows = cu.weight
        ref = int(torch.argmax(rows.norm(dim=1)))
        dots = rows @ rows[ref]
        negative = torch.nonzero(dots < 0).flatten()
        # if the largest row is the true one, every other row points against it
        label = ref if len(negative) != 1 else int(negative[0])
    return LabelEstimate(labels=torch.tensor([label]), method="idlg")
