"""Fully connected classifier, the setting of analytic attacks (Phong et al. 2017; Geiping et al. 2020)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from gradinv.errors import ConfigError, ShapeError
from gradinv.models._registry import register_model

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "sigmoid": nn.Sigmoid,
    "leaky_relu": nn.LeakyReLU,
    "tanh": nn.Tanh,
}


def make_activation(name: str) -> nn.Module:
    """Return a fresh activation module for ``name`` (one of :data:`ACTIVATIONS`)."""
    try:
        return ACTIVATIONS[name]()
    except KeyError:
        raise ConfigError(f"unknown activation {name!r}; choose one of {', '.join(sorted(ACTIVATIONS))}") from None


class MLP(nn.Module):
    """Multi-layer perceptron on the flattened input.

    The linear layers are ``layers.0`` … ``layers.{len(hidden)}``; the last one is the classifier.
    ``hidden=()`` gives a single linear layer (softmax regression).
    """

    def __init__(
        self,
        *,
        in_features: int,
        num_classes: int,
        hidden: Sequence[int] = (256, 256),
        activation: str = "relu",
        bias: bool = True,
    ) -> None:
        super().__init__()
        if in_features < 1 or num_classes < 1 or any(int(h) < 1 for h in hidden):
            raise ConfigError(
                f"MLP sizes must be positive (in_features={in_features}, hidden={tuple(hidden)}, "
                f"num_classes={num_classes})"
            )
        self.in_features = int(in_features)
        self.activation_name = activation
        self.act = make_activation(activation)
        widths = [self.in_features, *(int(h) for h in hidden), int(num_classes)]
        self.layers = nn.ModuleList(nn.Linear(a, b, bias=bias) for a, b in zip(widths[:-1], widths[1:], strict=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        if x.shape[1] != self.in_features:
            raise ShapeError(f"MLP expects {self.in_features} input features per example, got {x.shape[1]}")
        for layer in self.layers[:-1]:
            x = self.act(layer(x))
        return self.layers[-1](x)


@register_model("mlp", summary="MLP on flattened pixels (hidden=(256, 256), relu)")
def _build(
    *,
    in_channels: int,
    num_classes: int,
    image_size: int,
    hidden: Sequence[int] = (256, 256),
    activation: str = "relu",
    bias: bool = True,
) -> MLP:
    return MLP(
        in_features=in_channels * image_size * image_size,
        num_classes=num_classes,
        hidden=hidden,
        activation=activation,
        bias=bias,
    )
