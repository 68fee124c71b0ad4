"""L-BFGS gradient matching, shared by DLG and iDLG (Zhu et al. 2019; Zhao et al. 2020), and the L-BFGS optimiser
it runs.

:class:`CompactLBFGS` is ``torch.optim.LBFGS`` with the search direction computed from the compact representation
of the inverse Hessian approximation (Byrd, Nocedal, Schnabel, "Representations of quasi-Newton matrices and their
use in limited memory methods", Math. Programming 1994, Thm. 2.2) instead of the two-loop recursion. Both give the
same direction in exact arithmetic; the two-loop recursion costs about ``4 m`` small tensor operations per
iteration for a history of ``m`` pairs (0.7-0.9 ms per evaluation at torch's default of 100 pairs on a CPU, 2
threads, against 0.25-0.33 ms for this class; one DLG evaluation on LeNet takes 2-5 ms), the compact form four
matrix-vector products and two ``m x m`` triangular solves, kept in float64.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch
from torch import Tensor
from torch.optim.lbfgs import _strong_wolfe  # torch's line search (same signature since torch 1.4)
from tqdm.auto import tqdm

from gradinv.attacks.base import Callback
from gradinv.types import TracePoint


class CompactLBFGS(torch.optim.Optimizer):
    """L-BFGS with ``torch.optim.LBFGS``'s arguments, stopping rules, strong-Wolfe line search and state counters
    (``n_iter``, ``func_evals``), whose direction comes from the compact representation (see the module docstring).

    The curvature pairs ``s_i, y_i`` are kept as rows of ``(m, n)`` matrices together with ``S Y^T`` and ``Y Y^T``
    (``m x m``, float64, updated by three matrix-vector products per new pair). With ``R`` the upper triangle of
    ``S Y^T``, ``D`` its diagonal and ``gamma = s^T y / y^T y`` of the newest pair, the inverse Hessian
    approximation applied to ``g`` is ``gamma g + S^T q - gamma Y^T p`` with ``p = R^{-1} S g`` and
    ``q = R^{-T} ((D + gamma Y Y^T) p - gamma Y g)``.
    """

    def __init__(
        self,
        params,
        *,
        lr: float = 1.0,
        max_iter: int = 20,
        max_eval: int | None = None,
        tolerance_grad: float = 1e-7,
        tolerance_change: float = 1e-9,
        history_size: int = 100,
        line_search_fn: str | None = None,
    ) -> None:
        if line_search_fn not in (None, "strong_wolfe"):
            raise ValueError(f"line_search_fn must be None or 'strong_wolfe', not {line_search_fn!r}")
        defaults = {
            "lr": lr,
            "max_iter": max_iter,
            "max_eval": max_iter * 5 // 4 if max_eval is None else max_eval,
            "tolerance_grad": tolerance_grad,
            "tolerance_change": tolerance_change,
            "history_size": history_size,
            "line_search_fn": line_search_fn,
        }
        super().__init__(params, defaults)
        if len(self.param_groups) != 1:
            raise ValueError("CompactLBFGS takes one parameter group")
        self._params = self.param_groups[0]["params"]

    def _flat_grad(self) -> Tensor:
        return torch.cat(
            [torch.zeros_like(p).reshape(-1) if p.grad is None else p.grad.reshape(-1) for p in self._params]
        )

    def _add(self, step: float, direction: Tensor) -> None:
        offset = 0
        for p in self._params:
            n = p.numel()
            p.add_(direction[offset : offset + n].view_as(p), alpha=step)
            offset += n

    def _assign(self, flat: Tensor) -> None:
        offset = 0
        for p in self._params:
            n = p.numel()
            p.copy_(flat[offset : offset + n].view_as(p))
            offset += n

    def _evaluate(self, closure: Callable[[], Tensor], x: Tensor, t: float, d: Tensor) -> tuple[float, Tensor]:
        """Loss and flat gradient at ``x + t d`` (``x``: the flat parameters, restored afterwards)."""
        self._add(t, d)
        loss = float(closure())
        grad = self._flat_grad()
        self._assign(x)
        return loss, grad

    def _direction(self, state: dict, g: Tensor) -> Tensor:
        """``-H g`` from the stored pairs (compact form); ``-g`` without pairs."""
        order = state.get("order")
        if order is None:
            return g.neg()
        S, Y, gamma = state["S"], state["Y"], state["gamma"]
        a, b = (S @ g).to(torch.float64)[order], (Y @ g).to(torch.float64)[order]
        sy, yy = state["SY"][order][:, order], state["YY"][order][:, order]
        r = torch.triu(sy)
        p = torch.linalg.solve_triangular(r, a.unsqueeze(1), upper=True).squeeze(1)
        inner = torch.diagonal(sy) * p + gamma * (yy @ p) - gamma * b
        q = torch.linalg.solve_triangular(r.T, inner.unsqueeze(1), upper=False).squeeze(1)
        cq, cp = torch.zeros_like(state["SY"][0]), torch.zeros_like(state["SY"][0])
        cq[order], cp[order] = q, gamma * p
        return (S.T @ cq.to(g.dtype) - Y.T @ cp.to(g.dtype) + gamma * g).neg()

    def _remember(self, state: dict, s: Tensor, y: Tensor, ys: float) -> None:
        """Store the pair ``(s, y)`` in a ring of ``history_size`` rows (``order``: the rows, oldest first)."""
        m = self.param_groups[0]["history_size"]
        if "S" not in state:
            state["S"], state["Y"] = s.new_zeros((m, s.numel())), s.new_zeros((m, s.numel()))
            state["SY"] = torch.zeros((m, m), dtype=torch.float64, device=s.device)
            state["YY"] = torch.zeros((m, m), dtype=torch.float64, device=s.device)
        order = state.get("order")
        slots = [] if order is None else order.tolist()
        slot = slots.pop(0) if len(slots) == m else len(slots)
        slots.append(slot)
        S, Y = state["S"], state["Y"]
        S[slot], Y[slot] = s, y
        state["SY"][slot] = (Y @ s).to(torch.float64)  # s_slot . y_j
        state["SY"][:, slot] = (S @ y).to(torch.float64)  # s_i . y_slot
        state["YY"][slot] = state["YY"][:, slot] = (Y @ y).to(torch.float64)
        state["order"] = torch.tensor(slots, device=s.device)
        state["gamma"] = ys / float(y @ y)

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor]) -> Tensor:  # type: ignore[override]
        """Up to ``max_iter`` L-BFGS iterations; returns the loss at the start (as ``torch.optim.LBFGS``)."""
        closure = torch.enable_grad()(closure)
        group = self.param_groups[0]
        lr, max_iter, max_eval = group["lr"], group["max_iter"], group["max_eval"]
        tol_grad, tol_change = group["tolerance_grad"], group["tolerance_change"]
        state = self.state[self._params[0]]
        state.setdefault("func_evals", 0)
        state.setdefault("n_iter", 0)

        orig_loss = closure()
        loss = float(orig_loss)
        evals = 1
        state["func_evals"] += 1
        g = self._flat_grad()
        if g.abs().max() <= tol_grad:
            return orig_loss
        d, t, prev_g = state.get("d"), state.get("t"), state.get("prev_g")
        n_iter = 0
        while n_iter < max_iter:
            n_iter += 1
            state["n_iter"] += 1
            if state["n_iter"] > 1:
                y, s = g - prev_g, d * t
                ys = float(y @ s)
                if ys > 1e-10:
                    self._remember(state, s, y, ys)
            d = self._direction(state, g)
            prev_g, prev_loss = g.clone(), loss
            t = min(1.0, 1.0 / float(g.abs().sum())) * lr if state["n_iter"] == 1 else lr
            gtd = float(g @ d)
            if gtd > -tol_change:
                break
            if group["line_search_fn"] == "strong_wolfe":
                flat = torch.cat([p.detach().reshape(-1) for p in self._params])

                def objective(x: Tensor, step: float, direction: Tensor) -> tuple[float, Tensor]:
                    return self._evaluate(closure, x, step, direction)

                loss, g, t, ls_evals = _strong_wolfe(objective, flat, t, d, loss, g, gtd)
                self._add(t, d)
                done = bool(g.abs().max() <= tol_grad)
            else:
                self._add(t, d)
                ls_evals = 0
                if n_iter != max_iter:
                    loss = float(closure())
                    g = self._flat_grad()
                    ls_evals = 1
                done = bool(g.abs().max() <= tol_grad) if ls_evals else False
            evals += ls_evals
            state["func_evals"] += ls_evals
            if n_iter == max_iter or evals >= max_eval or done:
                break
            if float((d * t).abs().max()) <= tol_change or abs(loss - prev_loss) < tol_change:
                break
        state["d"], state["t"], state["prev_g"] = d, t, prev_g
        return orig_loss


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

    def optimizer_for(*, tolerance_grad: float = 1e-7, tolerance_change: float = 1e-9) -> CompactLBFGS:
        return CompactLBFGS(
            [x] if y is None else [x, y],
            lr=lr,
            max_iter=inner_iterations,
            history_size=history_size,
            line_search_fn=line_search,
            tolerance_grad=tolerance_grad,
            tolerance_change=tolerance_change,
        )

    def count(opt: CompactLBFGS) -> None:
        state = opt.state[opt.param_groups[0]["params"][0]]
        counts["lbfgs_iterations"] += int(state.get("n_iter", 0))
        counts["evaluations"] += int(state.get("func_evals", 0))

    optimizer = optimizer_for()
    current = cost

    def closure() -> Tensor:
        # gradients for the candidates only (a cost that replays with autograd also reaches the model's parameters)
        wrt = [x] if y is None else [x, y]
        value = current(x, y)
        for p, g in zip(wrt, torch.autograd.grad(value, wrt, allow_unused=True), strict=True):
            p.grad = g  # None (read as zeros) where the cost does not depend on p
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
            # the best point's cost in float64, to compare the float64 steps with (outside no_grad: a cost may
            # differentiate the replay with autograd)
            best_cost = float(current(best_x.double(), None if best_y is None else best_y.double()).detach())
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
    final = float(current(x.detach(), None if y is None else y.detach()).detach())
    if math.isfinite(final) and final < best_cost:
        best_cost, best_x = final, x.detach().to(dtype, copy=True)
        best_y = None if y is None else y.detach().to(dtype, copy=True)
    count(optimizer)
    return best_x, best_y, best_cost, trace, {**counts, "refined_at": refined, "stopped": stopped}
