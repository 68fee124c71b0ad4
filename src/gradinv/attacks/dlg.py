"""Deep Leakage from Gradients (Zhu, Liu, Han, NeurIPS 2019).

Threat model: honest-but-curious server knowing the input shape and number of samples. Dummy inputs and
dummy soft labels (a softmax over free logits) are optimised jointly with L-BFGS so that their gradient
matches the observed one in squared Euclidean distance (the paper's Eq. 4). If the threat model gives the
labels, they are used instead of soft labels. Restarts run one after another (L-BFGS's line search couples
whatever it optimises together); the lowest final matching cost wins.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from gradinv._settings import above, at_least, one_of
from gradinv.attacks.base import Attack, AttackOutput, Callback, register_attack
from gradinv.attacks.components.lbfgs import lbfgs_match
from gradinv.attacks.components.objectives import OBJECTIVES
from gradinv.attacks.components.replay import matching_cost
from gradinv.attacks.labels import label_declines, label_method_problems
from gradinv.models import classifier_layer
from gradinv.types import Observation


@dataclass(frozen=True)
class LBFGSMatchingSettings:
    """DLG's settings: 300 L-BFGS steps (each up to 20 inner iterations, torch's default used by DLG's code),
    lr 1, Euclidean distance. ``refine``: when a float32 step makes no progress (the line search finds no decrease
    at float32's resolution: on LeNet, at a matching cost ~3e-6 of an update of squared norm ~900, about 57 dB),
    the remaining steps run in float64 (:func:`~gradinv.attacks.components.lbfgs.lbfgs_match`), an addition to
    the paper."""

    iterations: int = 300
    inner_iterations: int = 20
    restarts: int = 1
    lr: float = 1.0
    history_size: int = 100
    line_search: str | None = "strong_wolfe"
    objective: str = "euclidean"
    label_method: str = "auto"
    log_every: int = 10
    #: match only the entries a pruning defense sent (see ``replay.matching_cost``)
    adaptive: bool = True
    #: stop a restart when its best cost has not improved by ``min_improvement`` (relative) for this many steps
    patience: int = 0
    min_improvement: float = 1e-4
    #: stop after this many seconds (all restarts together); 0: no budget
    time_budget: float = 0.0
    refine: bool = True

    def problems(self) -> list[str]:
        return [
            *at_least("iterations", self.iterations, 1),
            *at_least("inner_iterations", self.inner_iterations, 1),
            *at_least("restarts", self.restarts, 1),
            *above("lr", self.lr, 0),
            *at_least("history_size", self.history_size, 1),
            *one_of("line_search", self.line_search, [None, "strong_wolfe"]),
            *one_of("objective", self.objective, sorted(OBJECTIVES)),
            *label_method_problems(self.label_method),
            *at_least("log_every", self.log_every, 1),
            *at_least("patience", self.patience, 0),
            *at_least("min_improvement", self.min_improvement, 0),
            *at_least("time_budget", self.time_budget, 0),
        ]


class _LBFGSAttack(Attack):
    """DLG and iDLG: L-BFGS on dummy data; they differ in where the labels come from."""

    Settings = LBFGSMatchingSettings
    requires = ("input_shape", "num_samples")

    def _labels(self, observation: Observation) -> tuple[Tensor | None, str]:
        raise NotImplementedError

    def _unmet_assumptions(self, observation: Observation) -> list[str]:
        return label_declines(observation, self.settings.label_method)

    def _reconstruct(
        self,
        observation: Observation,
        *,
        generator: torch.Generator,
        progress: bool,
        callback: Callback | None,
    ) -> AttackOutput:
        s = self.settings
        start = time.perf_counter()
        k = observation.knowledge
        labels, label_source = self._labels(observation)
        labels = None if labels is None else labels.to(observation.device)
        num_classes = None if labels is not None else classifier_layer(observation.model)[1].out_features
        # restarts run one after another: the replay is differentiated with plain autograd (engine.use_autograd)
        match = matching_cost(observation, objective=OBJECTIVES[s.objective], adaptive=s.adaptive, autograd=True)

        def cost(x: Tensor, y: Tensor | None) -> Tensor:
            return match(x, labels if y is None else torch.softmax(y, dim=-1))

        def refined() -> Callable[[Tensor, Tensor | None], Tensor]:
            """The same cost on a float64 copy of the observation (built once, at the first stall)."""
            if "cost" not in cache:
                exact = matching_cost(
                    observation.in_precision(torch.float64),
                    objective=OBJECTIVES[s.objective],
                    adaptive=s.adaptive,
                    autograd=True,
                )
                cache["cost"] = lambda x, y: exact(x, labels if y is None else torch.softmax(y, dim=-1))
            return cache["cost"]

        cache: dict[str, Callable[[Tensor, Tensor | None], Tensor]] = {}
        # after a line search (without one a step may rise); MPS has no float64
        can_refine = s.refine and s.line_search is not None and observation.device.type != "mps"

        best = None
        restart_costs = []
        refined_at: list[int | None] = []
        trace = []
        counts = {"lbfgs_iterations": 0, "evaluations": 0}
        stopped = "iterations"
        deadline = start + s.time_budget if s.time_budget else None
        for r in range(s.restarts):
            if deadline is not None and time.perf_counter() >= deadline:
                break
            x0 = torch.randn((k.num_samples, *k.input_shape), generator=generator).to(observation.device)
            y0 = None if labels is not None else torch.randn((k.num_samples, num_classes), generator=generator)
            y0 = None if y0 is None else y0.to(observation.device)
            x, y, value, run_trace, run_counts = lbfgs_match(
                cost,
                x0,
                y0,
                iterations=s.iterations,
                inner_iterations=s.inner_iterations,
                lr=s.lr,
                history_size=s.history_size,
                line_search=s.line_search,
                log_every=s.log_every,
                desc=f"{self.name} restart {r + 1}/{s.restarts}",
                progress=progress,
                callback=callback,
                start=start,
                patience=s.patience,
                min_improvement=s.min_improvement,
                deadline=deadline,
                refine=refined if can_refine else None,
            )
            stopped = run_counts["stopped"]
            refined_at.append(run_counts["refined_at"])
            restart_costs.append(value)
            counts = {k: counts[k] + run_counts[k] for k in counts}
            trace.extend(run_trace)
            if best is None or value < best[2]:
                best = (x, y, value, r)
        x, y, _, best_restart = best
        out_labels = labels if labels is not None else torch.argmax(y, dim=-1)
        return AttackOutput(
            inputs=x,
            labels=out_labels,
            label_source=label_source,
            trace=tuple(trace),
            extras={
                "restart_costs": restart_costs,
                "best_restart": best_restart,
                "stopped": stopped,
                "refined_at": refined_at,
                **counts,
            },
        )


@register_attack
class DLG(_LBFGSAttack):
    name = "dlg"
    summary = "Deep Leakage from Gradients (Zhu et al. 2019): joint data + soft-label L-BFGS, Euclidean"
    table1 = {
        "initialisation": "Gaussian (data), Gaussian logits (labels)",
        "objective": "Euclidean distance",
        "optimiser": "L-BFGS",
        "priors": "none",
    }

    def _labels(self, observation: Observation) -> tuple[Tensor | None, str]:
        if observation.knowledge.labels is not None:
            return observation.knowledge.labels.clone(), "knowledge"
        return None, "optimised"

    def _unmet_assumptions(self, observation: Observation) -> list[str]:
        return label_declines(observation, None)  # soft labels over the classifier's classes
