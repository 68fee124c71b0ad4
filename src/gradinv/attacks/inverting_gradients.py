"""Inverting Gradients (Geiping, Bauermeister, Dröge, Moeller, NeurIPS 2020).

Threat model: honest-but-curious server that knows the input shape, the number of samples and (for the
box constraint) the normalisation; labels come from the threat model or are recovered from the update.
Objective: ``1 - cos(∇θ L(x, y), observed) + α·TV(x)``, minimised with signed Adam, a box constraint to
valid images, step decay at 3/8, 5/8 and 7/8 of the run, and several restarts from random inputs; the
restart with the lowest final matching cost is kept. Restarts run as one batched computation
(``torch.func.vmap``), not a Python loop.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch.func import grad_and_value, vmap
from tqdm.auto import tqdm

from gradinv._settings import above, at_least, one_of
from gradinv.attacks.base import Attack, AttackOutput, Callback, register_attack
from gradinv.attacks.components.budget import check_restarts
from gradinv.attacks.components.objectives import OBJECTIVES
from gradinv.attacks.components.replay import box_bounds, matching_cost
from gradinv.attacks.labels import label_declines, label_method_problems, labels_for
from gradinv.types import Observation, TracePoint


@dataclass(frozen=True)
class InvertingGradientsSettings:
    """Defaults are the paper's (inversefed): lr 0.1, TV 1e-4, cosine objective, signed Adam, box, decay."""

    iterations: int = 4000
    restarts: int = 1
    lr: float = 0.1
    tv_weight: float = 1e-4
    objective: str = "cosine"
    signed: bool = True
    boxed: bool = True
    lr_decay: bool = True
    label_method: str = "auto"
    log_every: int = 50
    #: match only the entries a pruning defense sent (see ``replay.matching_cost``)
    adaptive: bool = True

    def problems(self) -> list[str]:
        return [
            *at_least("iterations", self.iterations, 1),
            *at_least("restarts", self.restarts, 1),
            *above("lr", self.lr, 0),
            *at_least("tv_weight", self.tv_weight, 0),
            *one_of("objective", self.objective, sorted(OBJECTIVES)),
            *label_method_problems(self.label_method),
            *at_least("log_every", self.log_every, 1),
        ]


@register_attack
class InvertingGradients(Attack):
    name = "invgrad"
    summary = "Inverting Gradients (Geiping et al. 2020): cosine matching + TV, signed Adam, batched restarts"
    Settings = InvertingGradientsSettings
    requires = ("input_shape", "num_samples")

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
        check_restarts(observation, s.restarts, attack=self.name)  # before the restarts' inputs are allocated
        start = time.perf_counter()
        k = observation.knowledge
        labels, label_source = labels_for(observation, method=s.label_method)
        labels = labels.to(observation.device)
        shape = (s.restarts, k.num_samples, *k.input_shape)
        cost = matching_cost(observation, objective=OBJECTIVES[s.objective], tv_weight=s.tv_weight, adaptive=s.adaptive)
        step = vmap(grad_and_value(cost), in_dims=(0, None))
        bounds = box_bounds(observation, shape) if s.boxed else None

        # drawn on the CPU from the seeded generator, so a seed gives the same start on any device
        x = torch.randn(shape, generator=generator).to(observation.device).requires_grad_(True)
        optimizer = torch.optim.Adam([x], lr=s.lr)
        milestones = [int(s.iterations * f) for f in (3 / 8, 5 / 8, 7 / 8)] if s.lr_decay else []
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=0.1)
        trace: list[TracePoint] = []
        for it in tqdm(range(s.iterations), desc=self.name, disable=not progress, leave=False):
            g, values = step(x.detach(), labels)
            x.grad = g.sign() if s.signed else g
            optimizer.step()
            scheduler.step()
            if bounds is not None:
                with torch.no_grad():
                    x.data = torch.maximum(torch.minimum(x.data, bounds[1]), bounds[0])
            if it % s.log_every == 0 or it == s.iterations - 1:
                best = int(torch.argmin(values))
                elapsed = time.perf_counter() - start
                trace.append(TracePoint(iteration=it, seconds=elapsed, cost=float(values[best])))
                if callback is not None:
                    callback(it, elapsed, x.detach()[best].clone())

        with torch.no_grad():
            final = vmap(cost, in_dims=(0, None))(x.detach(), labels)
        best = int(torch.argmin(final))
        return AttackOutput(
            inputs=x.detach()[best].clone(),
            labels=labels,
            label_source=label_source,
            trace=tuple(trace),
            extras={"restart_costs": final.tolist(), "best_restart": best},
        )
