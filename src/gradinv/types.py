"""The core records that flow through gradinv.

``Scenario --observe()--> Observation --Attack.reconstruct()--> Reconstruction --score()--> report``

An :class:`Observation` holds exactly what an honest-but-curious server holds; the private batch lives only
in :class:`GroundTruth`, which attacks never receive (``Attack.reconstruct`` rejects anything that is not an
``Observation``). Every update is keyed by parameter name.
"""

from __future__ import annotations

import copy
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch
from torch import Tensor, nn

from gradinv.errors import ConfigError, ShapeError
from gradinv.protocol import FedSGD, Protocol
from gradinv.registry import DEFENSES


@dataclass(frozen=True)
class Normalization:
    """Per-channel affine normalisation ``(x - mean) / std``."""

    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        mean = tuple(float(m) for m in self.mean)
        std = tuple(float(s) for s in self.std)
        if not mean or len(mean) != len(std):
            raise ConfigError(
                f"normalization needs one mean and one std per channel, got {len(mean)} means and "
                f"{len(std)} stds: pass sequences of equal, non-zero length"
            )
        if any(not s > 0 for s in std):
            raise ConfigError(f"normalization std must be positive, got {std}: use a std > 0 per channel")
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)

    @classmethod
    def identity(cls, channels: int) -> Normalization:
        """Normalisation that leaves ``channels``-channel images unchanged."""
        if channels < 1:
            raise ConfigError(f"channels must be at least 1, got {channels}")
        return cls((0.0,) * channels, (1.0,) * channels)

    @property
    def channels(self) -> int:
        return len(self.mean)

    def _params(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        if x.dim() not in (3, 4) or x.shape[-3] != self.channels:
            raise ShapeError(
                f"normalization expects a (C,H,W) or (B,C,H,W) tensor with C={self.channels}, got shape "
                f"{tuple(x.shape)}: convert the images to {self.channels} channel(s) first"
            )
        if not (x.is_floating_point() or x.is_complex()):
            x = x.to(torch.float32)
        shape = (self.channels, 1, 1) if x.dim() == 3 else (1, self.channels, 1, 1)
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(shape)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(shape)
        return x, mean, std

    def normalize(self, x: Tensor) -> Tensor:
        """Map images in [0, 1] to model input space (differentiable, keeps dtype/device)."""
        x, mean, std = self._params(x)
        return (x - mean) / std

    def denormalize(self, x: Tensor) -> Tensor:
        """Inverse of :meth:`normalize`: map model inputs back to image space."""
        x, mean, std = self._params(x)
        return x * std + mean


#: the points of the client's round where a defense acts, in the order they act (:mod:`gradinv.fl.client`)
STAGES = ("data", "model", "update")


@typing.runtime_checkable
class ClientDefense(typing.Protocol):
    """What every defense is (:class:`gradinv.defenses.Defense`): a registry name, the point of the client's
    round where it acts (``"data"``, ``"model"`` or ``"update"``) and a spec string for saving."""

    name: str
    stage: str

    def spec(self) -> str: ...


def as_defenses(items: Any) -> tuple[ClientDefense, ...]:
    """Defenses as objects: spec strings are parsed (:data:`gradinv.registry.DEFENSES`), objects kept. A bare
    string is refused (it is a sequence of characters, not of specs)."""
    if isinstance(items, str):
        raise ConfigError(f"defenses is a sequence of defenses, got the string {items!r}: write ({items!r},)")
    if isinstance(items, ClientDefense):
        raise ConfigError(f"defenses is a sequence of defenses, got one: write ({items!r},)")
    try:
        items = tuple(items)
    except TypeError:
        raise ConfigError(f"defenses is a sequence of defenses or spec strings, got {items!r}") from None
    parsed = []
    for item in items:
        if isinstance(item, str):
            item = DEFENSES.parse(item)
        elif isinstance(item, type):
            raise ConfigError(f"defenses are instances, got the class {item.__name__}: write {item.__name__}()")
        elif not isinstance(item, ClientDefense) or getattr(item, "stage", None) not in STAGES:
            raise ConfigError(
                f"a defense must be a Defense (gradinv.defenses) or a spec string such as 'prune:0.9', got {item!r} "
                "(an object of your own needs name, stage, spec() and transform())"
            )
        parsed.append(item)
    return tuple(parsed)


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
    #: the per-channel mean and variance of every BatchNorm layer's input on the client's batch (GradAttack's
    #: "BN exact" threat model, Huang et al. 2021: a strong assumption, off by default)
    known_bn_statistics: bool = False
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
    #: BatchNorm layer name -> (mean, variance) per channel of its input on the client's batch
    bn_statistics: Mapping[str, tuple[Tensor, Tensor]] | None = None

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
    protocol: Protocol = field(default_factory=FedSGD)
    knowledge: Knowledge = field(default_factory=Knowledge)
    train_mode: bool = False
    #: the client's defenses, in order, as :class:`~gradinv.defenses.Defense` objects (public protocol metadata:
    #: the server knows what the client runs); spec strings given here are parsed, ``.spec()`` writes them back
    defenses: tuple[ClientDefense, ...] = ()
    #: how many clients' updates the server sees only the weighted mean of (secure aggregation); 1: one client
    clients: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "defenses", as_defenses(self.defenses))

    @property
    def update_kind(self) -> str:
        """``"gradient"`` (FedSGD) or ``"weight_delta"`` (FedAvg)."""
        return self.protocol.update_kind

    @property
    def device(self) -> torch.device:
        """Where the observed update lives (attacks run their tensors there: a GPU when the update is on one)."""
        return next(iter(self.update.values())).device

    def in_precision(self, dtype: torch.dtype) -> Observation:
        """A copy whose model, parameters, buffers, update and BatchNorm statistics hold their floating-point
        values in ``dtype`` (e.g. ``torch.float64`` to refine a reconstruction below float32's resolution)."""

        def cast(t: Tensor) -> Tensor:
            return t.to(dtype) if t.is_floating_point() else t

        stats = self.knowledge.bn_statistics
        return replace(
            self,
            model=copy.deepcopy(self.model).to(dtype),
            parameters={k: cast(v) for k, v in self.parameters.items()},
            buffers={k: cast(v) for k, v in self.buffers.items()},
            update={k: cast(v) for k, v in self.update.items()},
            knowledge=replace(
                self.knowledge,
                bn_statistics=None if stats is None else {k: (cast(m), cast(v)) for k, (m, v) in stats.items()},
            ),
        )

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
    labels: Tensor | None
    #: None for token inputs (a text model's batch: ``inputs`` are token ids, and a language model has no labels)
    normalization: Normalization | None

    @property
    def images(self) -> Tensor:
        """The batch de-normalised to [0, 1]."""
        if self.normalization is None:
            raise TypeError("this batch holds token ids, not images: use .inputs")
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
    "STAGES",
    "ClientDefense",
    "GroundTruth",
    "Knowledge",
    "Normalization",
    "Observation",
    "Reconstruction",
    "ThreatModel",
    "TracePoint",
    "as_defenses",
    "clone_state",
    "named_state",
]
