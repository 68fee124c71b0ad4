"""Defenses: one paper, one class, maths in :mod:`gradinv.defenses.functional`. Importing this package
registers them all in :data:`DEFENSES`.

>>> scenario = Scenario(model, inputs, labels, defenses=("prune:0.9",))   # or build_defense("prune", fraction=0.9)
"""

import math
from collections.abc import Sequence

from gradinv.defenses import compression, data, model, soteria, update  # noqa: F401  (registers)
from gradinv.defenses.base import (
    DEFENSES,
    ClientBatch,
    ClientState,
    DataDefense,
    Defense,
    ModelDefense,
    UpdateDefense,
    as_defense,
    build_defense,
    parse_defense,
    payload_bytes,
    register_defense,
)
from gradinv.defenses.compression import round_bytes
from gradinv.defenses.functional import gaussian_epsilon
from gradinv.defenses.update import DPSGD, local_uses
from gradinv.protocol import Protocol


def dp_epsilon(
    defenses: Sequence[Defense], *, protocol: Protocol | None = None, num_samples: int | None = None
) -> float | None:
    """The sample-level epsilon of one round under the DP-SGD defenses among ``defenses`` (composed over the
    local steps a sample takes part in, at the smallest of their deltas), or None when there is none.
    ``num_samples``: the client's batch size (needed for FedAvg with a local batch size)."""
    dp = [d for d in defenses if isinstance(d, DPSGD)]
    if not dp:
        return None
    if any(d.settings.noise_multiplier == 0 for d in dp):
        return math.inf
    uses = 1 if protocol is None else local_uses(protocol, num_samples or protocol.local_batch_size or 1)
    sigma = sum(d.settings.noise_multiplier**-2 for d in dp) ** -0.5
    return gaussian_epsilon(sigma, delta=min(d.settings.delta for d in dp), rounds=uses)


__all__ = [
    "DEFENSES",
    "ClientBatch",
    "ClientState",
    "DataDefense",
    "Defense",
    "ModelDefense",
    "UpdateDefense",
    "as_defense",
    "build_defense",
    "dp_epsilon",
    "gaussian_epsilon",
    "parse_defense",
    "payload_bytes",
    "register_defense",
    "round_bytes",
]
