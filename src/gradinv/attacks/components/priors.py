"""Priors on the candidate data, added to the gradient-matching objective (survey Table 1, "regularisers").

Each prior is prepared once from the observation (and the labels the attack uses) and returns a pure function of
one restart's candidate batch ``x`` (``torch.func``-friendly, so the engine can ``vmap`` it over restarts).
Group consistency couples the restarts and is applied by the engine itself (:func:`group_consistency`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from gradinv.errors import ConfigError
from gradinv.fl.functional import batch_statistics, stateless_twin
from gradinv.types import Observation

Prior = Callable[[Tensor], Tensor]


def total_variation(x: Tensor) -> Tensor:
    """Anisotropic total variation: mean absolute difference of neighbouring pixels (Rudin et al. 1992),
    as used by Inverting Gradients (Geiping et al. 2020). ``x`` is (..., H, W)."""
    dx = (x[..., :, 1:] - x[..., :, :-1]).abs().mean()
    dy = (x[..., 1:, :] - x[..., :-1, :]).abs().mean()
    return dx + dy


def l2_norm(x: Tensor) -> Tensor:
    """Mean squared value of the candidate (GradInversion's ``R_l2``, Yin et al. 2021, Eq. 9)."""
    return x.pow(2).mean()


def bn_targets(observation: Observation) -> dict[str, tuple[Tensor, Tensor]]:
    """The per-channel mean and variance each BatchNorm layer's input should have: the client batch's own
    statistics when the threat model gives them (GradAttack's "BN exact", Huang et al. 2021), else the running
    statistics the server sent (GradInversion, Yin et al. 2021, Eq. 10: a trained model's running statistics
    summarise its training data)."""
    known = observation.knowledge.bn_statistics
    if known is not None:
        return {k: (m.detach(), v.detach()) for k, (m, v) in known.items()}
    targets = {}
    for name, module in observation.model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats:
            mean = observation.buffers.get(f"{name}.running_mean" if name else "running_mean")
            var = observation.buffers.get(f"{name}.running_var" if name else "running_var")
            if mean is not None and var is not None:
                targets[name] = (mean.detach(), var.detach())
    return targets


def bn_statistics(
    observation: Observation,
    *,
    targets: Mapping[str, tuple[Tensor, Tensor]] | None = None,
    train_mode: bool | None = None,
) -> Prior:
    """GradInversion's BatchNorm prior (Yin et al. 2021, Eq. 10): ``sum_l ||mu_l(x) - mu_l||_2 +
    ||sigma^2_l(x) - sigma^2_l||_2`` over the BatchNorm layers of ``targets`` (default :func:`bn_targets`).

    The candidate's statistics are measured with the model in ``train_mode`` (default: the client's mode, so in
    a train-mode client every layer's input is normalised by the candidate's own statistics, as the client's
    were by its batch's, and the prior vanishes on the client's batch)."""
    targets = bn_targets(observation) if targets is None else targets
    if not targets:
        raise ConfigError("the BatchNorm prior needs a model with BatchNorm layers: set its weight to 0 for this model")
    return BatchNormPrior(observation, targets, train_mode=observation.train_mode if train_mode is None else train_mode)


class BatchNormPrior:
    """The prior of :func:`bn_statistics`: callable on a candidate (one forward pass of its own), or evaluated
    from statistics a replay already measured (:meth:`from_statistics`): in a FedSGD replay in the same mode the
    client's forward pass sees the same BatchNorm inputs, so :func:`~.replay.matching_cost` measures them there
    and spares the second forward pass (and its backward)."""

    def __init__(
        self, observation: Observation, targets: Mapping[str, tuple[Tensor, Tensor]], *, train_mode: bool
    ) -> None:
        device = observation.device
        self.train_mode = train_mode
        self.goal = {k: (m.detach().to(device), v.detach().to(device)) for k, (m, v) in targets.items()}
        self.layers = tuple(self.goal)
        self._params = {k: v.detach() for k, v in observation.parameters.items()}
        self._buffers = {k: v.detach() for k, v in observation.buffers.items()}
        self._stats = batch_statistics(stateless_twin(observation.model, train_mode=train_mode), list(self.goal))

    def from_statistics(self, seen: Mapping[str, tuple[Tensor, Tensor]]) -> Tensor:
        """The prior's value from each layer's measured (mean, biased variance) of its input."""
        return sum(
            torch.linalg.vector_norm(seen[k][0] - m) + torch.linalg.vector_norm(seen[k][1] - v)
            for k, (m, v) in self.goal.items()
        )

    def __call__(self, x: Tensor) -> Tensor:
        return self.from_statistics(self._stats(self._params, self._buffers, x))


def label_prior(observation: Observation, labels: Tensor) -> Prior:
    """A label-based regulariser: the cross-entropy of the model's prediction on the candidate against the labels
    the attack recovered, so the candidate stays in its class (a variant of CPL's, Wei et al. 2020, whose own
    squared-distance form is :func:`gradinv.attacks.cpl.prediction_l2`)."""
    twin = stateless_twin(observation.model, train_mode=False)
    state = (
        {k: v.detach() for k, v in observation.parameters.items()},
        {k: v.detach() for k, v in observation.buffers.items()},
    )
    y = labels

    def prior(x: Tensor) -> Tensor:
        logits = functional_call(twin, state, (x,))
        if y.is_floating_point():
            return -(y * F.log_softmax(logits, dim=-1)).sum(-1).mean()
        return F.cross_entropy(logits, y)

    return prior


def group_consistency(x: Tensor) -> Tensor:
    """GradInversion's group-consistency prior (Yin et al. 2021, Eq. 11): each restart's squared distance to the
    restarts' mean (the consensus, held fixed within a step), summed over restarts. ``x`` is
    (restarts, batch, ...)."""
    consensus = x.detach().mean(0, keepdim=True)
    return (x - consensus).pow(2).flatten(1).mean(1).sum()


#: priors a preset weights by name (``tv``, ``l2``, ``bn``, ``label``); ``group`` is applied by the engine
PRIORS = ("tv", "l2", "bn", "label", "group")


def build_priors(observation: Observation, labels: Tensor, weights: Mapping[str, float]) -> Prior | None:
    """The weighted sum of the per-restart priors with a non-zero weight (``group`` excluded), or None."""
    parts: list[tuple[float, Prior]] = []
    for name, weight in weights.items():
        if not weight or name == "group":
            continue
        if name == "tv":
            parts.append((weight, total_variation))
        elif name == "l2":
            parts.append((weight, l2_norm))
        elif name == "bn":
            parts.append((weight, bn_statistics(observation)))
        elif name == "label":
            parts.append((weight, label_prior(observation, labels)))
        else:
            raise ConfigError(f"unknown prior {name!r}: use one of {', '.join(PRIORS)}")
    return combine_priors(*parts)


class WeightedPriors:
    """A weighted sum of priors, its ``parts`` kept (weight, prior) so that a replay can take some of them over
    (:class:`BatchNormPrior`)."""

    def __init__(self, parts: tuple[tuple[float, Prior], ...]) -> None:
        self.parts = parts

    def __call__(self, x: Tensor) -> Tensor:
        return sum(w * p(x) for w, p in self.parts)


def combine_priors(*parts: tuple[float, Prior | None]) -> Prior | None:
    """The weighted sum of the priors that exist and have a non-zero weight (a :class:`WeightedPriors`, nested
    sums flattened), or None."""
    kept: list[tuple[float, Prior]] = []
    for w, p in parts:
        if not w or p is None:
            continue
        if isinstance(p, WeightedPriors):
            kept += [(w * inner_w, inner) for inner_w, inner in p.parts]
        else:
            kept.append((w, p))
    return WeightedPriors(tuple(kept)) if kept else None
