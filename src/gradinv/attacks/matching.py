"""The gradient-matching attack: one class that every iteration-based preset (Inverting Gradients, CPL, SAPAG,
GradInversion, GradAttack, the Bayesian attack...) specialises by its settings' defaults and, where its paper
adds a part the engine lacks, by one overridden hook (``_objective``, ``_prior``, ``_initial``, ``_labels``).

Threat model of the base: an honest-but-curious server that knows the input shape and the number of samples
(and, for the box constraint and image-space initialisations, the normalisation); labels come from the threat
model or are recovered from the update by a label method (``label_method``).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from gradinv.attacks.base import Attack, AttackOutput, Callback
from gradinv.attacks.components.budget import check_restarts
from gradinv.attacks.components.engine import EngineResult, MatchingSettings, optimise, use_autograd
from gradinv.attacks.components.inits import INIT_SCALES, INITS
from gradinv.attacks.components.objectives import OBJECTIVES, Objective, layer_weights
from gradinv.attacks.components.priors import Prior, build_priors
from gradinv.attacks.components.replay import box_bounds, matching_cost
from gradinv.attacks.labels import label_declines, labels_for
from gradinv.types import Observation


class GradientMatchingAttack(Attack):
    """Optimise dummy inputs so their replayed update matches the observed one (survey Sec. 3.1).

    Subclasses set ``name``, ``summary``, ``Settings`` (a subclass of
    :class:`~gradinv.attacks.components.engine.MatchingSettings` with the paper's defaults) and ``table1`` (the
    paper's row of the survey's Table 1: initialisation, objective, optimiser, priors).
    """

    Settings: ClassVar[type] = MatchingSettings
    requires = ("input_shape", "num_samples")

    def _unmet_assumptions(self, observation: Observation) -> list[str]:
        return label_declines(observation, self.settings.label_method)

    # -- the hooks a preset may override ------------------------------------------------------------------------

    def _labels(self, observation: Observation) -> tuple[Tensor, str]:
        """The labels the candidate is scored with and where they came from."""
        return labels_for(observation, method=self.settings.label_method)

    def _objective(self, observation: Observation) -> Objective:
        """The gradient-matching distance, prepared from the observed update by the engine."""
        return OBJECTIVES[self.settings.objective]

    def _prior(self, observation: Observation, labels: Tensor) -> Prior | None:
        """The sum of the weighted priors on one restart's candidate (group consistency aside)."""
        s = self.settings
        return build_priors(observation, labels, {"tv": s.tv, "l2": s.l2, "bn": s.bn, "label": s.label})

    def _initial(self, observation: Observation, shape: tuple[int, ...], generator: torch.Generator) -> Tensor:
        """The restarts' starting candidates, ``shape`` = (restarts, batch, *input_shape)."""
        s = self.settings
        scale = INIT_SCALES[s.init] if s.init_scale is None else s.init_scale
        bounds = box_bounds(observation, shape)
        return INITS[s.init](
            shape, generator=generator, bounds=None if bounds is None else tuple(b.cpu() for b in bounds), scale=scale
        )

    def _resolved(self, observation: Observation) -> dict[str, Any]:
        """Settings whose value the observation decides (a default per architecture, a mode), recorded in the
        reconstruction in place of the declared ones."""
        return {}

    def _coupling(self, labels: Tensor) -> Callable[[Tensor, Tensor], Tensor] | None:
        """The gradient of the term coupling the restarts (``coupling(x, values)``, weighted by ``group``);
        None: the engine's pull to the restarts' mean."""
        return None

    # -- the run --------------------------------------------------------------------------------------------------

    def _run(
        self,
        observation: Observation,
        *,
        generator: torch.Generator,
        progress: bool,
        callback: Callback | None,
    ) -> Run:
        """Build the preset's parts and run the engine; a preset that post-processes the restarts (a consensus,
        a second stage) calls this and builds its own output."""
        s = self.settings
        check_restarts(observation, s.restarts, attack=self.name)  # before the restarts' inputs are allocated
        start = time.perf_counter()
        k = observation.knowledge
        labels, label_source = self._labels(observation)
        labels = labels.to(observation.device)
        shape = (s.restarts, k.num_samples, *k.input_shape)
        x0 = self._initial(observation, shape, generator).to(observation.device)
        weights = layer_weights(list(observation.update), s.layer_weights)
        prior = self._prior(observation, labels)
        objective = self._objective(observation)
        build = functools.partial(
            matching_cost, observation, objective=objective, weights=weights, prior=prior, adaptive=s.adaptive
        )
        cost = build()
        autograd_cost = None
        sequential = s.optimizer == "lbfgs" and s.differentiation != "func"  # L-BFGS runs restarts one by one
        if sequential or use_autograd(s, s.restarts, observation.device):
            with_autograd = build(autograd=True)
            autograd_cost = lambda x: with_autograd(x, labels)  # noqa: E731
        bounds = box_bounds(observation, shape) if s.boxed else None
        result = optimise(
            lambda x: cost(x, labels),
            x0,
            settings=s,
            bounds=bounds,
            autograd_cost=autograd_cost,
            coupling=self._coupling(labels),
            progress=progress,
            callback=callback,
            desc=self.name,
            start=start,
        )
        return Run(result, labels, label_source, lambda x: cost(x, labels), bounds)

    def _reconstruct(
        self,
        observation: Observation,
        *,
        generator: torch.Generator,
        progress: bool,
        callback: Callback | None,
    ) -> AttackOutput:
        run = self._run(observation, generator=generator, progress=progress, callback=callback)
        result = run.result
        return AttackOutput(
            inputs=result.inputs,
            labels=run.labels,
            label_source=run.label_source,
            trace=result.trace,
            extras={
                "restart_costs": result.costs.tolist(),
                "best_restart": result.best,
                "iterations_run": result.iterations_run,
                "stopped": result.stopped,
                **result.extras,
            },
            settings=self._resolved(observation),
        )


@dataclass(frozen=True, eq=False)
class Run:
    """What :meth:`GradientMatchingAttack._run` gives a preset: the engine's result, the labels used and where
    they came from, one restart's cost ``cost(x)`` and the box (None without one)."""

    result: EngineResult
    labels: Tensor
    label_source: str
    cost: Callable[[Tensor], Tensor]
    bounds: tuple[Tensor, Tensor] | None
