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
) -> tuple[Tensor, Tensor | None, float, list[TracePoint], dict]:
    """Minimise ``cost(x, y)`` over ``x`` (and ``y`` when given) with ``iterations`` L-BFGS steps.

    Each step runs up to ``inner_iterations`` L-BFGS iterations, as ``torch.optim.LBFGS.step`` does in DLG's
    reference code (its default of 20).
    Stops early when the best cost has not improved by a relative ``min_improvement`` for ``patience`` steps
    (0: never) or at the wall-clock ``deadline`` (a ``time.perf_counter()`` value).
    Returns the best point seen (lowest cost; a diverging run keeps its last finite point), its cost, the
    trace, and the counts of inner L-BFGS iterations and cost evaluations, and why it stopped.
    """
    x = x0.clone().requires_grad_(True)
    variables = [x]
    y = None
    if y0 is not None:
        y = y0.clone().requires_grad_(True)
        variables.append(y)
    optimizer = torch.optim.LBFGS(
        variables, lr=lr, max_iter=inner_iterations, history_size=history_size, line_search_fn=line_search
    )

    def closure() -> Tensor:
        optimizer.zero_grad()
        value = cost(x, y)
        value.backward()
        return value.detach()

    best_cost = math.inf
    best_x, best_y = x.detach().clone(), None if y is None else y.detach().clone()
    trace: list[TracePoint] = []
    stopped, since = "iterations", 0
    for it in tqdm(range(iterations), desc=desc, disable=not progress, leave=False):
        value = float(optimizer.step(closure))
        if not math.isfinite(value):
            stopped = "diverged"
            break
        since = 0 if value < best_cost - min_improvement * abs(best_cost) or not math.isfinite(best_cost) else since + 1
        if value < best_cost:
            best_cost = value
            best_x = x.detach().clone()
            best_y = None if y is None else y.detach().clone()
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
        final = float(cost(x.detach(), None if y is None else y.detach()))
    if math.isfinite(final) and final < best_cost:
        best_cost, best_x = final, x.detach().clone()
        best_y = None if y is None else y.detach().clone()
    state = optimizer.state[optimizer.param_groups[0]["params"][0]]
    counts = {
        "lbfgs_iterations": int(state.get("n_iter", 0)),
        "evaluations": int(state.get("func_evals", 0)),
        "stopped": stopped,
    }
    return best_x, best_y, best_cost, trace, counts
