"""Analytic inversion of a fully connected layer with bias (Phong et al. 2018, "Privacy-Preserving Deep
Learning via Additively Homomorphic Encryption", Sec. 3).

For ``z = W x + b`` the gradient rows are ``∂L/∂W_i = (∂L/∂b_i) · x``, so one sample's input is any row of
the weight gradient divided by its bias gradient. We take the least-squares combination of all rows
(``x = Σ_i g_i G_i / Σ_i g_i²``), exact up to round-off. For a batch whose labels are distinct and whose
classifier reads the input directly (a linear model), the classifier row of each label is dominated by the
sample of that label: one input per label (approximate; exact for one sample).

Threat model: honest-but-curious server; the layer must see the raw input (the first layer).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from gradinv._settings import at_least
from gradinv.attacks.base import Attack, AttackOutput, Callback, register_attack
from gradinv.attacks.labels import label_declines, label_method_problems, labels_for
from gradinv.errors import AttackError, ConfigError
from gradinv.models import classifier_layer
from gradinv.types import Observation


@dataclass(frozen=True)
class AnalyticSettings:
    layer: str | None = None  # name of the fully connected layer to invert; default: the first one
    label_method: str = "auto"
    duplicate_tolerance: float = 1e-3  # batches: rows whose inputs agree this closely (relative L2) are one sample

    def problems(self) -> list[str]:
        return [
            *label_method_problems(self.label_method),
            *at_least("duplicate_tolerance", self.duplicate_tolerance, 0),
        ]


def _first_linear(model: nn.Module) -> str:
    for name, module in model.named_modules():
        if any(True for _ in module.parameters(recurse=False)):
            if isinstance(module, nn.Linear):
                return name
            raise AttackError(
                f"the first layer with parameters is {type(module).__name__} '{name}', not a fully connected "
                "layer: the analytic attack inverts a fully connected first layer (try invgrad or dlg)"
            )
    raise AttackError("the model has no layer with parameters")


def _distinct_labels_problem(labels: torch.Tensor, batch: int) -> str | None:
    if len(torch.unique(labels)) != batch:
        return "the analytic batch rule needs distinct labels (one input per label)"
    return None


def invert_rows(weight_grad: Tensor, bias_grad: Tensor) -> Tensor:
    """Least-squares input from all rows of one sample's weight and bias gradients (float64)."""
    g = bias_grad.double()
    denom = (g * g).sum()
    if denom <= 0:
        raise AttackError("every bias gradient is zero: the layer's input cannot be read from this update")
    return (g @ weight_grad.double()) / denom


def _every_layer_input(observation: Observation) -> dict[str, Tensor]:
    """The input of every fully connected layer with a bias, read from its own rows (batch 1)."""
    out = {}
    for layer_name, module in observation.model.named_modules():
        if isinstance(module, nn.Linear) and f"{layer_name}.bias" in observation.update:
            gb = observation.update[f"{layer_name}.bias"]
            if float(gb.abs().sum()) > 0:
                out[layer_name] = invert_rows(observation.update[f"{layer_name}.weight"], gb)
    return out


@register_attack
class AnalyticFC(Attack):
    name = "analytic"
    summary = "Analytic inversion of a fully connected layer with bias (Phong et al. 2018), exact at batch 1"
    table1 = {
        "initialisation": "-",
        "objective": "dL/dW_i / dL/db_i of the first fully connected layer",
        "optimiser": "closed form",
        "priors": "-",
    }
    Settings = AnalyticSettings
    requires = ("num_samples",)

    def _unmet_assumptions(self, observation: Observation) -> list[str]:
        model, update = observation.model, observation.update
        try:
            first = _first_linear(model)
        except AttackError as err:
            return [str(err)]
        name = self.settings.layer or first
        modules = dict(model.named_modules())
        if name not in modules:
            linear = [n for n, m in modules.items() if isinstance(m, nn.Linear)]
            raise ConfigError(
                f"analytic setting layer={name!r}: the model has no such layer; its linear layers: {linear}"
            )
        reasons = []
        if not isinstance(modules[name], nn.Linear):
            reasons.append(f"'{name}' is not a fully connected layer of this model")
        elif modules[name].bias is None or f"{name}.bias" not in update:
            reasons.append(f"layer '{name}' has no bias: the analytic attack needs a bias gradient")
        elif float(update[f"{name}.bias"].abs().sum()) == 0:
            reasons.append("every bias gradient is zero: the layer's input cannot be read from this update")
        batch, known = int(observation.knowledge.num_samples), observation.knowledge.labels
        if batch > 1 and classifier_layer(model)[0] == first:  # the batch rule: one input per label
            reasons += label_declines(observation, self.settings.label_method)
            if known is not None and (problem := _distinct_labels_problem(known, batch)):
                reasons.append(problem)
        return reasons

    def _reconstruct(
        self,
        observation: Observation,
        *,
        generator: torch.Generator,
        progress: bool,
        callback: Callback | None,
    ) -> AttackOutput:
        k = observation.knowledge
        model = observation.model
        batch = int(k.num_samples)
        labels: Tensor | None = None
        label_source = None
        first = _first_linear(model)
        per_label = batch > 1 and classifier_layer(model)[0] == first  # a linear model: one input per label
        name = self.settings.layer or first
        gw = observation.update[f"{name}.weight"]
        gb = observation.update[f"{name}.bias"]
        extras: dict = {}
        if batch == 1:
            rows = invert_rows(gw, gb)[None]
            extras["layer_inputs"] = _every_layer_input(observation)
        elif not per_label:
            from gradinv.attacks.imprint import row_inputs

            rows, _, found = row_inputs(observation, name, tolerance=self.settings.duplicate_tolerance)
            extras.update(found)
        else:
            labels, label_source = labels_for(observation, method=self.settings.label_method)
            if problem := _distinct_labels_problem(labels, batch):  # recovered labels: known only now
                raise AttackError(problem)
            rows = torch.stack([gw[c].double() / gb[c].double() for c in labels.tolist()])
        x = rows.float()
        if k.input_shape is not None and math.prod(k.input_shape) == x.shape[1]:
            x = x.reshape(x.shape[0], *k.input_shape)
        if labels is None and observation.knowledge.labels is not None:
            labels, label_source = observation.knowledge.labels.clone(), "knowledge"
        elif labels is None:
            labels, label_source = labels_for(observation, method=self.settings.label_method)
        return AttackOutput(
            inputs=x,
            labels=labels,
            label_source=label_source,
            settings={"layer": name},
            extras={**extras, "float64_inputs": rows},
        )
