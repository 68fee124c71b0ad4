"""COPA: combined optimisation attack (Chen & Campbell, "Understanding Training-Data Leakage from Gradients in
Neural Networks for Image Classification", NeurIPS 2021 workshop on Privacy in Machine Learning).

R-GAP solves each layer alone and fails where one layer's forward and gradient constraints are fewer than its
inputs (the rank analysis calls it deficient): the minimum-norm solution it takes there is wrong, and every
layer below inherits the error. COPA keeps R-GAP's exact recursion above that layer and, from the deficient
layer ``t`` down, solves all remaining constraints *jointly* by least squares over the image ``x``:

- layer ``t``'s own constraints on its input ``a_t = f(x)`` (the forward map of the layers below):
  ``W_t a_t + b_t = u_t`` and ``dL/dW_t = delta_t a_t^T`` (its convolutional form), with ``u_t`` and
  ``delta_t`` known from the recursion above;
- the *pull-back* constraints: each layer ``j < t`` must reproduce its observed gradient
  ``dL/dW_j = delta_j a_j^T`` (and ``dL/db_j = sum delta_j``), where ``delta_j`` is ``W_t^T delta_t`` pulled
  back through the layers between (``delta_j = (W_{j+1}^T delta_{j+1}) * sigma'(z_j)``). These are what the
  layers below know about ``a_t``: an input of layer ``t`` is only admissible if some image produces it with
  these gradients. For a fully connected layer below, ``<dL/dW_j[i], W_j[i]> = delta_j[i] z_j[i]`` already pins
  each unit; for a convolution they couple the channels.

Each block of residuals is divided by the norm of its observed tensor, and the sum of squares is minimised by
Levenberg-Marquardt in float64 with the exact Jacobian (forward-mode ``torch.func.jacfwd``), from the
normalised zero image (``init="zero"``, the data mean) or from R-GAP's minimum-norm answer (``init="rgap"``).
With smooth activations (sigmoid, tanh) the joint problem is a smooth nonlinear least squares and converges to
the exact input; with LeakyReLU it is piecewise quadratic in the activation pattern and can stop in a local
minimum. Where no layer is deficient COPA returns R-GAP's exact answer; where the deficient layer is the first
one there is nothing below to pull back through and COPA can only return the least-squares solution nearest
its start.

``smooth > 0`` (not in the paper; off by default) first solves with an image prior added, ``smooth`` times the
squared RMS of neighbouring-pixel differences, then solves again without it from there: the prior chooses the
basin (LeakyReLU) and the part of the image no constraint determines, while the final answer still meets the
constraints as closely as the prior-free problem allows.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import Tensor
from tqdm.auto import tqdm

from gradinv._settings import above, at_least, one_of
from gradinv.attacks.base import Attack, AttackOutput, Callback, register_attack
from gradinv.attacks.components.chain import ChainLayer
from gradinv.attacks.labels import label_declines, label_method_problems, labels_for
from gradinv.attacks.rgap import (
    descend,
    input_gradient,
    layer_output,
    recursion_declines,
    start_recursion,
    weight_gradient,
)
from gradinv.errors import ConfigError
from gradinv.types import Observation, TracePoint

INITS = ("zero", "rgap")
MAX_DAMPING_TRIES = 30  # a step is abandoned after this many damping increases without a decrease
STALL_STEPS = 3  # stop after this many accepted steps in a row that each lower the cost by < STALL_RTOL
STALL_RTOL = 1e-6
COST_FLOOR = 1e-24  # sum of squared relative residuals at which the constraints are met to round-off


@dataclass(frozen=True)
class COPASettings:
    """COPA's choices: labels as in ``labels_for``, Levenberg-Marquardt steps and the starting image."""

    label_method: str = "auto"
    iterations: int = 50  # Levenberg-Marquardt steps (per stage)
    init: str = "zero"
    damping: float = 1e-3  # initial damping relative to the mean diagonal of J^T J
    smooth: float = 0.0  # > 0: a first stage adds this weight x the RMS of neighbouring-pixel differences

    def problems(self) -> list[str]:
        return [
            *label_method_problems(self.label_method),
            *at_least("iterations", self.iterations, 1),
            *one_of("init", self.init, INITS),
            *above("damping", self.damping, 0),
            *at_least("smooth", self.smooth, 0),
        ]


