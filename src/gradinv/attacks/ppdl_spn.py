"""PPDL-SPN: a convolutional layer inverted as a fully connected one (Fan et al. 2020, "Rethinking Privacy
Preserving Deep Learning: How to Evaluate and Thwart Privacy Attacks").

Stacking a convolution's shifted filters gives an equivalent fully connected layer ``u = A x``; its weight
gradient is ``delta x^T``, and the convolution's gradient sums the entries that share a weight:
``dL/dW[o, q] = sum_p delta[o, p] x[idx(q, p)]``, a linear system in the input ``x`` once ``delta = dL/du`` is
known. In the single-layer setting (convolution, activation, fully connected classifier with a bias) the
classifier's gradient gives its input ``h = dW_fc^T db / |db|^2`` and ``dL/dh = W_fc^T db``; the activation's
derivative follows from ``h`` (for ReLU: 1 where ``h > 0``), so ``delta`` is known exactly and ``x`` is the
least-squares solution of the gradient system alone (no forward constraint, unlike R-GAP). Exact when
``rank(delta) * C k^2`` covers the input; Fan et al.'s noise analysis: the error grows with gradient noise as
the inverse of the system's smallest singular value (see bench/recursive.py).
"""

from __future__ import annotations

import torch
from torch import Tensor

from gradinv.attacks.base import Attack, AttackOutput, Callback, LabelSettings, register_attack
from gradinv.attacks.components.chain import ChainLayer, layer_chain
from gradinv.attacks.labels import label_declines, labels_for
from gradinv.attacks.rgap import classifier_input, gradient_system, solve_psd
from gradinv.errors import AttackError
from gradinv.fl.protocols import FedSGD
from gradinv.types import Observation

RELU_RTOL = 1e-7  # a ReLU output below this fraction of the largest is read as zero (inactive unit)


def _derivative_from_output(layer: ChainLayer, h: Tensor) -> Tensor:
    """The activation's derivative at the pre-activation, read from its output ``h`` (for ReLU: active where
    ``h`` is clearly positive, so that round-off or noise on an inactive unit does not switch it on)."""
    if layer.activation == "relu":
        return (h > RELU_RTOL * h.abs().max()).double()
    return layer.activation_derivative(layer.inverse_activation(h))


@register_attack
class PPDLSPN(Attack):
    name = "ppdl-spn"
    summary = "PPDL-SPN (Fan et al. 2020): a conv layer as its stacked-filter FC equivalent, solved linearly"
    table1 = {
        "initialisation": "-",
        "objective": "conv layer as stacked-filter FC equations",
        "optimiser": "least squares",
        "priors": "-",
    }
    Settings = LabelSettings
    requires = ("input_shape", "num_samples")

    def _unmet_assumptions(self, observation: Observation) -> list[str]:
        k = observation.knowledge
        reasons = []
        if int(k.num_samples) != 1 or not isinstance(observation.protocol, FedSGD):
            reasons.append("PPDL-SPN inverts the FedSGD gradient of one sample: use batch 1 and FedSGD")
        try:
            chain = layer_chain(observation.model, tuple(k.input_shape))
        except AttackError as err:
            return [*reasons, str(err)]
        if len(chain) != 2 or chain[0].kind != "conv" or chain[1].kind != "linear" or chain[1].module.bias is None:
            reasons.append(
                "PPDL-SPN's setting is one convolution, an activation and a fully connected classifier with a bias; "
                "for deeper chains use rgap"
            )
        elif chain[0].activation not in ("relu", "leaky_relu", "sigmoid", "tanh", "identity"):
            reasons.append(f"PPDL-SPN cannot read the derivative of {chain[0].activation}")
        elif (db := observation.update.get(f"{chain[1].name}.bias")) is None or float(db.norm()) == 0:
            reasons.append("the classifier's bias gradient is zero: the layer's input cannot be read from it")
        return reasons + label_declines(observation, self.settings.label_method)

    def _reconstruct(
        self, observation: Observation, *, generator: torch.Generator, progress: bool, callback: Callback | None
    ) -> AttackOutput:
        k = observation.knowledge
        conv, head = layer_chain(observation.model, tuple(k.input_shape))
        h, grad_h, _ = classifier_input(observation, head)
        h = h.reshape(conv.out_shape)
        delta = grad_h.reshape(conv.out_shape) * _derivative_from_output(conv, h)
        grad_weight = observation.update[f"{conv.name}.weight"].double()
        normal, rhs = gradient_system(conv, delta, grad_weight)
        x = solve_psd(normal, rhs).reshape(1, *k.input_shape)
        predicted = torch.nn.grad.conv2d_weight(
            x, grad_weight.shape, delta[None], stride=conv.module.stride, padding=conv.module.padding
        )
        residual = float((predicted - grad_weight).norm() / grad_weight.norm())
        labels, label_source = labels_for(observation, method=self.settings.label_method)
        return AttackOutput(
            inputs=x.float(),
            labels=labels,
            label_source=label_source,
            extras={"gradient_residual": residual, "float64_inputs": x},
        )
