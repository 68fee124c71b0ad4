"""Label recovery from the classifier layer's update, one method per file, behind one interface.

>>> estimate = recover_labels(observation, method="ilrg")
>>> estimate.counts, estimate.classes
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from gradinv._settings import one_of
from gradinv.attacks.labels import bias_sign as _bias_sign  # noqa: F401  (each import registers a method)
from gradinv.attacks.labels import fedavg_count as _fedavg_count  # noqa: F401
from gradinv.attacks.labels import idlg as _idlg  # noqa: F401
from gradinv.attacks.labels import ilrg as _ilrg  # noqa: F401
from gradinv.attacks.labels import llg as _llg  # noqa: F401
from gradinv.attacks.labels import rlg as _rlg  # noqa: F401
from gradinv.attacks.labels import yin as _yin  # noqa: F401
from gradinv.attacks.labels.base import (
    LABEL_METHODS,
    ClassifierUpdate,
    LabelEstimate,
    LabelMethod,
    classifier_update,
)
from gradinv.errors import ConfigError
from gradinv.registry import suggestion
from gradinv.types import Observation


def auto_method(observation: Observation) -> str:
    """The best available method for ``observation``: iDLG for one sample, iLRG when the classifier has a
    bias, else the count estimate from model statistics (it needs neither a bias nor non-negative features)."""
    if observation.knowledge.num_samples == 1:
        return "idlg"
    return "ilrg" if classifier_update(observation).bias is not None else "fedavg-count"


def check_methods(methods: list[str] | tuple[str, ...], *, allow_auto: bool = True) -> None:
    """Raise one :class:`ConfigError` naming every unknown label method in ``methods``."""
    known = (["auto"] if allow_auto else []) + sorted(LABEL_METHODS)
    unknown = [m for m in methods if m not in known]
    if unknown:
        hint = suggestion(unknown[0], known) if len(unknown) == 1 else ""
        raise ConfigError(f"unknown label method(s) {unknown}{hint}: choose from {', '.join(known)}")


def label_method_problems(method: str) -> list[str]:
    """A settings check: ``label_method`` must be ``"auto"`` or a registered label method."""
    return one_of("label_method", method, ["auto", *sorted(LABEL_METHODS)])


def label_declines(observation: Observation, method: str | None = "auto") -> list[str]:
    """Why :func:`labels_for` cannot give labels for ``observation`` with ``method``, as far as the observation
    tells before the method runs ([] when it can; a method may still refuse its data, e.g. Yin on repeated
    labels). ``method=None``: the attack needs only the classifier (DLG optimises soft labels over its classes)."""
    if observation.knowledge.labels is not None:
        return []
    linear = [m for m in observation.model.modules() if isinstance(m, nn.Linear)]
    if not linear:
        return ["the labels are not given and cannot be recovered: the model has no nn.Linear classifier"]
    if method == "idlg" and observation.knowledge.num_samples != 1:
        return ["label method 'idlg' reads the label of a batch of one; use label_method=auto or ilrg"]
    if method in ("ilrg", "bias-sign") and linear[-1].bias is None:
        return [f"label method {method!r} reads the classifier's bias gradient, but the classifier has no bias"]
    return []


def recover_labels(observation: Observation, *, method: str = "auto", **options: Any) -> LabelEstimate:
    """Labels of the observed batch by a named method (``"auto"``: :func:`auto_method`).

    ``options`` go to the method (e.g. ``auxiliary=`` inputs for ``llg-plus``).
    """
    check_methods([method])
    if method == "auto":
        method = auto_method(observation)
    return LABEL_METHODS[method](observation, **options)


def labels_for(observation: Observation, *, method: str = "auto") -> tuple[torch.Tensor, str]:
    """The labels an attack should use: the threat model's if it gives them, else recovered by ``method``.

    Returns one label per sample and where they came from (``"knowledge"`` or the method's name).
    """
    if observation.knowledge.labels is not None:
        return observation.knowledge.labels.clone(), "knowledge"
    estimate = recover_labels(observation, method=method)
    return estimate.as_batch(int(observation.knowledge.num_samples)), estimate.method


__all__ = [
    "LABEL_METHODS",
    "ClassifierUpdate",
    "LabelEstimate",
    "LabelMethod",
    "auto_method",
    "check_methods",
    "classifier_update",
    "label_declines",
    "label_method_problems",
    "labels_for",
    "recover_labels",
]