def joint_residual(
    observation: Observation, chain: list[ChainLayer], stop: int, u: Tensor, delta: Tensor
) -> Callable[[Tensor], Tensor]:
    """The stacked relative residuals of layer ``stop``'s constraints and the pull-back constraints of every
    layer below it, as a function of the flattened image (float64)."""
    params, update = observation.parameters, observation.update
    weights = [params[f"{layer.name}.weight"].double() for layer in chain[: stop + 1]]
    biases = [params.get(f"{layer.name}.bias") for layer in chain[: stop + 1]]
    biases = [None if b is None else b.double() for b in biases]
    top = chain[stop]
    delta = delta.double()
    pulled = input_gradient(top, weights[stop], delta)  # dL/da_stop, known from above

    def target(value: Tensor | None) -> tuple[Tensor, float] | None:
        """An observed tensor, flattened, with the inverse of its norm (None: absent or zero, no residual)."""
        if value is None or float(value.norm()) == 0:
            return None
        flat = value.double().flatten()
        return flat, 1.0 / float(flat.norm())

    # the observed side of every block, prepared once: the residual runs once per column of each Jacobian
    output = target(u)
    observed = [target(update[f"{layer.name}.weight"]) for layer in chain[: stop + 1]]
    observed_bias = [target(update.get(f"{layer.name}.bias")) for layer in chain[:stop]]

    def scaled(value: Tensor, observed: tuple[Tensor, float] | None) -> Tensor:
        return value.new_zeros(0) if observed is None else (value.flatten() - observed[0]) * observed[1]

    def residual(x: Tensor) -> Tensor:
        a = x.reshape(chain[0].in_shape)
        inputs, pre = [], []
        for j in range(stop):
            inputs.append(a)
            z = layer_output(chain[j], weights[j], biases[j], a).reshape(chain[j].out_shape)
            pre.append(z)
            a = chain[j].activate(z)
        parts = [
            scaled(layer_output(top, weights[stop], biases[stop], a), output),
            scaled(weight_gradient(top, weights[stop], a, delta), observed[stop]),
        ]
        grad = pulled.reshape(top.in_shape)
        for j in range(stop - 1, -1, -1):
            d = grad * chain[j].activation_derivative(pre[j])
            parts.append(scaled(weight_gradient(chain[j], weights[j], inputs[j], d), observed[j]))
            if observed_bias[j] is not None:
                db = d.sum(dim=tuple(range(1, d.dim()))) if chain[j].kind == "conv" else d.flatten()
                parts.append(scaled(db, observed_bias[j]))
            grad = input_gradient(chain[j], weights[j], d).reshape(chain[j].in_shape)
        return torch.cat(parts)

    return residual


def pixel_differences(shape: tuple[int, ...]) -> Callable[[Tensor], Tensor]:
    """Differences of vertically and horizontally neighbouring pixels of a flattened (C, H, W) image, scaled
    to their root mean square."""
    if len(shape) != 3:
        raise ConfigError(f"COPA's smooth start needs (C, H, W) images, the model takes inputs of shape {shape}")
    c, h, w = shape
    scale = (c * ((h - 1) * w + h * (w - 1))) ** -0.5

    def differences(x: Tensor) -> Tensor:
        img = x.reshape(shape)
        return torch.cat([(img[:, 1:] - img[:, :-1]).flatten(), (img[:, :, 1:] - img[:, :, :-1]).flatten()]) * scale

    return differences


