"""Defenses on the client's model (survey Table 2, "Training Model"): dropout before the classifier.

The other two rows of that group are settings of the scenario, not defenses to add: more local iterations
(``FedAvg(local_steps=K)``, Wei et al. 2020) and a narrower architecture (the rank analysis,
``gradinv analyze``, Zhu & Blaschko 2021).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from gradinv.defenses.base import ModelDefense, check_setting, register_defense
from gradinv.errors import ConfigError
from gradinv.models import classifier_layer


@dataclass(frozen=True)
class DropoutSettings:
    """``p``: probability that a classifier input is dropped in the client's forward pass; ``layer``: the linear
    layer whose input is dropped (None: the classifier)."""

    p: float = 0.5
    layer: str | None = None

    def __post_init__(self) -> None:
        check_setting(0 <= self.p < 1, f"dropout p must be in [0, 1), got {self.p}")


@register_defense
class Dropout(ModelDefense):
    """Dropout against deep leakage (Zheng 2021): the client trains with a dropout layer before the classifier,
    so its update is computed through a random mask the server never sees (inputs kept are scaled by
    1 / (1 - p)); the server's model is the same network without the mask. Each forward pass of the client
    (each local step) draws a new mask from the scenario's seed."""

    name = "dropout"
    summary = "the client drops classifier inputs with a random mask it keeps secret (Zheng 2021)"
    Settings = DropoutSettings
    primary = "p"

    def transform(self, model: nn.Module, *, generator: torch.Generator) -> nn.Module:
        s = self.settings
        client = copy.deepcopy(model)
        name = classifier_layer(client)[0] if s.layer is None else s.layer
        try:
            layer = client.get_submodule(name)
        except AttributeError:
            raise ConfigError(f"dropout: the model has no layer {name!r}") from None
        keep = 1.0 - s.p

        def drop(_module: nn.Module, args: tuple) -> tuple:
            x = args[0]
            mask = (torch.rand(x.shape, generator=generator) < keep).to(device=x.device, dtype=x.dtype)
            return (x * mask / keep, *args[1:])

        layer.register_forward_pre_hook(drop)
        return client
