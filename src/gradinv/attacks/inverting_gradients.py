"""Inverting Gradients (Geiping, Bauermeister, Dröge, Moeller, NeurIPS 2020).

Threat model: honest-but-curious server that knows the input shape, the number of samples and (for the
box constraint) the normalisation; labels come from the threat model or are recovered from the update.
Objective: ``1 - cos(∇θ L(x, y), observed) + α·TV(x)``, minimised with signed Adam, a box constraint to
valid images, step decay at 3/8, 5/8 and 7/8 of the run, and several restarts from random inputs; the
restart with the lowest final matching cost is kept. Restarts run as one batched computation
(``torch.func.vmap``); a single restart runs on plain autograd (see :mod:`gradinv.attacks.components.engine`).
"""

from __future__ import annotations

from dataclasses import dataclass

from gradinv.attacks.base import register_attack
from gradinv.attacks.components.engine import MatchingSettings
from gradinv.attacks.matching import GradientMatchingAttack


@dataclass(frozen=True)
class InvertingGradientsSettings(MatchingSettings):
    """The paper's values (inversefed): lr 0.1, TV 1e-4, cosine objective, signed Adam, box, step decay."""

    iterations: int = 4000
    objective: str = "cosine"
    tv: float = 1e-4
    optimizer: str = "adam"
    lr: float = 0.1
    signed: bool = True
    schedule: str = "step"


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
