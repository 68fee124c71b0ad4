"""The defense interface and registry.

A defense acts at a named point of the client's round: ``"data"`` defenses transform the private batch before
training (MixUp, InstaHide, pixelisation); ``"model"`` defenses change how the client's model computes
(dropout before the classifier); ``"update"`` defenses transform what the client shares (noise,
DP-SGD, pruning, sign compression, Soteria). Their maths lives in :mod:`gradinv.defenses.functional`; a class
is a paper's settings plus the call into those functions. Specs such as ``"prune:0.9"`` or
``"noise:std=0.01,clip=1"`` build one by name (:func:`parse_defense`), as the CLI's ``--defense`` does.
"""

from __future__ import annotations

import dataclasses
import typing
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from gradinv._settings import Configurable
from gradinv.data.dataset import Normalization
from gradinv.errors import ConfigError
from gradinv.fl.protocols import LossFn, Protocol
from gradinv.registry import Registry

Stage = Literal["data", "model", "update"]


@dataclasses.dataclass(frozen=True, eq=False)
class ClientBatch:
    """The client's batch as it trains: normalised ``inputs``, ``targets`` (class indices (B,) or soft labels
    (B, K)), the data's normalisation and the number of classes."""

    inputs: Tensor
    targets: Tensor
    normalization: Normalization
    num_classes: int | None

    def soft_targets(self) -> Tensor:
        """The targets as probabilities (B, K)."""
        if self.targets.is_floating_point():
            return self.targets
        if self.num_classes is None:
            raise ConfigError("mixing labels needs the number of classes: the model has no linear classifier")
        return torch.nn.functional.one_hot(self.targets, self.num_classes).to(self.inputs.dtype)


@dataclasses.dataclass(frozen=True, eq=False)
class ClientState:
    """What the client holds when it defends its update: the model (a stateless twin), its parameters and
    buffers, the batch it trained on (after any data defense), the loss and the protocol."""

    model: nn.Module
    params: Mapping[str, Tensor]
    buffers: Mapping[str, Tensor]
    batch: ClientBatch
    loss_fn: LossFn
    protocol: Protocol
    train_mode: bool


class Defense(Configurable, ABC):
    """Base class of every defense. Subclasses set ``name``, ``summary``, ``stage``, ``Settings`` and
    ``primary`` (the setting a bare ``NAME:VALUE`` spec sets)."""

    name: ClassVar[str]
    summary: ClassVar[str]
    stage: ClassVar[Stage]
    Settings: ClassVar[type]
    primary: ClassVar[str | None] = None
    #: an update defense that recomputes the client's training (DP-SGD) instead of transforming its update:
    #: it must come before every other update defense
    retrains: ClassVar[bool] = False
    #: an update defense that zeroes entries of the update: the server sees which, so an adaptive attack
    #: matches only the entries that were sent
    sparsifies: ClassVar[bool] = False

    def spec(self) -> str:
        """This defense as a spec string that :func:`parse_defense` turns back into it."""
        values = self.settings_dict()
        if not values:
            return self.name
        return f"{self.name}:" + ",".join(f"{k}={v}" for k, v in values.items())


class DataDefense(Defense):
    """A defense on the private batch, before the client trains on it."""

    stage: ClassVar[Stage] = "data"

    @abstractmethod
    def transform(self, batch: ClientBatch, *, generator: torch.Generator) -> ClientBatch: ...


class ModelDefense(Defense):
    """A defense on the client's own computation: it returns the model the client trains with (a copy)."""

    stage: ClassVar[Stage] = "model"

    @abstractmethod
    def transform(self, model: nn.Module, *, generator: torch.Generator) -> nn.Module: ...


class UpdateDefense(Defense):
    """A defense on the update the client shares."""

    stage: ClassVar[Stage] = "update"

    @abstractmethod
    def transform(
        self, update: Mapping[str, Tensor], *, client: ClientState, generator: torch.Generator
    ) -> dict[str, Tensor]: ...


def check_setting(ok: bool, message: str) -> None:
    """Raise :class:`ConfigError` with ``message`` unless ``ok`` (settings dataclasses validate with this)."""
    if not ok:
        raise ConfigError(message)


DEFENSES = Registry("defense")
#: class decorator adding a defense to :data:`DEFENSES` under its ``name``
register_defense = DEFENSES.register


def build_defense(name: str, **settings: Any) -> Defense:
    """A defense by registry name with its settings overridden by keyword."""
    return DEFENSES.build(name, **settings)


def _parse_value(kind: Any, raw: str, *, owner: str, key: str) -> Any:
    """A spec's text value as the setting's type (int, float, bool, str, or an optional of one)."""
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    if args:  # Optional[X]
        if raw.lower() in ("none", ""):
            return None
        kind = args[0]
    try:
        if kind is bool:
            if raw.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(raw)
            return raw.lower() in ("true", "1", "yes")
        if kind in (int, float):
            return kind(raw)
    except ValueError:
        raise ConfigError(f"{owner} setting {key!r} must be {kind.__name__}, got {raw!r}") from None
    return raw


def parse_defense(spec: str) -> Defense:
    """A defense from ``NAME``, ``NAME:VALUE`` (its main setting) or ``NAME:KEY=VALUE,KEY=VALUE``."""
    name, _, rest = spec.strip().partition(":")
    cls = DEFENSES.lookup(name)
    hints = typing.get_type_hints(cls.Settings)
    values: dict[str, Any] = {}
    for part in [p for p in rest.split(",") if p.strip()] if rest else []:
        key, eq, raw = part.partition("=")
        if not eq:
            if cls.primary is None or values:
                raise ConfigError(f"defense spec {spec!r}: write KEY=VALUE (settings: {', '.join(hints)})")
            key, raw = cls.primary, part
        key = key.strip()
        if key not in hints:
            raise ConfigError(f"{name} has no setting {key!r}; its settings are {', '.join(hints)}")
        values[key] = _parse_value(hints[key], raw.strip(), owner=name, key=key)
    return cls(**values)


def as_defense(item: Defense | str) -> Defense:
    """A :class:`Defense` as it is, or one built from a spec string."""
    if isinstance(item, Defense):
        return item
    if isinstance(item, str):
        return parse_defense(item)
    raise ConfigError(f"a defense must be a Defense or a spec string like 'prune:0.9', got {item!r}")
