"""Label counts from model statistics, for FedSGD and FedAvg updates (Geng et al. 2021, "Towards General Deep
Leakage in Federated Learning"; the local-step simulation view of Dimitrov et al. 2022, "Data Leakage in
Federated Averaging").

For cross-entropy, ``db_c = mean_n p_nc - k_c / B`` and ``sum_d dW[c, d] = mean_n p_nc s_n - (1/B) sum_{y_n=c} s_n``
with ``s_n`` the sum of sample ``n``'s features. The server estimates the mean probabilities ``p`` and feature
sums ``s`` by running dummy (or auxiliary) inputs through the model, and solves for each count ``k_c``. Over
FedAvg's local steps the model moves from the round's start to start + delta; the statistics are averaged at
both ends (Geng et al.'s linear interpolation), and the delta is read as ``-delta / (lr * steps)``.
With a bias the bias equation is used, else the weight equation.
"""

from __future__ import annotations

from torch import Tensor

from gradinv.attacks.labels.base import (
    LabelEstimate,
    classifier_update,
    num_samples,
    probe_model,
    random_inputs,
    register_label_method,
    round_counts,
)
from gradinv.errors import AttackError
from gradinv.fl.protocols import FedAvg
from gradinv.types import Observation

DEFAULT_PROBES = 32


@register_label_method(
    "fedavg-count",
    summary="Geng et al. 2021: counts from dummy-input statistics, across FedAvg's local steps",
    gives_counts=True,
    options=("auxiliary", "probes", "seed"),
)
def fedavg_count_labels(
    observation: Observation, *, auxiliary: Tensor | None = None, probes: int = DEFAULT_PROBES, seed: int = 0
) -> LabelEstimate:
    b = num_samples(observation, "fedavg-count")
    cu = classifier_update(observation)
    inputs = auxiliary if auxiliary is not None and len(auxiliary) else random_inputs(observation, probes, seed=seed)
    ends = [dict(observation.parameters)]
    if isinstance(observation.protocol, FedAvg):
        ends.append({k: v + observation.update[k] if k in observation.update else v for k, v in ends[0].items()})
    mean_p = mean_ps = mean_s = 0.0
    for params in ends:
        probe = probe_model(observation, inputs, parameters=params)
        s = probe.feature_sums
        mean_p = mean_p + probe.probs.mean(dim=0) / len(ends)
        mean_ps = mean_ps + (probe.probs * s[:, None]).mean(dim=0) / len(ends)
        mean_s = mean_s + float(s.mean()) / len(ends)
    if cu.bias is not None:
        continuous = b * (mean_p - cu.bias)
        form = "bias"
    else:
        if abs(mean_s) < 1e-12:
            raise AttackError("the model's features sum to zero on the probe inputs: the weight equation is void")
        continuous = b * (mean_ps - cu.row_sums) / mean_s
        form = "weight"
    return LabelEstimate.from_counts("fedavg-count", round_counts(continuous, b), scores=continuous, equation=form)
