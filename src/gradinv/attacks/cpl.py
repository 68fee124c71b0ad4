"""CPL, the client privacy leakage attack (Wei, Liu, Loper, Chow, Gursoy, Truex, Wu, ESORICS 2020, "A Framework
for Evaluating Gradient Leakage Attacks in Federated Learning").

Threat model: an honest-but-curious server that knows the input shape, the number of samples and the
normalisation (the seed is drawn in image space). The label is read from the update first (iDLG's sign rule
at batch 1, ``label_method``), then the input alone is optimised with L-BFGS (restarts one after another) to
match the observed update in squared Euclidean distance, plus a label-based regulariser that keeps the
model's prediction on the candidate on the recovered label.

Two parts set CPL apart from DLG:

- the *patterned random seed*: one random patch per channel, tiled over the image. The authors' notebooks
  (github.com/git-disl/CPL_attack, ``CPL/LFW_enhanced_random_ASR.ipynb``) draw a 16x16 patch for 32x32 images
  and repeat it 2x2 (4x4 and 8x8 patches are left there commented out), so the default here is the patch that
  tiles the image ``pattern_tiles = 2`` times per side, whatever its size (``init_scale`` gives the side in
  pixels instead);
- the label-based regulariser ``label * ||y - F(x)||^2``: the squared distance between the recovered one-hot
  label and the model's prediction (soft-max probabilities) on the candidate, batch mean. The notebooks add
  the squared distance between the candidate's logits and the true image's logits with weight 1, which an
  attacker does not have; the one-hot recovered label is what it has. ``label_form="cross_entropy"`` uses the
  engine's cross-entropy form instead.

Defaults: 300 L-BFGS steps of up to 20 inner iterations (torch's defaults, lr 1), as the notebooks run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import functional_call

from gradinv._settings import at_least, one_of
from gradinv.attacks.base import register_attack
from gradinv.attacks.components.engine import MatchingSettings
from gradinv.attacks.components.inits import INITS
from gradinv.attacks.components.priors import Prior, build_priors, label_prior
from gradinv.attacks.components.replay import box_bounds
from gradinv.attacks.matching import GradientMatchingAttack
from gradinv.fl.functional import stateless_twin
from gradinv.types import Observation

LABEL_FORMS = ("l2", "cross_entropy")


@dataclass(frozen=True)
class CPLSettings(MatchingSettings):
    """CPL's parts: patterned seed, Euclidean matching, label regulariser, L-BFGS (the authors' notebooks).

    ``pattern_tiles``: how many times the random patch repeats along each side (2: a half-size patch, as the
    notebooks); used when ``init_scale`` (the patch side in pixels) is None. ``label``: weight of the
    label-based regulariser; ``label_form``: ``l2`` (squared distance of the prediction to the one-hot label)
    or ``cross_entropy``.
    """

    iterations: int = 300
    init: str = "pattern"
    pattern_tiles: int = 2
    objective: str = "euclidean"
    label: float = 1.0
    label_form: str = "l2"
    optimizer: str = "lbfgs"
    lr: float = 1.0
    schedule: str = "none"
    inner_iterations: int = 20
    history_size: int = 100
    log_every: int = 10

    def problems(self) -> list[str]:
        return [
            *super().problems(),
            *at_least("pattern_tiles", self.pattern_tiles, 1),
            *one_of("label_form", self.label_form, LABEL_FORMS),
        ]


def prediction_l2(observation: Observation, labels: Tensor) -> Prior:
    """``mean_i ||onehot(y_i) - softmax(F(x_i))||^2``: CPL's label-based regulariser on one restart's candidate
    (pure, ``vmap``-able). Soft labels (B, K) are used as they are."""
    twin = stateless_twin(observation.model, train_mode=False)
    state = (
        {k: v.detach() for k, v in observation.parameters.items()},
        {k: v.detach() for k, v in observation.buffers.items()},
    )

    def prior(x: Tensor) -> Tensor:
        probs = torch.softmax(functional_call(twin, state, (x,)), dim=-1)
        target = labels if labels.is_floating_point() else F.one_hot(labels, probs.shape[-1]).to(probs.dtype)
        return (probs - target).pow(2).sum(-1).mean()

    return prior


@register_attack
class CPL(GradientMatchingAttack):
    name = "cpl"
    summary = "CPL (Wei et al. 2020): patterned seed, iDLG label, Euclidean + label regulariser, L-BFGS"
    Settings = CPLSettings
    table1 = {
        "initialisation": "patterned random (a random patch tiled over the image)",
        "objective": "Euclidean distance",
        "optimiser": "L-BFGS",
        "priors": "label-based regulariser (prediction vs recovered label)",
    }

    def _initial(self, observation: Observation, shape: tuple[int, ...], generator: torch.Generator) -> Tensor:
        s = self.settings
        if s.init != "pattern":
            return super()._initial(observation, shape, generator)
        side = s.init_scale if s.init_scale is not None else math.ceil(max(shape[-2:]) / s.pattern_tiles)
        bounds = box_bounds(observation, shape)
        return INITS["pattern"](
            shape, generator=generator, bounds=None if bounds is None else tuple(b.cpu() for b in bounds), scale=side
        )

    def _prior(self, observation: Observation, labels: Tensor) -> Prior | None:
        s = self.settings
        parts: list[Prior] = []
        others = build_priors(observation, labels, {"tv": s.tv, "l2": s.l2, "bn": s.bn})
        if others is not None:
            parts.append(others)
        if s.label:
            term = prediction_l2(observation, labels) if s.label_form == "l2" else label_prior(observation, labels)
            weight = s.label
            parts.append(lambda x: weight * term(x))
        if not parts:
            return None
        if len(parts) == 1:
            return parts[0]
        return lambda x: sum(p(x) for p in parts)
