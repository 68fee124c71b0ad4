"""The attack interface and registry.

An attack is ``reconstruct(observation) -> Reconstruction``. It declares the knowledge it needs; a check
lists everything missing in one error before any work starts. A paper's attack is a settings dataclass (the
paper's hyper-parameters as defaults) plus a short ``_reconstruct``.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import Tensor

from gradinv._settings import Configurable
from gradinv.errors import MissingKnowledgeError
from gradinv.registry import Registry
from gradinv.types import GroundTruth, Observation, Reconstruction

Callback = Callable[[int, float, Tensor], None]


@dataclasses.dataclass(frozen=True)
class LabelSettings:
    """Settings of a closed-form attack whose only choice is where labels come from (see ``labels_for``)."""

    label_method: str = "auto"


class Attack(Configurable, ABC):
    """Base class of every reconstruction attack.

    Subclasses set ``name``, ``summary``, ``Settings`` (a dataclass) and ``requires`` (names of
    :class:`~gradinv.types.Knowledge` fields the attack cannot run without), and implement ``_reconstruct``.
    """

    name: ClassVar[str]
    summary: ClassVar[str]
    Settings: ClassVar[type]
    requires: ClassVar[tuple[str, ...]] = ()

    def check(self, observation: Observation) -> None:
        """Raise one error naming every piece of knowledge this attack needs and the observation lacks."""
        if isinstance(observation, GroundTruth):
            raise TypeError("attacks receive an Observation, never the GroundTruth")
        if not isinstance(observation, Observation):
            raise TypeError(f"reconstruct() takes an Observation, got {type(observation).__name__}")
        missing = observation.knowledge.missing(self.requires)
        if missing:
            raise MissingKnowledgeError(
                f"{self.name} needs knowledge the threat model does not give: {', '.join(missing)}; "
                "give it in the scenario's ThreatModel or Knowledge"
            )

    def reconstruct(
        self,
        observation: Observation,
        *,
        seed: int = 0,
        progress: bool = False,
        callback: Callback | None = None,
    ) -> Reconstruction:
        """Reconstruct the client's data from ``observation``.

        ``seed`` fixes every random choice; ``callback(iteration, seconds, inputs)`` is called at logged
        iterations with the current best candidate (normalised), e.g. to draw time-to-PSNR curves.
        """
        self.check(observation)
        generator = torch.Generator().manual_seed(seed)
        return self._reconstruct(observation, generator=generator, progress=progress, callback=callback)

    @abstractmethod
    def _reconstruct(
        self,
        observation: Observation,
        *,
        generator: torch.Generator,
        progress: bool,
        callback: Callback | None,
    ) -> Reconstruction: ...


ATTACKS = Registry("attack")
#: class decorator adding an attack to :data:`ATTACKS` under its ``name``
register_attack = ATTACKS.register


def build_attack(name: str, **settings: Any) -> Attack:
    """An attack by registry name with its settings overridden by keyword."""
    return ATTACKS.build(name, **settings)
