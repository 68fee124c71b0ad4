"""SAPAG, a self-adaptive privacy attack from gradients (Wang, Deng, Guo, Wang, Meng, Liu, Ding, Rajasekaran,
arXiv 2009.06228, 2020).

Threat model: an honest-but-curious server that knows the input shape, the number of samples and the
normalisation (the constant start is a grey image); labels come from the threat model or are recovered from
the update (``label_method``).

SAPAG replaces the Euclidean or cosine distance by a Gaussian-kernel distance summed over the layers,
``sum_l w_l (1 - exp(-||g_l(x) - t_l||^2 / sigma_l))``, whose width adapts to each layer of the observed update
(its variance), so that layers whose gradients differ in scale by orders of magnitude (other weight
initialisations, later training phases) all count; each term lies in [0, 1). Here ``sigma_l = kernel_width *
numel_l * Var(t_l)``: the per-entry variance of the observed layer times its size, i.e. the expected squared
distance to the update of an unrelated input of the same scale, so an unrelated start sits on the kernel's
slope rather than on its flat tail (:func:`~gradinv.attacks.components.objectives.gaussian_kernel`). A "layer"
is one parameter tensor (weight and bias apart), as gradient lists are in the DLG-style code SAPAG builds on.
The dummy data start from a constant image and are optimised with Adam.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from gradinv._settings import above
from gradinv.attacks.base import register_attack
from gradinv.attacks.components.engine import MatchingSettings
from gradinv.attacks.components.objectives import Objective, gaussian_kernel
from gradinv.attacks.matching import GradientMatchingAttack
from gradinv.types import Observation


@dataclass(frozen=True)
class SAPAGSettings(MatchingSettings):
    """SAPAG's parts: constant start (0.5 grey in image space), Gaussian-kernel distance with per-layer adaptive
    width (``kernel_width`` scales every ``sigma_l``), equal layer weights, Adam with step decay, box."""

    iterations: int = 2000
    init: str = "constant"
    objective: str = "gaussian_kernel"
    kernel_width: float = 1.0
    layer_weights: str = "equal"
    optimizer: str = "adam"
    lr: float = 0.1
    schedule: str = "step"

    def problems(self) -> list[str]:
        return [*super().problems(), *above("kernel_width", self.kernel_width, 0)]


@register_attack
class SAPAG(GradientMatchingAttack):
    name = "sapag"
    summary = "SAPAG (Wang et al. 2020): constant start, Gaussian-kernel distance with per-layer width, Adam"
    Settings = SAPAGSettings
    table1 = {
        "initialisation": "constant",
        "objective": "Gaussian-kernel distance, per-layer adaptive width",
        "optimiser": "Adam",
        "priors": "none",
    }

    def _objective(self, observation: Observation) -> Objective:
        s = self.settings
        if s.objective != "gaussian_kernel":
            return super()._objective(observation)
        return functools.partial(gaussian_kernel, width=s.kernel_width)
