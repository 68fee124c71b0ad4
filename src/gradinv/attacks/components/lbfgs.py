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
) -> tuple[Tensor, Tensor | None, float, list[TracePoint], dict[str, int]]:
    """Minimise ``cost(x, y)`` over ``x`` (and ``y`` when given) with ``iterations`` L-BFGS steps.

    Each step runs up to ``inner_iterations`` L-BFGS iterations, as ``torch.optim.LBFGS.step`` does in DLG's
    reference code (its default of 20).
    Returns the best point seen (lowest cost; a diverging run keeps its last finite point), its cost, the
    trace, and the counts of inner L-BFGS iterations and cost evaluations.
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
    for it in tqdm(range(iterations), desc=desc, disable=not progress, leave=False):
        value = float(optimizer.step(closure))
        if not math.isfinite(value):
            break
        if value < best_cost:
            best_cost = value
            best_x = x.detach().clone()
            best_y = None if y is None else y.detach().clone()
        if it % log_every == 0 or it == iterations - 1:
            elapsed = time.perf_counter() - start
            trace.append(TracePoint(iteration=it, seconds=elapsed, cost=value))
            if callback is not None:
                callback(it, elapsed, best_x.clone())
        if value == 0.0:
            break
    with torch.no_grad():
        final = float(cost(x.detach(), None if y is None else y.detach()))
    if math.isfinite(final) and final < best_cost:
        best_cost, best_x = final, x.detach().clone()
        best_y = None if y is None else y.detach().clone()
    state = optimizer.state[optimizer.param_groups[0]["params"][0]]
    counts = {"lbfgs_iterations": int(state.get("n_iter", 0)), "evaluations": int(state.get("func_evals", 0))}
    return best_x, best_y, best_cost, trace, counts
