"""The attack interface and registry.

An attack is ``reconstruct(observation) -> Reconstruction``. Before any work, ``applicable(observation)`` lists
every reason the attack cannot run here (knowledge the threat model does not give, the paper's assumptions the
observation breaks); ``reconstruct`` refuses with those reasons. A paper's attack is a settings dataclass (the
paper's hyper-parameters as defaults, their valid ranges in ``problems()``), a short ``_unmet_assumptions``
and a short ``_reconstruct`` returning an :class:`AttackOutput`; the base class times the run and builds the
:class:`~gradinv.types.Reconstruction`.
"""

from __future__ import annotations

import dataclasses
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor

from gradinv._settings import Configurable
from gradinv.attacks.components.backend import convolution_backend
from gradinv.attacks.labels import label_method_problems
from gradinv.errors import AttackError, MissingKnowledgeError
from gradinv.registry import Registry
from gradinv.types import GroundTruth, Observation, Reconstruction, TracePoint

Callback = Callable[[int, float, Tensor], None]


@dataclasses.dataclass(frozen=True)
class LabelSettings:
    """Settings of a closed-form attack whose only choice is where labels come from (see ``labels_for``)."""

    label_method: str = "auto"

    def problems(self) -> list[str]:
        return label_method_problems(self.label_method)


@dataclasses.dataclass(frozen=True, eq=False)
class AttackOutput:
    """What an attack's ``_reconstruct`` computes; :meth:`Attack.reconstruct` adds the bookkeeping (attack
    name, settings, seconds, normalisation) to make the :class:`~gradinv.types.Reconstruction`.

    ``label_source``: where the labels came from (``"knowledge"``, a label method's name, ``"optimised"``);
    ``settings``: values resolved at run time that replace the declared ones in the record (e.g. the layer
    the analytic attack chose when none was named).
    """

    inputs: Tensor
    labels: Tensor | None
    label_source: str | None = None
    trace: tuple[TracePoint, ...] = ()
    extras: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    settings: Mapping[str, Any] = dataclasses.field(default_factory=dict)


class Attack(Configurable, ABC):
    """Base class of every reconstruction attack.

    Subclasses set ``name``, ``summary``, ``Settings`` (a frozen dataclass; its optional ``problems()`` lists
    the values it refuses, checked when the attack is built) and ``requires`` (names of
    :class:`~gradinv.types.Knowledge` fields the attack cannot run without); they implement ``_reconstruct``
    (returning an :class:`AttackOutput`) and, where the paper assumes more than that knowledge,
    ``_unmet_assumptions``.
    """

    name: ClassVar[str]
    summary: ClassVar[str]
    Settings: ClassVar[type]
    requires: ClassVar[tuple[str, ...]] = ()
    #: the paper's row of the survey's Table 1 (Zhang et al. 2022): initialisation, objective, optimiser, priors
    table1: ClassVar[dict[str, str]] = {}
    #: what the attack rebuilds: ``"image"`` inputs or ``"text"`` (token ids of a text model)
    modality: ClassVar[str] = "image"

    def check(self, observation: Observation) -> None:
        """Raise one error naming every piece of knowledge this attack needs and the observation lacks."""
        if isinstance(observation, GroundTruth):
            raise TypeError("attacks receive an Observation, never the GroundTruth")
        if not isinstance(observation, Observation):
            raise TypeError(f"reconstruct() takes an Observation, got {type(observation).__name__}")
        missing = observation.knowledge.missing(self.requires)
        if missing:
            raise MissingKnowledgeError(self._missing_message(missing))

    def _missing_message(self, missing: list[str]) -> str:
        return (
            f"{self.name} needs knowledge the threat model does not give: {', '.join(missing)}; "
            "give it in the scenario's ThreatModel or Knowledge"
        )

    def applicable(self, observation: Observation) -> list[str]:
        """Every reason this attack cannot run on ``observation``; an empty list when it can.

        The reasons are the knowledge it needs and the threat model does not give (then nothing else is
        checked: the other checks need that knowledge), or the paper's assumptions the observation breaks
        (batch size, protocol, architecture, a malicious server's planted layer...). Deciding them runs none
        of the attack. An assumption that only the run itself can test still raises :class:`AttackError`.
        """
        if isinstance(observation, GroundTruth):
            raise TypeError("attacks receive an Observation, never the GroundTruth")
        if not isinstance(observation, Observation):
            raise TypeError(f"applicable() takes an Observation, got {type(observation).__name__}")
        missing = observation.knowledge.missing(self.requires)
        if missing:
            return [self._missing_message(missing)]
        return list(self._unmet_assumptions(observation))

    def _unmet_assumptions(self, observation: Observation) -> list[str]:
        """The attack's own assumptions that ``observation`` breaks, each one line (its knowledge is given)."""
        return []

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
        Raises :class:`MissingKnowledgeError` or :class:`AttackError` with every reason of :meth:`applicable`.
        """
        self.check(observation)
        reasons = self._unmet_assumptions(observation)
        if reasons:
            raise AttackError(f"{self.name} does not apply here: {'; '.join(reasons)}")
        generator = torch.Generator().manual_seed(seed)
        start = time.perf_counter()
        with convolution_backend(observation):
            out = self._reconstruct(observation, generator=generator, progress=progress, callback=callback)
        seconds = time.perf_counter() - start
        return Reconstruction(
            inputs=out.inputs,
            labels=out.labels,
            attack=self.name,
            settings={**self.settings_dict(), **out.settings, "label_source": out.label_source},
            seconds=seconds,
            normalization=observation.knowledge.normalization,
            trace=tuple(out.trace),
            extras=dict(out.extras),
        )

    @abstractmethod
    def _reconstruct(
        self,
        observation: Observation,
        *,
        generator: torch.Generator,
        progress: bool,
        callback: Callback | None,
    ) -> AttackOutput:
        """The attack itself, on an observation :meth:`applicable` accepts. Trace times and callback times
        are measured from the start of this call."""


ATTACKS = Registry("attack")
#: class decorator adding an attack to :data:`ATTACKS` under its ``name``
register_attack = ATTACKS.register


def build_attack(name: str, **settings: Any) -> Attack:
    """An attack by registry name with its settings overridden by keyword."""
    return ATTACKS.build(name, **settings)
