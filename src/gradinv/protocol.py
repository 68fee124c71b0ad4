"""The federated protocols' settings (core layer): what a client's round is, as plain frozen values.

- :class:`FedSGD` (McMahan et al. 2017): the client shares the gradient of the mean loss over its batch.
- :class:`FedAvg` (McMahan et al. 2017): the client runs K local SGD steps (local batch size, learning rate) and
  shares the weight delta ``w_K - w_0``.

What a client computes under them lives in :mod:`gradinv.fl.protocols` (``client_update``), which re-exports
these names. Specs name them: ``PROTOCOLS.parse("fedavg:local_steps=5,lr=0.1")``, ``"fedavg:5"``, ``"fedsgd"``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, ClassVar

from gradinv._settings import type_problems
from gradinv.errors import ConfigError
from gradinv.registry import PROTOCOLS


def _check(protocol: Any) -> None:
    wrong = type_problems(type(protocol), {f.name: getattr(protocol, f.name) for f in fields(protocol)})
    if wrong:
        raise ConfigError(f"{protocol.name}: {'; '.join(wrong.values())}")


@PROTOCOLS.register
@dataclass(frozen=True)
class FedSGD:
    """One gradient of the mean loss over the client's whole batch (the server sees ``gradient``)."""

    name: ClassVar[str] = "fedsgd"
    primary: ClassVar[str | None] = None

    @property
    def update_kind(self) -> str:
        return "gradient"

    def to_dict(self) -> dict:
        return {"name": self.name}

    def spec(self) -> str:
        """This protocol as a spec that ``PROTOCOLS.parse`` turns back into it."""
        return PROTOCOLS.spec(self)


@PROTOCOLS.register
@dataclass(frozen=True)
class FedAvg:
    """K local SGD steps with a local batch size and learning rate (the server sees ``weight_delta``).

    Local step ``k`` uses samples ``[k*b, (k+1)*b)`` of the client's batch, cycling; ``local_batch_size``
    ``None`` means full batch. ``shuffle``: the client draws a fresh random order of its ``n`` samples for every
    epoch (every ``n`` sample visits) with private randomness the server never sees, as FedAvg clients do
    (Dimitrov et al., TMLR 2022); step ``k`` then takes positions ``[k*b, (k+1)*b)`` of the epochs' concatenated
    orders.
    """

    local_steps: int = 1
    lr: float = 0.1
    local_batch_size: int | None = None
    shuffle: bool = False
    name: ClassVar[str] = "fedavg"
    primary: ClassVar[str | None] = "local_steps"

    def __post_init__(self) -> None:
        _check(self)
        if self.local_steps < 1:
            raise ConfigError(f"FedAvg needs local_steps >= 1, got {self.local_steps}")
        if not self.lr > 0:
            raise ConfigError(f"FedAvg needs a positive learning rate, got {self.lr}")
        if self.local_batch_size is not None and self.local_batch_size < 1:
            raise ConfigError(f"FedAvg local_batch_size must be >= 1 or None, got {self.local_batch_size}")

    @property
    def update_kind(self) -> str:
        return "weight_delta"

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "local_steps": self.local_steps,
            "lr": self.lr,
            "local_batch_size": self.local_batch_size,
            # written only when set, so records of clients that keep the fixed order stay as they were
            **({"shuffle": True} if self.shuffle else {}),
        }

    def spec(self) -> str:
        """This protocol as a spec that ``PROTOCOLS.parse`` turns back into it."""
        return PROTOCOLS.spec(self)


Protocol = FedSGD | FedAvg


def protocol_from_dict(data: Mapping) -> Protocol:
    """Rebuild a protocol from :meth:`to_dict` output (e.g. read back from a metadata file)."""
    name = data.get("name") if isinstance(data, Mapping) else None
    if not isinstance(name, str):
        raise ConfigError(f"a saved protocol is a mapping with a 'name' ('fedsgd' or 'fedavg'), got {data!r}")
    cls = PROTOCOLS.lookup(name)
    return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})


__all__ = ["PROTOCOLS", "FedAvg", "FedSGD", "Protocol", "protocol_from_dict"]
