"""R-GAP: Recursive Gradient Attack on Privacy (Zhu & Blaschko, ICLR 2021).

For one sample, every linear layer ``u = W x (+ b)`` gives two linear systems in its input ``x`` (the survey's
Eq. 6): the *forward* constraint ``W x = u - b`` and the *gradient* constraint ``dL/dW = delta x^T`` (for a
convolution, ``dL/dW[o, q] = sum_p delta[o, p] x[idx(q, p)]`` over output positions ``p`` and kernel taps
``q``), where ``u`` and ``delta = dL/du`` are known from the layer above. The recursion starts at the
classifier (``x = dW^T db / |db|^2``, ``delta_x = W^T db``), and at each layer solves both systems jointly by
least squares, inverts the activation below (``u = sigma^-1(x)``) and moves ``delta`` down through the layer
(``delta_x = W^T delta``, ``delta_u = delta_x * sigma'(u)``), until the image. Needs batch 1, a FedSGD
gradient, invertible activations (LeakyReLU, sigmoid, tanh) and a classifier with a bias.

The joint least squares is solved from its normal equations in float64: for a convolution the gradient
block's normal matrix is assembled directly from ``delta^T delta`` (``sum_q U_q^T (delta^T delta) U_q`` with
``U_q`` the input pixels under tap ``q``), so no dense system larger than (inputs x inputs) is ever built. The
two blocks are balanced by their traces; the system being consistent, the weighting changes only rounding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gradinv.attacks.base import Attack, AttackOutput, Callback, LabelSettings, register_attack
from gradinv.attacks.components.chain import ChainLayer, layer_chain
from gradinv.attacks.labels import label_declines, labels_for
from gradinv.errors import AttackError
from gradinv.fl.protocols import FedSGD
from gradinv.types import Observation

PIVOT_RTOL = 1e-12  # below this relative pivot the joint system is treated as rank-deficient


@dataclass(frozen=True)
class LayerSolution:
    """A layer's recovered input and how well it satisfies the two constraint systems."""

    inputs: Tensor  # float64, the layer's input shape
    forward_residual: float  # |W x - u| / |u|
    gradient_residual: float  # |G x - dW| / |dW|
    full_rank: bool = True  # False: the joint system is rank-deficient and ``inputs`` is its minimum-norm solution


def _unfold_index(layer: nn.Conv2d, in_shape: tuple[int, ...]) -> Tensor:
    """(C*k*k, P) input index under each kernel tap and output position; -1 where the tap hits padding."""
    c, h, w = in_shape
    index = torch.arange(c * h * w, dtype=torch.float64).reshape(1, c, h, w) + 1.0
    cols = F.unfold(index, layer.kernel_size, padding=layer.padding, stride=layer.stride)[0]
    return cols.round().long() - 1


def _scatter_gram(gram: Tensor, index: Tensor, valid: Tensor, n: int) -> Tensor:
    """``sum_r U_r^T gram U_r`` for index rows ``r`` of ``index`` (R, S) mapping ``S`` slots to inputs (-1: none)."""
    slot = torch.where(valid, index, n)  # padding goes to a dummy row/column, dropped at the end
    linear = (slot[:, :, None] * (n + 1) + slot[:, None, :]).reshape(-1)
    flat = torch.zeros((n + 1) * (n + 1), dtype=torch.float64)
    flat.index_add_(0, linear, gram.expand(index.shape[0], -1, -1).reshape(-1))
    return flat.reshape(n + 1, n + 1)[:n, :n]


def _target(layer: ChainLayer, u: Tensor, bias: Tensor | None) -> Tensor:
    if bias is None:
        return u
    return u - (bias.double() if layer.kind == "linear" else bias.double()[:, None, None])


