"""Optimisers and learning-rate schedules of iterative attacks (survey Table 1, "optimiser").

First-order optimisers run on all restarts at once (one tensor, restarts first); ``signed`` replaces the
gradient by its sign before the step, as Inverting Gradients does (Geiping et al. 2020). L-BFGS (DLG, CPL) is
in :mod:`gradinv.attacks.components.lbfgs`: its line search couples whatever it optimises, so restarts run one
after another.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from gradinv.errors import ConfigError

OPTIMIZERS = ("adam", "adamw", "sgd", "lbfgs")
SCHEDULES = ("none", "step", "cosine")


def make_optimizer(name: str, params: list[Tensor], *, lr: float) -> torch.optim.Optimizer:
    """A first-order optimiser over ``params`` (``lbfgs`` is run by ``lbfgs_match``)."""
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9)
    raise ConfigError(f"optimizer must be one of {', '.join(OPTIMIZERS[:3])} here, got {name!r}")


def schedule_factor(name: str, iteration: int, iterations: int, *, warmup: int = 0) -> float:
    """The learning-rate multiplier at ``iteration`` of ``iterations``: linear warm-up over ``warmup``
    iterations, then ``step`` (x0.1 at 3/8, 5/8 and 7/8 of the run, Geiping et al. 2020), ``cosine`` (decay to 0,
    Loshchilov & Hutter 2017) or ``none``."""
    if warmup and iteration < warmup:
        return (iteration + 1) / warmup
    if name == "none":
        return 1.0
    if name == "step":
        return 0.1 ** sum(iteration >= int(iterations * f) for f in (3 / 8, 5 / 8, 7 / 8))
    if name == "cosine":
        span = max(1, iterations - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(iteration - warmup, span) / span))
    raise ConfigError(f"schedule must be one of {', '.join(SCHEDULES)}, got {name!r}")


def budget_iteration(iteration: int, iterations: int, *, elapsed: float, time_budget: float) -> int:
    """Where a run stands in its schedule: ``iteration``, or further along when a wall-clock ``time_budget``
    (seconds; 0: none) will end the run first, at the same fraction of ``iterations`` as ``elapsed`` is of the
    budget. A schedule written for ``iterations`` then completes its decay within the budget instead of being
    cut off at its start (with a budget worth 2% of the iterations, a step or cosine schedule never decays)."""
    if not time_budget or iterations <= 0:
        return iteration
    return max(iteration, min(iterations - 1, int(iterations * elapsed / time_budget)))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every parameter group's learning rate to ``lr``."""
    for group in optimizer.param_groups:
        group["lr"] = lr
