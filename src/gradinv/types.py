"""The core records that flow through gradinv.

``Scenario --observe()--> Observation --Attack.reconstruct()--> Reconstruction --score()--> report``

An :class:`Observation` holds exactly what an honest-but-curious server holds; the private batch lives only
in :class:`GroundTruth`, which attacks never receive (``Attack.reconstruct`` rejects anything that is not an
``Observation``). Every update is keyed by parameter name.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from gradinv.data.dataset import Normalization

if TYPE_CHECKING:
    from gradinv.fl.protocols import Protocol


def _fedsgd() -> Protocol:
    from gradinv.fl.protocols import FedSGD

    return FedSGD()


@dataclass(frozen=True)
class ThreatModel:
    """What the attacker is assumed to know beyond the model and the update, and whether the server is honest
    (the threat model).

    The defaults are the common honest-but-curious setting of the field (Geiping et al. 2020): the server
    knows the input shape, the number of samples and the normalisation, but not the labels, and sends the
    model unchanged.
    """

    known_labels: bool = False
    known_num_samples: bool = True
    known_input_shape: bool = True
    known_normalization: bool = True
    #: ``None``: an honest server sends the model as it is. A malicious server sends a modified model: any
    #: object with ``modify(model) -> nn.Module`` (see :mod:`gradinv.fl.malicious`).
    server: Any = None


@dataclass(frozen=True, eq=False)
class Knowledge:
    """What the attacker knows besides the model and the update; ``None`` means unknown."""

    input_shape: tuple[int, ...] | None = None
    num_samples: int | None = None
    labels: Tensor | None = None
    normalization: Normalization | None = None

    def missing(self, required: Sequence[str]) -> list[str]:
        """Names in ``required`` that this record does not provide."""
        known = {f.name for f in fields(self)}
        unknown = [name for name in required if name not in known]
        if unknown:
            raise ValueError(f"not knowledge fields: {unknown}; known fields are {sorted(known)}")
        return [name for name in required if getattr(self, name) is None]


@dataclass(frozen=True, eq=False)
class Observation:
    """What the server holds after one round: the model as sent, the client's update, public metadata.

    ``model`` is the server's own copy; attacks evaluate it functionally through ``parameters`` and
    ``buffers`` and never change it.
    """

    model: nn.Module
    parameters: Mapping[str, Tensor]
    buffers: Mapping[str, Tensor]
    update: Mapping[str, Tensor]
    protocol: Protocol = field(default_factory=_fedsgd)
    knowledge: Knowledge = field(default_factory=Knowledge)
    train_mode: bool = False
    #: the client's defenses, as spec strings (public protocol metadata: the server knows what the client runs)
    defenses: tuple[str, ...] = ()
    #: how many clients' updates the server sees only the weighted mean of (secure aggregation); 1: one client
    clients: int = 1

    @property
    def update_kind(self) -> str:
        """``"gradient"`` (FedSGD) or ``"weight_delta"`` (FedAvg)."""
        return self.protocol.update_kind

    @property
    def device(self) -> torch.device:
        """Where the observed update lives (attacks run their tensors there: a GPU when the update is on one)."""
        return next(iter(self.update.values())).device

    def with_knowledge(self, **changes: Any) -> Observation:
        """A copy whose knowledge has ``changes`` applied (e.g. labels recovered by a label attack)."""
        values = {f.name: getattr(self.knowledge, f.name) for f in fields(self.knowledge)}
        values.update(changes)
        return Observation(
            model=self.model,
            parameters=self.parameters,
            buffers=self.buffers,
            update=self.update,
            protocol=self.protocol,
            knowledge=Knowledge(**values),
            train_mode=self.train_mode,
            defenses=self.defenses,
            clients=self.clients,
        )


@dataclass(frozen=True, eq=False)
class GroundTruth:
    """The client's private batch (normalised inputs and labels): for evaluation only."""

    inputs: Tensor
    labels: Tensor
    normalization: Normalization

    @property
    def images(self) -> Tensor:
        """The batch de-normalised to [0, 1]."""
        return self.normalization.denormalize(self.inputs).clamp(0, 1)


@dataclass(frozen=True)
class TracePoint:
    """One logged point of an attack's run."""

    iteration: int
    seconds: float
    cost: float


@dataclass(frozen=True, eq=False)
class Reconstruction:
    """An attack's result: the recovered inputs (normalised space), labels and how it got there."""

    inputs: Tensor
    labels: Tensor | None
    attack: str
    settings: Mapping[str, Any]
    seconds: float
    normalization: Normalization | None = None
    trace: tuple[TracePoint, ...] = ()
    extras: Mapping[str, Any] = field(default_factory=dict)

    @property
    def images(self) -> Tensor:
        """The reconstruction de-normalised and clamped to [0, 1]."""
        x = self.inputs.detach()
        if self.normalization is not None:
            x = self.normalization.denormalize(x)
        return x.clamp(0, 1)


def clone_state(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Detached copies of named tensors (what the server stores, safe from later in-place changes)."""
    return {name: t.detach().clone() for name, t in tensors.items()}


def named_state(model: nn.Module) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Detached copies of a model's parameters and buffers, keyed by name."""
    return clone_state(dict(model.named_parameters())), clone_state(dict(model.named_buffers()))


__all__ = [
    "GroundTruth",
    "Knowledge",
    "Observation",
    "Reconstruction",
    "ThreatModel",
    "TracePoint",
    "clone_state",
    "named_state",
]
