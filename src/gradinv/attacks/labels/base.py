"""Label recovery from the classifier layer's update: the common interface."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from gradinv.errors import AttackError
from gradinv.models import classifier_layer
from gradinv.types import Observation


@dataclass(frozen=True, eq=False)
class LabelEstimate:
    """Recovered labels: a multiset as a tensor of class indices (sorted), and the method that gave it."""

    labels: Tensor
    method: str
    counts_exact: bool = True

    def counts(self, num_classes: int) -> Tensor:
        return torch.bincount(self.labels, minlength=num_classes)


@dataclass(frozen=True, eq=False)
class ClassifierUpdate:
    """The classifier layer's update expressed as a gradient of the loss (sign-corrected for FedAvg)."""

    layer: str
    weight: Tensor  # (K, D)
    bias: Tensor | None  # (K,)

    @property
    def num_classes(self) -> int:
        return self.weight.shape[0]


def classifier_update(observation: Observation) -> ClassifierUpdate:
    """The last linear layer's update, found by module type; a weight delta is turned into the direction of
    the accumulated gradient (``-delta``), which is what the sign rules read."""
    name, _ = classifier_layer(observation.model)
    try:
        w = observation.update[f"{name}.weight"]
    except KeyError:
        raise AttackError(
            f"the update holds no '{name}.weight': label recovery needs the classifier's update"
        ) from None
    b = observation.update.get(f"{name}.bias")
    sign = -1.0 if observation.update_kind == "weight_delta" else 1.0
    return ClassifierUpdate(
        layer=name, weight=sign * w.detach().double(), bias=None if b is None else sign * b.detach().double()
    )


def num_samples(observation: Observation) -> int:
    n = observation.knowledge.num_samples
    if n is None:
        raise AttackError("label recovery needs the number of samples: give it in the threat model")
    return int(n)


LabelMethod = Callable[[Observation], LabelEstimate]
LABEL_METHODS: dict[str, LabelMethod] = {}


def register_label_method(name: str) -> Callable[[LabelMethod], LabelMethod]:
    def wrap(fn: LabelMethod) -> LabelMethod:
        LABEL_METHODS[name] = fn
        return fn

    return wrap
