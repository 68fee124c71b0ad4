"""A model read as a chain of linear layers (convolution or fully connected) and element-wise activations.

Recursion-based attacks (R-GAP, Zhu & Blaschko 2021) and their rank analysis walk such a chain backwards:
each layer is a linear map of its input, followed by an activation they must invert. The chain is found by
running one probe input through the model and recording the leaf modules in execution order; reshapes
(``flatten``) between layers are transparent, anything else (pooling, normalisation, dropout...) is refused.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from gradinv.errors import AttackError

#: activations R-GAP can invert, element-wise, with their inverse and derivative at the pre-activation
INVERTIBLE = ("identity", "leaky_relu", "sigmoid", "tanh")


@dataclass(frozen=True)
class ChainLayer:
    """One linear layer of the chain, the activation after it, and its input/output shapes (no batch dim)."""

    name: str
    module: nn.Module  # nn.Conv2d or nn.Linear
    activation: str  # "identity", "leaky_relu", "sigmoid", "tanh", "relu" or a class name
    slope: float  # negative slope of leaky_relu
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]

    @property
    def kind(self) -> str:
        return "conv" if isinstance(self.module, nn.Conv2d) else "linear"

    @property
    def invertible(self) -> bool:
        return self.activation in INVERTIBLE

    def activate(self, u: Tensor) -> Tensor:
        """The activation applied to the pre-activation output ``u``."""
        if self.activation == "identity":
            return u
        if self.activation == "leaky_relu":
            return torch.where(u >= 0, u, u * self.slope)
        if self.activation == "sigmoid":
            return torch.sigmoid(u)
        if self.activation == "tanh":
            return torch.tanh(u)
        if self.activation == "relu":
            return torch.relu(u)
        raise AttackError(f"unknown activation {self.activation!r} after '{self.name}'")

    def inverse_activation(self, y: Tensor) -> Tensor:
        if self.activation == "identity":
            return y
        if self.activation == "leaky_relu":
            return torch.where(y >= 0, y, y / self.slope)
        if self.activation == "sigmoid":
            y = y.clamp(1e-12, 1 - 1e-12)
            return torch.log(y) - torch.log1p(-y)
        if self.activation == "tanh":
            return torch.atanh(y.clamp(-1 + 1e-12, 1 - 1e-12))
        raise AttackError(f"the {self.activation} after '{self.name}' is not invertible: R-GAP cannot pass it")

    def activation_derivative(self, u: Tensor) -> Tensor:
        if self.activation == "identity":
            return torch.ones_like(u)
        if self.activation == "leaky_relu":
            return torch.where(u >= 0, torch.ones_like(u), torch.full_like(u, self.slope))
        if self.activation == "sigmoid":
            s = torch.sigmoid(u)
            return s * (1 - s)
        if self.activation == "tanh":
            return 1 - torch.tanh(u) ** 2
        raise AttackError(f"the {self.activation} after '{self.name}' is not invertible: R-GAP cannot pass it")


_ACTIVATIONS = {nn.LeakyReLU: "leaky_relu", nn.Sigmoid: "sigmoid", nn.Tanh: "tanh", nn.ReLU: "relu"}
_TRANSPARENT = (nn.Flatten, nn.Identity, nn.Unflatten)


def layer_chain(model: nn.Module, input_shape: tuple[int, ...]) -> list[ChainLayer]:
    """The model's chain of linear layers, from one probe forward pass (on a copy-free, no-grad call)."""
    calls: list[tuple[str, nn.Module, tuple[int, ...], tuple[int, ...]]] = []
    handles = []
    for name, module in model.named_modules():
        if next(module.children(), None) is None:  # leaf modules only

            def hook(mod, args, out, name=name):
                calls.append((name, mod, tuple(args[0].shape[1:]), tuple(out.shape[1:])))

            handles.append(module.register_forward_hook(hook))
    was_training = model.training
    try:
        model.eval()
        dtype = next((p.dtype for p in model.parameters()), torch.float32)
        with torch.no_grad():
            model(torch.zeros((1, *input_shape), dtype=dtype))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    chain: list[ChainLayer] = []
    for name, module, in_shape, out_shape in calls:
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            if isinstance(module, nn.Conv2d) and (module.groups != 1 or module.dilation != (1, 1)):
                raise AttackError(f"'{name}': grouped or dilated convolutions are not supported by R-GAP here")
            chain.append(ChainLayer(name, module, "identity", 0.0, in_shape, out_shape))
        elif type(module) in _ACTIVATIONS:
            if not chain or chain[-1].activation != "identity":
                raise AttackError(f"activation '{name}' does not follow a linear layer: not a plain chain")
            slope = float(module.negative_slope) if isinstance(module, nn.LeakyReLU) else 0.0
            last = chain[-1]
            chain[-1] = ChainLayer(last.name, last.module, _ACTIVATIONS[type(module)], slope, last.in_shape, out_shape)
        elif isinstance(module, _TRANSPARENT):
            continue
        else:
            raise AttackError(
                f"'{name}' is a {type(module).__name__}: recursive attacks handle chains of convolutions and fully "
                "connected layers with element-wise activations only"
            )
    if not chain:
        raise AttackError("the model has no convolution or fully connected layer")
    return chain
