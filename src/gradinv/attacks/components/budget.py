"""Memory that batched restarts need, estimated and checked before anything is allocated.

Restarts of a gradient-matching attack run as one ``vmap``-ed computation: every restart holds its candidate
inputs (with their gradient, the optimiser's state and a clamped copy) and the candidate update it replays
(a gradient of every parameter, then its backward). A count far beyond the machine is refused in one line
naming the ``restarts`` setting, instead of failing inside an allocation.
"""

from __future__ import annotations

import math

from gradinv.memory import check_allocation
from gradinv.types import Observation

#: copies of a restart's inputs alive at once: the candidate, its gradient, Adam's two moments, the clamped copy
INPUT_COPIES = 5
#: copies of the parameters per restart: the replayed update, its backward (double back-propagation), the mask
UPDATE_COPIES = 3


def restarts_bytes(observation: Observation, restarts: int) -> int:
    """Estimated bytes of ``restarts`` batched restarts on ``observation`` (the model's own activations aside)."""
    k = observation.knowledge
    first = next(iter(observation.parameters.values()), None)
    itemsize = first.element_size() if first is not None else 4
    inputs = int(k.num_samples) * math.prod(k.input_shape)
    params = sum(p.numel() for p in observation.parameters.values())
    return restarts * (INPUT_COPIES * inputs + UPDATE_COPIES * params) * itemsize


def check_restarts(observation: Observation, restarts: int, *, attack: str) -> None:
    """Refuse (one-line :class:`~gradinv.errors.ConfigError`) a restart count whose batch would not fit."""
    check_allocation(
        restarts_bytes(observation, restarts),
        what=f"{attack} with {restarts} batched restarts",
        fix="lower --restarts (the attack's restarts= setting)",
    )
