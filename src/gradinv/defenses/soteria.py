"""Soteria (Sun, Li, Wang, Yang, Li, Chen, CVPR 2021): perturb the data representation's gradient.

The client scores each feature f of the representation layer's input r (the classifier's, unless ``layer``
names another linear layer) by ``sum_i ||d r_f / d x_i|| / (r_f(x_i) + eps)`` and zeroes the weight-gradient
columns of the ``fraction`` of features with the smallest scores; every other tensor travels unchanged. The
paper's Inverting Gradients experiments prune 60% (``eps`` 0.1, as its code).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from gradinv.defenses import functional as D
from gradinv.defenses.base import ClientState, UpdateDefense, check_setting, register_defense
from gradinv.errors import ConfigError
from gradinv.fl.functional import layer_input
from gradinv.models import classifier_layer


@dataclass(frozen=True)
class SoteriaSettings:
    """``fraction``: share of representation features whose gradient columns are zeroed; ``layer``: the linear
    layer whose input is the representation (None: the classifier); ``eps``: added to r_f in the score."""

    fraction: float = 0.6
    layer: str | None = None
    eps: float = 0.1

    def __post_init__(self) -> None:
        check_setting(0 <= self.fraction < 1, f"soteria fraction must be in [0, 1), got {self.fraction}")
        check_setting(self.eps >= 0, f"soteria eps must be >= 0, got {self.eps}")


@register_defense
class Soteria(UpdateDefense):
    name = "soteria"
    summary = "zero the representation layer's most revealing gradient columns (Sun et al. 2021)"
    Settings = SoteriaSettings
    primary = "fraction"
    sparsifies = True
    __doc__ = __doc__

    def _layer(self, model: nn.Module) -> str:
        name = self.settings.layer
        if name is None:
            return classifier_layer(model)[0]
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ConfigError(f"soteria: the model has no layer {name!r}") from None
        if not isinstance(module, nn.Linear):
            raise ConfigError(f"soteria acts on a linear layer's input; {name!r} is a {type(module).__name__}")
        return name

    def mask(self, client: ClientState) -> tuple[str, Tensor]:
        """The layer and its keep-mask over input features, from the client's own batch."""
        name = self._layer(client.model)
        representation = layer_input(client.model, client.params, client.buffers, name)
        scores = D.soteria_scores(representation, client.batch.inputs, eps=self.settings.eps)
        return name, D.soteria_mask(scores, self.settings.fraction)

    def transform(
        self, update: Mapping[str, Tensor], *, client: ClientState, generator: torch.Generator
    ) -> dict[str, Tensor]:
        name, keep = self.mask(client)
        out = dict(update)
        key = f"{name}.weight"
        out[key] = update[key] * keep.to(update[key].dtype).unsqueeze(0)
        return out