def levenberg_marquardt(
    residual: Callable[[Tensor], Tensor],
    x0: Tensor,
    *,
    iterations: int,
    damping: float,
    progress: bool,
    callback: Callback | None,
    start: float,
    shape: tuple[int, ...],
) -> tuple[Tensor, float, list[TracePoint], int]:
    """Minimise ``|residual(x)|^2`` by Levenberg-Marquardt with the exact Jacobian; returns the point, its cost,
    the trace and the number of accepted steps."""
    x = x0.clone()
    r = residual(x)
    cost = float(r.square().sum())
    trace = [TracePoint(iteration=0, seconds=time.perf_counter() - start, cost=cost)]
    lam, stalled, steps = None, 0, 0
    for it in tqdm(range(iterations), desc="COPA", disable=not progress, leave=False):
        if cost <= COST_FLOOR:
            break
        jac = torch.func.jacfwd(residual)(x)
        normal, grad = jac.T @ jac, jac.T @ r
        diag = normal.diagonal().clamp_min(1e-12 * float(normal.diagonal().max()))
        lam = damping * float(diag.mean()) if lam is None else lam
        new_cost = math.inf
        for _ in range(MAX_DAMPING_TRIES):
            step = torch.linalg.solve(normal + lam * torch.diag(diag), grad)
            candidate = x - step
            candidate_r = residual(candidate)
            new_cost = float(candidate_r.square().sum())
            if new_cost < cost:
                lam /= 3
                break
            lam *= 4
        if not new_cost < cost:
            break  # no damping gives a decrease: a (local) minimum
        stalled = stalled + 1 if cost - new_cost < STALL_RTOL * cost else 0
        x, r, cost, steps = candidate, candidate_r, new_cost, steps + 1
        elapsed = time.perf_counter() - start
        trace.append(TracePoint(iteration=it + 1, seconds=elapsed, cost=cost))
        if callback is not None:
            callback(it + 1, elapsed, x.reshape(shape).float())
        if stalled >= STALL_STEPS:
            break
    return x, cost, trace, steps


@register_attack
class COPA(Attack):
    name = "copa"
    summary = "COPA (Chen & Campbell 2021): R-GAP's recursion, then joint least squares from a deficient layer down"
    table1 = {
        "initialisation": "R-GAP or least squares",
        "objective": "gradient constraints as linear equations, all layers jointly",
        "optimiser": "least squares",
        "priors": "smoothness (optional)",
    }
    Settings = COPASettings
    requires = ("input_shape", "num_samples")

    def _unmet_assumptions(self, observation: Observation) -> list[str]:
        return recursion_declines(observation, "COPA") + label_declines(observation, self.settings.label_method)

    def _reconstruct(
        self, observation: Observation, *, generator: torch.Generator, progress: bool, callback: Callback | None
    ) -> AttackOutput:
        s = self.settings
        start = time.perf_counter()
        k = observation.knowledge
        shape = (1, *k.input_shape)
        differences = pixel_differences(tuple(k.input_shape)) if s.smooth > 0 else None  # ConfigError if not images
        chain, x, grad_x, residuals = start_recursion(observation)
        found = descend(observation, chain, x, grad_x, residuals, stop_at_deficient=True)
        extras: dict = {"residuals": found.residuals, "deficient_layer": None, "joint_layers": []}
        trace: tuple[TracePoint, ...] = ()
        if found.u is None:  # every layer full rank: R-GAP's exact answer
            image = found.x.reshape(shape)
        else:
            if s.init == "rgap":  # R-GAP's answer: the minimum-norm input, carried on down the chain
                x0 = descend(observation, chain, found.x, found.grad_x, [], top=found.stop - 1).x.flatten()
            else:
                x0 = torch.zeros(math.prod(k.input_shape), dtype=torch.float64)
            residual = joint_residual(observation, chain, found.stop, found.u, found.delta)
            stages = [residual]
            if s.smooth > 0:  # the prior picks the basin and the null-space part; the last stage drops it
                weight = math.sqrt(s.smooth)
                stages.insert(0, lambda x: torch.cat([residual(x), weight * differences(x)]))
            solution, points, steps = x0, [], 0
            for stage in stages:
                solution, cost, stage_points, stage_steps = levenberg_marquardt(
                    stage,
                    solution,
                    iterations=s.iterations,
                    damping=s.damping,
                    progress=progress,
                    callback=callback,
                    start=start,
                    shape=shape,
                )
                offset = points[-1].iteration if points else 0  # one numbering across the stages
                points += [replace(p, iteration=p.iteration + offset) for p in stage_points]
                steps += stage_steps
            image = solution.reshape(shape)
            trace = tuple(points)
            extras.update(
                deficient_layer=chain[found.stop].name,
                joint_layers=[layer.name for layer in chain[: found.stop + 1]],
                joint_cost=cost,
                steps=steps,
            )
        labels, label_source = labels_for(observation, method=s.label_method)
        return AttackOutput(
            inputs=image.float(),
            labels=labels,
            label_source=label_source,
            trace=trace,
            extras={**extras, "float64_inputs": image},
        )
