"""GradAttack (Huang, Gupta, Song, Li, Arora, NeurIPS 2021, "Evaluating Gradient Inversion Attacks and Defenses in
Federated Learning").

The attack is Inverting Gradients' (cosine matching, total variation, signed Adam, step decay, box) plus the
BatchNorm-statistics prior of Yin et al. 2021 (Eq. 10); the paper's point is how much its success rests on
what the attacker is assumed to know, so the assumption is a setting, ``bn_statistics``:

- ``exact`` ("BN_exact"): the attacker knows every BatchNorm layer's per-channel mean and variance of the
  client's private batch (``ThreatModel(known_bn_statistics=True)``) and pulls the candidate's towards them;
  declined when the threat model does not give them;
- ``infer`` ("BN_infer", the paper's realistic setting): the statistics are not known; as in GradAttack's code
  the attacker replays the client in its own mode, so in a train-mode client every BatchNorm layer normalises
  with the statistics of the candidate itself (inferred from it), and the prior pulls those towards the
  model's running statistics;
- ``running``: the prior of Yin et al. as DeepInversion writes it, the candidate's statistics measured with the
  model in eval mode against the running statistics;
- ``none``: no BatchNorm prior;
- ``auto``: ``exact`` when the threat model gives the statistics, else ``infer``.

Threat model otherwise: an honest-but-curious server that knows the input shape, the number of samples and
(for the box) the normalisation; labels are known or recovered (``label_method``; the paper contrasts both).
Hyper-parameters (GradAttack's CIFAR-10 scripts): Adam lr 0.1 with signed gradients, decay x0.1 at 3/8, 5/8,
7/8 of 10,000 iterations, box constraint; TV 0.1 and BN 0.005 with exact statistics, TV 0.05 and BN 0.001
without (``tv``/``bn`` left at None take these by the resolved mode).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from gradinv._settings import one_of
from gradinv.attacks.base import register_attack
from gradinv.attacks.components.engine import MatchingSettings
from gradinv.attacks.components.priors import Prior, build_priors, combine_priors
from gradinv.attacks.gradinversion import BN_WEIGHT_EXACT, BN_WEIGHT_RUNNING, batchnorm_prior, running_statistics
from gradinv.attacks.matching import GradientMatchingAttack
from gradinv.types import Observation

BN_STATISTICS = ("auto", "exact", "infer", "running", "none")
#: the paper's (tv, bn) weights by what the attacker knows of the BatchNorm statistics (GradAttack's scripts)
PAPER_WEIGHTS = {
    "exact": (0.1, BN_WEIGHT_EXACT),
    "infer": (0.05, BN_WEIGHT_RUNNING),
    "running": (0.05, BN_WEIGHT_RUNNING),
    "none": (0.05, 0.0),
}


@dataclass(frozen=True)
class GradAttackSettings(MatchingSettings):
    """GradAttack's values: cosine matching, signed Adam lr 0.1, step decay, box, 10,000 iterations; ``tv`` and
    ``bn`` None take the paper's weights for the resolved ``bn_statistics`` mode (see :data:`PAPER_WEIGHTS`)."""

    iterations: int = 10_000
    restarts: int = 1
    init: str = "gaussian"
    objective: str = "cosine"
    tv: float | None = None
    bn: float | None = None
    optimizer: str = "adam"
    lr: float = 0.1
    signed: bool = True
    schedule: str = "step"
    boxed: bool = True
    #: what the attacker knows of the client batch's BatchNorm statistics: auto, exact, infer, running, none
    bn_statistics: str = "auto"

    def problems(self) -> list[str]:
        base = dataclasses.replace(self, tv=self.tv or 0.0, bn=self.bn or 0.0)
        return [*MatchingSettings.problems(base), *one_of("bn_statistics", self.bn_statistics, BN_STATISTICS)]


def resolve_bn_statistics(observation: Observation, mode: str) -> str:
    """``auto`` resolved: ``exact`` when the threat model gives the batch's statistics, else ``infer``."""
    if mode != "auto":
        return mode
    return "exact" if observation.knowledge.bn_statistics is not None else "infer"


@register_attack
class GradAttack(GradientMatchingAttack):
    """GradAttack: Inverting Gradients plus a BatchNorm prior whose statistics are exact, inferred or running
    (Huang et al. 2021)."""

    name = "gradattack"
    summary = (
        "GradAttack (Huang et al. 2021): cosine matching + TV + BatchNorm prior, statistics exact (BN_exact), "
        "inferred from the candidate (BN_infer) or running"
    )
    Settings = GradAttackSettings
    table1 = {
        "initialisation": "Gaussian",
        "objective": "cosine distance",
        "optimiser": "signed Adam, step decay, box",
        "priors": "total variation, BatchNorm statistics (exact or inferred)",
    }

    def _unmet_assumptions(self, observation: Observation) -> list[str]:
        reasons = list(super()._unmet_assumptions(observation))
        if self.settings.bn_statistics == "exact" and observation.knowledge.bn_statistics is None:
            reasons.append(
                "bn_statistics='exact' needs the BatchNorm statistics of the client's batch, which the threat model "
                "does not give: set ThreatModel(known_bn_statistics=True) or use bn_statistics='infer'"
            )
        return reasons

    def resolve(self, observation: Observation) -> tuple[str, float, float]:
        """The resolved BatchNorm mode and the (tv, bn) weights used on ``observation``."""
        s = self.settings
        mode = resolve_bn_statistics(observation, s.bn_statistics)
        tv, bn = PAPER_WEIGHTS[mode]
        return mode, tv if s.tv is None else s.tv, (bn if s.bn is None else s.bn) if mode != "none" else 0.0

    def _bn_prior(self, observation: Observation, mode: str) -> Prior | None:
        if mode == "exact":
            return batchnorm_prior(observation, observation.knowledge.bn_statistics or {})
        if mode == "infer":
            return batchnorm_prior(observation, running_statistics(observation))
        if mode == "running":
            return batchnorm_prior(observation, running_statistics(observation), train_mode=False)
        return None

    def _prior(self, observation: Observation, labels: Tensor) -> Prior | None:
        mode, tv, bn = self.resolve(observation)
        others = build_priors(observation, labels, {"tv": tv, "l2": self.settings.l2, "label": self.settings.label})
        return combine_priors((1.0, others), (bn, self._bn_prior(observation, mode) if bn else None))

    def _resolved(self, observation: Observation) -> dict[str, Any]:
        mode, tv, bn = self.resolve(observation)
        return {"bn_statistics": mode, "tv": tv, "bn": bn}


__all__ = ["BN_STATISTICS", "PAPER_WEIGHTS", "GradAttack", "GradAttackSettings", "resolve_bn_statistics"]
