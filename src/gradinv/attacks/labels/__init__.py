"""Label recovery from the classifier layer's update, one method per file."""

from __future__ import annotations

import torch

from gradinv.attacks.labels import idlg as _idlg  # noqa: F401  (registers)
from gradinv.attacks.labels import yin as _yin  # noqa: F401  (registers)
from gradinv.attacks.labels.base import LABEL_METHODS, LabelEstimate, classifier_update
from gradinv.errors import ConfigError
from gradinv.types import Observation


def recover_labels(observation: Observation, *, method: str = "auto") -> LabelEstimate:
    """Labels of the observed batch by a named method; ``"auto"`` picks iDLG for one sample, else Yin."""
    if method == "auto":
        method = "idlg" if observation.knowledge.num_samples == 1 else "yin"
    if method not in LABEL_METHODS:
        raise ConfigError(f"unknown label method {method!r}: choose one of auto, {', '.join(sorted(LABEL_METHODS))}")
    return LABEL_METHODS[method](observation)


def labels_for(observation: Observation, *, method: str = "auto") -> tuple[torch.Tensor, str]:
    """The labels an attack should use: the threat model's if it gives them, else recovered by ``method``.

    Returns the labels and where they came from (``"knowledge"`` or the method's name).
    """
    if observation.knowledge.labels is not None:
        return observation.knowledge.labels.clone(), "knowledge"
    estimate = recover_labels(observation, method=method)
    return estimate.labels, estimate.method


__all__ = ["LABEL_METHODS", "LabelEstimate", "classifier_update", "labels_for", "recover_labels"]
