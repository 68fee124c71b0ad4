"""The iteration engine every gradient-matching attack runs on.

An attack is a preset of parts (survey Table 1): an initialisation (:mod:`.inits`), a gradient-matching
objective with layer weights (:mod:`.objectives`), priors (:mod:`.priors`), an optimiser and schedule
(:mod:`.optim`) and the box constraint. :class:`MatchingSettings` holds one field per part, so every part can be
overridden from Python (``build_attack("invgrad", tv=1e-3)``) and with ``--attack-option tv=1e-3``.

:func:`optimise` runs the restarts batched: one ``torch.func.vmap`` over restarts of ``grad_and_value(cost)``,
or plain ``torch.autograd`` double back-propagation, restarts one by one, which skips the transform wrappers
and is the faster of the two for one restart, and on a CPU for several (``differentiation="auto"`` picks, see
:func:`use_autograd`; measured in ``bench/engine.py``). It logs a
trace, stops early when the best cost stalls for ``patience`` iterations and at a wall-clock ``time_budget``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor
from torch.func import grad_and_value, vmap
from tqdm.auto import tqdm

from gradinv._settings import above, at_least, one_of
from gradinv.attacks.components.inits import INITS
from gradinv.attacks.components.lbfgs import lbfgs_match
from gradinv.attacks.components.objectives import LAYER_WEIGHTS, OBJECTIVES
from gradinv.attacks.components.optim import OPTIMIZERS, SCHEDULES, make_optimizer, make_scheduler
from gradinv.attacks.labels import label_method_problems
from gradinv.types import TracePoint

Callback = Callable[[int, float, Tensor], None]
DIFFERENTIATION = ("auto", "func", "autograd")


@dataclass(frozen=True)
class MatchingSettings:
    """The parts of a gradient-matching attack; each paper's preset overrides the defaults (its own)."""

    iterations: int = 4000
    restarts: int = 1
    #: initialisation (:data:`~gradinv.attacks.components.inits.INITS`) and its one number (None: its default)
    init: str = "gaussian"
    init_scale: float | None = None
    #: gradient-matching distance (:data:`~gradinv.attacks.components.objectives.OBJECTIVES`)
    objective: str = "cosine"
    #: per-layer weights of the distance by depth (``equal``, ``linear``, ``exp``, ``first``, ``last``)
    layer_weights: str = "equal"
    #: weights of the priors: total variation, l2, BatchNorm statistics, label, group consistency
    tv: float = 0.0
    l2: float = 0.0
    bn: float = 0.0
    label: float = 0.0
    group: float = 0.0
    #: optimiser (``adam``, ``adamw``, ``sgd``, ``lbfgs``), learning rate, signed gradients, schedule, warm-up
    optimizer: str = "adam"
    lr: float = 0.1
    signed: bool = False
    schedule: str = "step"
    warmup: int = 0
    #: keep candidates inside valid images (needs the normalisation)
    boxed: bool = True
    label_method: str = "auto"
    #: stop when the best cost has not improved by ``min_improvement`` (relative) for this many iterations; 0: never
    patience: int = 0
    min_improvement: float = 1e-4
    #: stop after this many seconds; 0: no budget
    time_budget: float = 0.0
    log_every: int = 50
    #: match only the entries a pruning defense sent (see ``replay.matching_cost``)
    adaptive: bool = True
    #: ``func`` (vmap over restarts), ``autograd`` (restarts one by one), ``auto`` (see :func:`use_autograd`)
    differentiation: str = "auto"
    #: L-BFGS only: inner iterations per step and history
    inner_iterations: int = 20
    history_size: int = 100

    def problems(self) -> list[str]:
        return [
            *at_least("iterations", self.iterations, 1),
            *at_least("restarts", self.restarts, 1),
            *one_of("init", self.init, sorted(INITS)),
            *([] if self.init_scale is None else above("init_scale", self.init_scale, 0)),
            *one_of("objective", self.objective, sorted(OBJECTIVES)),
            *one_of("layer_weights", self.layer_weights, LAYER_WEIGHTS),
            *(p for k in ("tv", "l2", "bn", "label", "group") for p in at_least(k, getattr(self, k), 0)),
            *one_of("optimizer", self.optimizer, OPTIMIZERS),
            *above("lr", self.lr, 0),
            *one_of("schedule", self.schedule, SCHEDULES),
            *at_least("warmup", self.warmup, 0),
            *label_method_problems(self.label_method),
            *at_least("patience", self.patience, 0),
            *at_least("min_improvement", self.min_improvement, 0),
            *at_least("time_budget", self.time_budget, 0),
            *at_least("log_every", self.log_every, 1),
            *one_of("differentiation", self.differentiation, DIFFERENTIATION),
            *at_least("inner_iterations", self.inner_iterations, 1),
            *at_least("history_size", self.history_size, 1),
        ]


