"""The defense interface and registry.

A defense acts at a named point of the client's round: ``"data"`` defenses transform the private batch before
training (MixUp, InstaHide, pixelisation); ``"model"`` defenses change how the client's model computes
(dropout before the classifier); ``"update"`` defenses transform what the client shares (noise,
DP-SGD, pruning, sign compression, Soteria). Their maths lives in :mod:`gradinv.defenses.functional`; a class
is a paper's settings plus the call into those functions. Specs such as ``"prune:0.9"`` or
``"noise:std=0.01,clip=1"`` build one by name (:func:`parse_defense`), as the CLI's ``--defense`` does.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import ClassVar

import torch
from torch import Tensor, nn

from gradinv._settings import Configurable
from gradinv.errors import ConfigError
from gradinv.fl.client import ClientBatch, ClientState, Stage
from gradinv.registry import DEFENSES


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
        return DEFENSES.spec(self)


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


#: bytes of one entry of an uncompressed update: float32, as federated frameworks send parameters
FLOAT32_BYTES = 4


def payload_bytes(update: Mapping[str, Tensor]) -> int:
    """Bytes of ``update`` sent uncompressed: every entry as a float32."""
    return FLOAT32_BYTES * sum(int(v.numel()) for v in update.values())


class UpdateDefense(Defense):
    """A defense on the update the client shares."""

    stage: ClassVar[Stage] = "update"

    @abstractmethod
    def transform(
        self, update: Mapping[str, Tensor], *, client: ClientState, generator: torch.Generator
    ) -> dict[str, Tensor]: ...

    def bytes_sent(self, update: Mapping[str, Tensor]) -> int:
        """Bytes the client sends for an update shaped like ``update`` after this defense: every entry as a
        float32 (:func:`payload_bytes`) unless the defense encodes it in fewer (compression overrides this)."""
        return payload_bytes(update)


def check_setting(ok: bool, message: str) -> None:
    """Raise :class:`ConfigError` with ``message`` unless ``ok`` (settings dataclasses validate with this)."""
    if not ok:
        raise ConfigError(message)


#: class decorator adding a defense to :data:`DEFENSES` (:mod:`gradinv.registry`) under its ``name``
register_defense = DEFENSES.register
#: a defense by registry name with its settings overridden by keyword
build_defense = DEFENSES.build
#: a defense from ``NAME``, ``NAME:VALUE`` (its ``primary`` setting) or ``NAME:KEY=VALUE,KEY=VALUE``
parse_defense = DEFENSES.parse


def as_defense(item: Defense | str) -> Defense:
    """A :class:`Defense` as it is, or one built from a spec string."""
    if isinstance(item, Defense):
        return item
    if isinstance(item, str):
        return parse_defense(item)
    raise ConfigError(f"a defense must be a Defense or a spec string like 'prune:0.9', got {item!r}")


__all__ = [
    "DEFENSES",
    "FLOAT32_BYTES",
    "ClientBatch",
    "ClientState",
    "DataDefense",
    "Defense",
    "ModelDefense",
    "Stage",
    "UpdateDefense",
    "as_defense",
    "build_defense",
    "check_setting",
    "parse_defense",
    "payload_bytes",
    "register_defense",
]
