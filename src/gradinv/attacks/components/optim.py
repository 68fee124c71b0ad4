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


def make_scheduler(
    optimizer: torch.optim.Optimizer, name: str, iterations: int, *, warmup: int = 0
) -> torch.optim.lr_scheduler.LambdaLR:
    """A scheduler stepping :func:`schedule_factor` once per iteration."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: schedule_factor(name, it, iterations, warmup=warmup))