@dataclass(frozen=True, eq=False)
class EngineResult:
    """What :func:`optimise` returns: every restart's final candidate and cost, the best restart, the trace,
    how many iterations ran and why it stopped (``iterations``, ``patience``, ``time_budget``, ``converged``)."""

    candidates: Tensor
    costs: Tensor
    best: int
    trace: tuple[TracePoint, ...]
    iterations_run: int
    stopped: str
    extras: dict = field(default_factory=dict)

    @property
    def inputs(self) -> Tensor:
        return self.candidates[self.best].clone()


class _Stall:
    """Early stopping: the best cost must improve by a relative ``min_improvement`` every ``patience`` steps."""

    def __init__(self, patience: int, min_improvement: float) -> None:
        self.patience, self.min_improvement = patience, min_improvement
        self.best, self.since = math.inf, 0

    def stalled(self, value: float) -> bool:
        if not self.patience:
            return False
        if value < self.best - self.min_improvement * abs(self.best) or not math.isfinite(self.best):
            self.best, self.since = value, 0
            return False
        self.since += 1
        return self.since >= self.patience


def use_autograd(settings: MatchingSettings, restarts: int, device: torch.device | None = None) -> bool:
    """Whether the engine differentiates with plain autograd (restarts one by one) rather than ``vmap``.

    ``auto``: autograd for one restart, and on a CPU for any number (``bench/results/engine.md``, 4 restarts, 2
    threads: the loop took 0.47-0.51x vmap's time at batch 8 on ConvNet-64 and ResNet-18, 0.80-1.15x at batch 1);
    vmap for several restarts on an accelerator (not measured here)."""
    if settings.differentiation == "auto":
        return restarts == 1 or device is None or device.type == "cpu"
    return settings.differentiation == "autograd"


def optimise(
    cost: Callable[[Tensor], Tensor],
    x0: Tensor,
    *,
    settings: MatchingSettings,
    bounds: tuple[Tensor, Tensor] | None,
    autograd_cost: Callable[[Tensor], Tensor] | None = None,
    coupling: Callable[[Tensor, Tensor], Tensor] | None = None,
    progress: bool = False,
    callback: Callback | None = None,
    desc: str = "attack",
    start: float | None = None,
) -> EngineResult:
    """Minimise ``cost(x)`` (one restart's candidate, pure) from ``x0`` (restarts first) with the settings'
    optimiser, schedule, box, group-consistency weight, patience and time budget.

    ``autograd_cost``: the same cost built for plain autograd (``matching_cost(..., autograd=True)``), used when
    :func:`use_autograd` says so; without it ``cost`` is differentiated with ``torch.func``.
    ``coupling(x, values)``: the gradient of the term that couples the restarts, weighted by ``settings.group``
    (default: :func:`group_gradient`, each restart to the restarts' mean); GradInversion registers the restarts
    to a consensus first.
    Trace times and callback times are measured from ``start`` (default: now).
    """
    s = settings
    start = time.perf_counter() if start is None else start
    if s.optimizer == "lbfgs":
        # restarts one after another: autograd unless told otherwise (use_autograd)
        replay = autograd_cost if autograd_cost is not None and s.differentiation != "func" else cost
        return _lbfgs(
            replay, x0, settings=s, bounds=bounds, progress=progress, callback=callback, desc=desc, start=start
        )
    restarts = x0.shape[0]
    x = x0.clone().requires_grad_(True)
    optimizer = make_optimizer(s.optimizer, [x], lr=s.lr)
    scheduler = make_scheduler(optimizer, s.schedule, s.iterations, warmup=s.warmup)
    step = _gradient(cost, autograd_cost if use_autograd(s, restarts, x0.device) else None, restarts)
    coupling = coupling or (lambda x, _values: group_gradient(x))
    stall = _Stall(s.patience, s.min_improvement)
    trace: list[TracePoint] = []
    stopped, it = "iterations", -1
    for it in tqdm(range(s.iterations), desc=desc, disable=not progress, leave=False):
        g, values = step(x.detach())
        if s.group and restarts > 1:  # held fixed within the step
            g = g + s.group * coupling(x.detach(), values)
        x.grad = g.sign() if s.signed else g
        optimizer.step()
        scheduler.step()
        if bounds is not None:
            with torch.no_grad():
                x.data = torch.maximum(torch.minimum(x.data, bounds[1]), bounds[0])
        best_value = float(values.min())
        elapsed = time.perf_counter() - start
        last = it == s.iterations - 1
        if stall.stalled(best_value):
            stopped, last = "patience", True
        elif s.time_budget and elapsed >= s.time_budget:
            stopped, last = "time_budget", True
        elif not math.isfinite(best_value):
            stopped, last = "diverged", True
        if it % s.log_every == 0 or last:
            best = int(torch.argmin(values))
            trace.append(TracePoint(iteration=it, seconds=elapsed, cost=best_value))
            if callback is not None:
                callback(it, elapsed, x.detach()[best].clone())
        if last:
            break
    final = final_costs(cost, x.detach())
    return EngineResult(
        candidates=x.detach(),
        costs=final,
        best=int(torch.argmin(final)),
        trace=tuple(trace),
        iterations_run=it + 1,
        stopped=stopped,
    )


