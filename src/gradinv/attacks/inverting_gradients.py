"""Inverting Gradients (Geiping, Bauermeister, Dröge, Moeller, NeurIPS 2020).

Threat model: honest-but-curious server that knows the input shape, the number of samples and (for the
box constraint) the normalisation; labels come from the threat model or are recovered from the update.
Objective: ``1 - cos(∇θ L(x, y), observed) + α·TV(x)`` (α the paper's 1e-4, or per architecture:
:func:`default_tv`), minimised with signed Adam, a box constraint to
valid images, step decay at 3/8, 5/8 and 7/8 of the run, and several restarts from random inputs; the
restart with the lowest final matching cost is kept. Restarts run as one batched computation
(``torch.func.vmap``); a single restart runs on plain autograd (see :mod:`gradinv.attacks.components.engine`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from gradinv.attacks.base import register_attack
from gradinv.attacks.components.engine import MatchingSettings
from gradinv.attacks.components.priors import Prior, build_priors
from gradinv.attacks.matching import GradientMatchingAttack
from gradinv.models import ResNet
from gradinv.types import Observation

#: the paper's TV weight (inversefed's default for 32 px images)
PAPER_TV = 1e-4
#: TV weights by architecture where another one reconstructs better, chosen on photos that no published case or
#: peer comparison scores (``bench/tv_sweep.py``; ``bench/results/tv_sweep_resnet18.md``: ResNet-18 18.3 dB at
#: 1e-2 vs 12.9 at 1e-4; ``tv_sweep_convnet.md``: ConvNet-64 22.3 dB at 1e-4 vs 18.2 at 1e-2): a deep network with
#: strided downsampling passes less of an image's fine structure into its gradient and needs a stronger prior
TV_BY_ARCHITECTURE: dict[type[nn.Module], float] = {ResNet: 1e-2}


def default_tv(model: nn.Module) -> float:
    """The TV weight for ``model``: :data:`TV_BY_ARCHITECTURE`'s for its class, else the paper's 1e-4."""
    for kind, weight in TV_BY_ARCHITECTURE.items():
        if isinstance(model, kind):
            return weight
    return PAPER_TV


@dataclass(frozen=True)
class InvertingGradientsSettings(MatchingSettings):
    """The paper's values (inversefed): lr 0.1, cosine objective, signed Adam, box, step decay; ``tv``: the TV
    weight, None for :func:`default_tv` (the paper's 1e-4, 1e-2 on ResNets)."""

    iterations: int = 4000
    objective: str = "cosine"
    tv: float | None = None
    optimizer: str = "adam"
    lr: float = 0.1
    signed: bool = True
    schedule: str = "step"

    def problems(self) -> list[str]:
        return MatchingSettings.problems(dataclasses.replace(self, tv=0.0 if self.tv is None else self.tv))


@register_attack
class InvertingGradients(GradientMatchingAttack):
    name = "invgrad"
    summary = "Inverting Gradients (Geiping et al. 2020): cosine matching + TV, signed Adam, batched restarts"
    Settings = InvertingGradientsSettings
    table1 = {
        "initialisation": "Gaussian",
        "objective": "cosine distance",
        "optimiser": "signed Adam, step decay, box",
        "priors": "total variation",
    }

    def tv_for(self, observation: Observation) -> float:
        """The TV weight used on ``observation``: the setting, or :func:`default_tv` of the model."""
        return default_tv(observation.model) if self.settings.tv is None else float(self.settings.tv)

    def _prior(self, observation: Observation, labels: Tensor) -> Prior | None:
        s = self.settings
        weights = {"tv": self.tv_for(observation), "l2": s.l2, "bn": s.bn, "label": s.label}
        return build_priors(observation, labels, weights)

    def _resolved(self, observation: Observation) -> dict[str, Any]:
        return {"tv": self.tv_for(observation)}
