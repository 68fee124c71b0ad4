"""L-BFGS gradient matching, shared by DLG and iDLG (Zhu et al. 2019; Zhao et al. 2020)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch
from torch import Tensor
from tqdm.auto import tqdm

from gradinv.attacks.base import Callback
from gradinv.types import TracePoint


def lbfgs_match(
    cost: Callable[[Tensor, Tensor | None], Tensor],
    x0: Tensor,
    y0: Tensor | None,
    *,
    iterations: int,
    inner_iterations: int,
    lr: float,
    history_size: int,
    line_search: str | None,
    log_every: int,
    desc: str,
    progress: bool,
    callback: Callback | None,
    start: float,
    patience: int = 0,
    min_improvement: float = 1e-4,
    deadline: float | None = None,
    refine: Callable[[], Callable[[Tensor, Tensor | None], Tensor]] | None = None,
) -> tuple[Tensor, Tensor | None, float, list[TracePoint], dict]:
    """Minimise ``cost(x, y)`` over ``x`` (and ``y`` when given) with ``iterations`` L-BFGS steps.

    Each step runs up to ``inner_iterations`` L-BFGS iterations, as ``torch.optim.LBFGS.step`` does in DLG's
    reference code (its default of 20).
    Stops early when the best cost has not improved by a relative ``min_improvement`` for ``patience`` steps
    (0: never) or at the wall-clock ``deadline`` (a ``time.perf_counter()`` value).
    ``refine``: builds the same cost in float64. The first step that ends where it began (the line search found
    no decrease at float32's resolution) switches the remaining steps to it, from the same point, with a fresh
    L-BFGS memory and no stopping tolerance on the gradient; the result is returned in ``x0``'s dtype.
    Returns the best point seen (lowest cost; a diverging run keeps its last finite point), its cost, the
    trace, the counts of inner L-BFGS iterations and cost evaluations, the step at which it switched to
    float64 (None: it did not), and why it stopped.
    """
    dtype = x0.dtype
    x = x0.clone().requires_grad_(True)
    y = None if y0 is None else y0.clone().requires_grad_(True)
    counts = {"lbfgs_iterations": 0, "evaluations": 0}

    def optimizer_for(*, tolerance_grad: float = 1e-7, tolerance_change: float = 1e-9) -> torch.optim.LBFGS:
        return torch.optim.LBFGS(
            [x] if y is None else [x, y],
            lr=lr,
            max_iter=inner_iterations,
            history_size=history_size,
            line_search_fn=line_search,
            tolerance_grad=tolerance_grad,
            tolerance_change=tolerance_change,
        )

    def count(opt: torch.optim.LBFGS) -> None:
        state = opt.state[opt.param_groups[0]["params"][0]]
        counts["lbfgs_iterations"] += int(state.get("n_iter", 0))
        counts["evaluations"] += int(state.get("func_evals", 0))

    optimizer = optimizer_for()
    current = cost

    def closure() -> Tensor:
        optimizer.zero_grad()
        value = current(x, y)
        value.backward()
        return value.detach()

    best_cost = math.inf
    best_x, best_y = x.detach().clone(), None if y is None else y.detach().clone()
    trace: list[TracePoint] = []
    stopped, since, refined, previous = "iterations", 0, None, math.inf
    for it in tqdm(range(iterations), desc=desc, disable=not progress, leave=False):
        value = float(optimizer.step(closure))
        if not math.isfinite(value):
            stopped = "diverged"
            break
        since = 0 if value < best_cost - min_improvement * abs(best_cost) or not math.isfinite(best_cost) else since + 1
        if value < best_cost:
            best_cost = value
            best_x = x.detach().to(dtype, copy=True)
            best_y = None if y is None else y.detach().to(dtype, copy=True)
        if refine is not None and refined is None and value >= previous and x.dtype != torch.float64:
            count(optimizer)
            current, refined = refine(), it
            x = x.detach().double().requires_grad_(True)
            y = None if y is None else y.detach().double().requires_grad_(True)
            optimizer = optimizer_for(tolerance_grad=0.0, tolerance_change=0.0)
            with torch.no_grad():  # the best point's cost in float64, to compare the float64 steps with
                best_cost = float(current(best_x.double(), None if best_y is None else best_y.double()))
        previous = value
        now = time.perf_counter()
        if value == 0.0:
            stopped = "converged"
        elif patience and since >= patience:
            stopped = "patience"
        elif deadline is not None and now >= deadline:
            stopped = "time_budget"
        if it % log_every == 0 or it == iterations - 1 or stopped != "iterations":
            trace.append(TracePoint(iteration=it, seconds=now - start, cost=value))
            if callback is not None:
                callback(it, now - start, best_x.clone())
        if stopped != "iterations":
            break
    with torch.no_grad():
        final = float(current(x.detach(), None if y is None else y.detach()))
    if math.isfinite(final) and final < best_cost:
        best_cost, best_x = final, x.detach().to(dtype, copy=True)
        best_y = None if y is None else y.detach().to(dtype, copy=True)
    count(optimizer)
    return best_x, best_y, best_cost, trace, {**counts, "refined_at": refined, "stopped": stopped}