def _gradient(
    cost: Callable[[Tensor], Tensor], autograd_cost: Callable[[Tensor], Tensor] | None, restarts: int
) -> Callable[[Tensor], tuple[Tensor, Tensor]]:
    """``step(x) -> (gradient, values)`` over all restarts: vmap-ed ``torch.func``, or autograd one by one."""
    if autograd_cost is None:
        return vmap(grad_and_value(cost))

    def step(x: Tensor) -> tuple[Tensor, Tensor]:
        grads, values = [], []
        for r in range(restarts):
            xr = x[r].clone().requires_grad_(True)
            value = autograd_cost(xr)
            (g,) = torch.autograd.grad(value, xr)
            grads.append(g)
            values.append(value.detach())
        return torch.stack(grads), torch.stack(values)

    return step


def group_gradient(x: Tensor, consensus: Tensor | None = None) -> Tensor:
    """Gradient of :func:`~gradinv.attacks.components.priors.group_consistency`: each restart's squared distance
    to ``consensus`` (default: the restarts' mean; per restart when it has the restarts' axis), held fixed."""
    consensus = x.mean(0, keepdim=True) if consensus is None else consensus
    return 2 * (x - consensus) / x[0].numel()


def final_costs(cost: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """Each restart's cost at the end of a run (non-finite ones as +inf, so they never win)."""
    try:
        with torch.no_grad():
            values = vmap(cost)(x)
    except RuntimeError:  # a cost whose replay needs autograd outside vmap
        values = torch.stack([cost(x[r]).detach() for r in range(x.shape[0])])
    return torch.where(torch.isfinite(values), values, torch.full_like(values, math.inf))


def _lbfgs(
    cost: Callable[[Tensor], Tensor],
    x0: Tensor,
    *,
    settings: MatchingSettings,
    bounds: tuple[Tensor, Tensor] | None,
    progress: bool,
    callback: Callback | None,
    desc: str,
    start: float,
) -> EngineResult:
    """L-BFGS restarts one after another (its line search couples what it optimises), as DLG and CPL run."""
    s = settings
    best_x, costs, trace, ran, stopped = [], [], [], 0, "iterations"
    deadline = start + s.time_budget if s.time_budget else None
    for r in range(x0.shape[0]):
        x, _, value, run_trace, counts = lbfgs_match(
            lambda x, _y: cost(x),
            x0[r],
            None,
            iterations=s.iterations,
            inner_iterations=s.inner_iterations,
            lr=s.lr,
            history_size=s.history_size,
            line_search="strong_wolfe",
            log_every=s.log_every,
            desc=f"{desc} restart {r + 1}/{x0.shape[0]}",
            progress=progress,
            callback=callback,
            start=start,
            patience=s.patience,
            min_improvement=s.min_improvement,
            deadline=deadline,
        )
        if bounds is not None:
            x = torch.maximum(torch.minimum(x, bounds[1]), bounds[0])
        best_x.append(x)
        costs.append(value)
        trace.extend(run_trace)
        ran += counts["lbfgs_iterations"]
        stopped = counts.get("stopped", stopped)
        if deadline is not None and time.perf_counter() >= deadline:
            stopped = "time_budget"
            break
    final = torch.tensor(costs)
    final = torch.where(torch.isfinite(final), final, torch.full_like(final, math.inf))
    return EngineResult(
        candidates=torch.stack(best_x),
        costs=final,
        best=int(torch.argmin(final)),
        trace=tuple(trace),
        iterations_run=ran,
        stopped=stopped,
    )