def gradient_system(
    layer: ChainLayer, delta: Tensor, grad_weight: Tensor, *, index: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Normal equations of the gradient constraint alone: ``dL/dW = delta x^T`` (fully connected) or
    ``dL/dW[o, q] = sum_p delta[o, p] x[idx(q, p)]`` (convolution: the stacked-filter FC equivalent)."""
    delta, grad_weight = delta.double(), grad_weight.double()
    if layer.kind == "linear":
        d = delta.flatten()
        return (d @ d) * torch.eye(grad_weight.shape[1], dtype=torch.float64), grad_weight.T @ d
    index = _unfold_index(layer.module, layer.in_shape) if index is None else index  # (Q, P)
    valid = index >= 0
    n = int(torch.tensor(layer.in_shape).prod())
    d = delta.reshape(delta.shape[0], -1)  # (O, P)
    normal = _scatter_gram(d.T @ d, index, valid, n)  # sum_q U_q^T (delta^T delta) U_q
    contrib = (d.T @ grad_weight.reshape(grad_weight.shape[0], -1)).T  # (Q, P): sum_o delta[o, p] dW[o, q]
    return normal, torch.zeros(n, dtype=torch.float64).index_add_(0, index[valid], contrib[valid])


def layer_system(
    layer: ChainLayer, weight: Tensor, bias: Tensor | None, u: Tensor, delta: Tensor, grad_weight: Tensor
) -> tuple[Tensor, Tensor]:
    """Normal equations ``(N, r)`` of one layer's joint forward + gradient least squares, in float64."""
    weight, u, delta, grad_weight = weight.double(), u.double(), delta.double(), grad_weight.double()
    target = _target(layer, u, bias)
    if layer.kind == "linear":
        rhs_f = weight.T @ target
        normal_f = weight.T @ weight
        index = None
    else:
        conv = layer.module
        index = _unfold_index(conv, layer.in_shape)  # (Q, P)
        valid = index >= 0
        n = int(torch.tensor(layer.in_shape).prod())
        # both blocks scatter a small Gram matrix over the taps/positions that share input pixels
        kf = weight.reshape(weight.shape[0], -1)  # (O, Q)
        normal_f = _scatter_gram(kf.T @ kf, index.T, valid.T, n)  # sum_p U_p^T (W^T W) U_p
        rhs_f = torch.nn.grad.conv2d_input(
            (1, *layer.in_shape), weight, target[None], stride=conv.stride, padding=conv.padding
        ).flatten()
    normal_g, rhs_g = gradient_system(layer, delta, grad_weight, index=index)
    trace_f, trace_g = float(normal_f.diagonal().sum()), float(normal_g.diagonal().sum())
    alpha = trace_f / trace_g if trace_g > 0 else 0.0
    return normal_f + alpha * normal_g, rhs_f + alpha * rhs_g


def solve_layer(
    layer: ChainLayer, weight: Tensor, bias: Tensor | None, u: Tensor, delta: Tensor, grad_weight: Tensor
) -> LayerSolution:
    """The input of one layer from its pre-activation output ``u``, ``delta = dL/du`` and ``dL/dW`` (batch 1);
    the minimum-norm solution where the layer is rank-deficient."""
    normal, rhs = layer_system(layer, weight, bias, u, delta, grad_weight)
    weight, delta, grad_weight = weight.double(), delta.double(), grad_weight.double()
    target = _target(layer, u.double(), bias)
    x, full_rank = _solve_psd(normal, rhs)
    x = x.reshape(layer.in_shape)
    predicted = layer_output(layer, weight, None, x).flatten()
    grad_pred = weight_gradient(layer, weight, x, delta)
    forward_res = float((predicted - target.flatten()).norm() / target.norm().clamp_min(1e-300))
    grad_res = float((grad_pred - grad_weight).norm() / grad_weight.norm().clamp_min(1e-300))
    return LayerSolution(x, forward_res, grad_res, full_rank)


def solve_psd(normal: Tensor, rhs: Tensor) -> Tensor:
    """Least-squares solution of a symmetric positive semi-definite system (pseudo-inverse when singular)."""
    return _solve_psd(normal, rhs)[0]


def _solve_psd(normal: Tensor, rhs: Tensor) -> tuple[Tensor, bool]:
    """:func:`solve_psd` and whether the system had full rank."""
    chol, info = torch.linalg.cholesky_ex(normal)
    pivots = chol.diagonal() ** 2
    if int(info) == 0 and float(pivots.min()) > PIVOT_RTOL * float(pivots.max()):
        return torch.cholesky_solve(rhs[:, None], chol).flatten(), True
    eig, vec = torch.linalg.eigh(normal)  # singular: the minimum-norm least-squares solution
    inv = torch.where(eig > PIVOT_RTOL * eig.max(), 1.0 / eig, 0.0)
    return vec @ (inv * (vec.T @ rhs)), False


def layer_output(layer: ChainLayer, weight: Tensor, bias: Tensor | None, x: Tensor) -> Tensor:
    """``W x + b`` for one input ``x`` of the layer's input shape (the convolution for a conv layer)."""
    if layer.kind == "linear":
        return F.linear(x.flatten(), weight, bias)
    conv = layer.module
    return F.conv2d(x[None], weight, bias, stride=conv.stride, padding=conv.padding)[0]


def weight_gradient(layer: ChainLayer, weight: Tensor, x: Tensor, delta: Tensor) -> Tensor:
    """``dL/dW = delta x^T`` for one input ``x`` (the convolution's kernel gradient for a conv layer)."""
    if layer.kind == "linear":
        return torch.outer(delta.flatten(), x.flatten())
    conv = layer.module
    return torch.nn.grad.conv2d_weight(x[None], weight.shape, delta[None], stride=conv.stride, padding=conv.padding)


def input_gradient(layer: ChainLayer, weight: Tensor, delta: Tensor) -> Tensor:
    """``dL/dx = W^T delta`` for the layer's input (the transposed convolution for a conv layer)."""
    w = weight.double()
    if layer.kind == "linear":
        return w.T @ delta.flatten()
    conv = layer.module
    return torch.nn.grad.conv2d_input((1, *layer.in_shape), w, delta[None], stride=conv.stride, padding=conv.padding)[0]


def recursion_declines(observation: Observation, attack: str) -> list[str]:
    """Why a recursive attack (R-GAP, COPA) cannot run on ``observation``: it needs the FedSGD gradient of one
    sample through a plain chain of layers with invertible activations, ending in a classifier with a bias
    whose bias gradient is not zero. An empty list when it can run (labels aside: see ``label_declines``)."""
    k = observation.knowledge
    reasons = []
    if int(k.num_samples) != 1:
        reasons.append(f"{attack} recovers one sample, the update holds {k.num_samples}: use batch 1")
    if not isinstance(observation.protocol, FedSGD):
        reasons.append(f"{attack} inverts a FedSGD gradient; this update is a FedAvg weight delta")
    if observation.train_mode:
        reasons.append(f"{attack} needs the model as a plain chain; train-mode BatchNorm is not one")
    try:
        chain = layer_chain(observation.model, tuple(k.input_shape))
    except AttackError as err:
        return [*reasons, str(err)]
    head = chain[-1]
    if head.kind != "linear" or head.module.bias is None or head.activation != "identity":
        reasons.append(f"{attack} starts from a fully connected classifier with a bias as the last layer")
    elif (db := observation.update.get(f"{head.name}.bias")) is None or float(db.norm()) == 0:
        reasons.append("the classifier's bias gradient is zero: the layer's input cannot be read from it")
    for layer in chain[:-1]:
        if not layer.invertible:
            reasons.append(f"the {layer.activation} after '{layer.name}' is not invertible: {attack} cannot pass it")
    return reasons


def start_recursion(observation: Observation) -> tuple[list[ChainLayer], Tensor, Tensor, list[dict]]:
    """Read the classifier of an observation :func:`recursion_declines` accepts: the chain, the classifier's
    input ``x = dW^T db / |db|^2``, its gradient ``W^T db`` and the first residual record."""
    chain = layer_chain(observation.model, tuple(observation.knowledge.input_shape))
    head = chain[-1]
    x, grad_x, residual = classifier_input(observation, head)
    return chain, x, grad_x, [{"layer": head.name, "forward": 0.0, "gradient": residual, "full_rank": True}]


def classifier_input(observation: Observation, head: ChainLayer) -> tuple[Tensor, Tensor, float]:
    """The fully connected classifier's input ``x = dW^T db / |db|^2`` (exact for one sample), the loss
    gradient ``W^T db`` at it, and the relative residual of ``dW = db x^T``."""
    db = observation.update[f"{head.name}.bias"].double()
    if float(db.norm()) == 0:
        raise AttackError("the classifier's bias gradient is zero: the layer's input cannot be read from it")
    gw = observation.update[f"{head.name}.weight"].double()
    x = gw.T @ db / (db @ db)
    grad_x = observation.parameters[f"{head.name}.weight"].double().T @ db
    return x, grad_x, float((torch.outer(db, x) - gw).norm() / gw.norm())


@dataclass(frozen=True)
class Descent:
    """Where a recursion stopped: the input ``x`` of ``chain[stop]`` (the image when ``stop == 0``) and its loss
    gradient, or, when it stopped at a rank-deficient layer, that layer's output ``u`` and ``delta = dL/du``."""

    stop: int
    x: Tensor
    grad_x: Tensor
    u: Tensor | None
    delta: Tensor | None
    residuals: list[dict]


def descend(
    observation: Observation,
    chain: list[ChainLayer],
    x: Tensor,
    grad_x: Tensor,
    residuals: list[dict],
    *,
    top: int | None = None,
    stop_at_deficient: bool = False,
) -> Descent:
    """Run the recursion down the chain from the output ``x`` of layer ``top`` (default: the layer below the
    classifier, ``x`` being the classifier's input), one :func:`solve_layer` per layer.

    With ``stop_at_deficient`` it stops at the first (topmost) layer whose joint system is rank-deficient and
    returns that layer's known output and output gradient along with its minimum-norm input."""
    params, update = observation.parameters, observation.update
    for i in range(len(chain) - 2 if top is None else top, -1, -1):
        layer = chain[i]
        u = layer.inverse_activation(x.reshape(layer.out_shape))
        delta = grad_x.reshape(layer.out_shape) * layer.activation_derivative(u)
        weight, bias = params[f"{layer.name}.weight"], params.get(f"{layer.name}.bias")
        sol = solve_layer(layer, weight, bias, u, delta, update[f"{layer.name}.weight"])
        residuals.append(
            {
                "layer": layer.name,
                "forward": sol.forward_residual,
                "gradient": sol.gradient_residual,
                "full_rank": sol.full_rank,
            }
        )
        if stop_at_deficient and not sol.full_rank:
            return Descent(i, sol.inputs, input_gradient(layer, weight, delta), u, delta, residuals)
        x = sol.inputs
        grad_x = input_gradient(layer, weight, delta)
    return Descent(0, x, grad_x, None, None, residuals)


@register_attack
class RGAP(Attack):
    name = "rgap"
    summary = "R-GAP (Zhu & Blaschko 2021): layer-by-layer closed-form recursion, batch 1, invertible activations"
    table1 = {
        "initialisation": "-",
        "objective": "weight constraints + forward constraints per layer",
        "optimiser": "recursive least squares",
        "priors": "-",
    }
    Settings = LabelSettings
    requires = ("input_shape", "num_samples")

    def _unmet_assumptions(self, observation: Observation) -> list[str]:
        return recursion_declines(observation, "R-GAP") + label_declines(observation, self.settings.label_method)

    def _reconstruct(
        self, observation: Observation, *, generator: torch.Generator, progress: bool, callback: Callback | None
    ) -> AttackOutput:
        k = observation.knowledge
        chain, x, grad_x, residuals = start_recursion(observation)
        image = descend(observation, chain, x, grad_x, residuals).x.reshape(1, *k.input_shape)
        labels, label_source = labels_for(observation, method=self.settings.label_method)
        return AttackOutput(
            inputs=image.float(),
            labels=labels,
            label_source=label_source,
            extras={"residuals": residuals, "float64_inputs": image},
        )
