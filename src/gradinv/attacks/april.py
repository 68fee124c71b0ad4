"""APRIL: Attention PRIvacy Leakage (Lu, Zhang, Zhao, He, Cheng, "APRIL: Finding the Achilles' Heel on Privacy for
Vision Transformers", CVPR 2022).

APRIL's observation: a vision transformer adds a *learnable* position embedding to its token embeddings,
``z = [cls; W p_i + b] + pos``, so the gradient of the position embedding is the gradient of the encoder's input,
row by row: ``dL/dpos_i = dL/dz_i`` (batch 1). The paper feeds these rows into the first attention layer's
weight gradients, which in its architecture (A) (``z`` is the attention's direct input) gives a linear system in
``z``, and then inverts the patch embedding's forward map.

``april`` (closed form) reads the same rows one layer earlier, which holds in every ViT where the position
embedding is added to the patch embedding's output (the paper's architecture (B) too, pre-LayerNorm and residual
blocks included): the patch embedding's weight gradient is ``G_W = sum_i a_i p_i^T`` over the patch rows
``a_i = dL/dz_i`` and patches ``p_i``, i.e. ``A^T P = G_W`` with ``A`` (N x D) the position gradient's patch rows
and ``P`` (N x C*p*p) the patches. The patches are its least-squares solution (SVD pseudo-inverse, float64),
unique when ``A`` has rank N, then folded back into the image. In a pre-LayerNorm ViT the patch tokens reach the
loss only through LayerNorms (the head reads the class token), whose input gradients are orthogonal to the
all-ones vector, so ``rank A <= D - 1``: the patches are determined when N + 1 <= D (64 patches of a 32x32 image
at width 192), and a model with more patches gives the minimum-norm solution (``extras["full_rank"]`` False).
The bias gradient, ``sum_i a_i``, checks that the position embedding sits right after the patch embedding
(``extras["bias_residual"]``).

``april-opt``: the paper's optimisation variant for any architecture: gradient matching plus its attention
privacy term, ``L = L_grad + alpha * (1 - cos(dL/dpos', dL/dpos))``, the cosine distance between the candidate's and
the observed position-embedding gradients (the paper's ``L_A``, a negative cosine similarity, written here shifted
to be >= 0), run on gradinv's engine (:class:`AprilOptSettings` says which ``L_grad`` and optimiser by default).

Threat model: honest-but-curious server, FedSGD gradient of one sample (the closed form), known input shape;
the normalisation only de-normalises the result; labels (for the record, and for ``april-opt``'s replay) come
from the threat model or iDLG.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from gradinv._settings import above, at_least
from gradinv.attacks.base import Attack, AttackOutput, Callback, LabelSettings, register_attack
from gradinv.attacks.components.engine import MatchingSettings
from gradinv.attacks.components.objectives import OBJECTIVES, Distance, Objective
from gradinv.attacks.labels import label_declines, labels_for
from gradinv.attacks.matching import GradientMatchingAttack
from gradinv.errors import GradinvError
from gradinv.fl.protocols import FedSGD
from gradinv.models.vit import find_position_embedding, unpatchify, vit_spec
from gradinv.types import Observation

RCOND = 1e-7  # singular values of the patch rows' gradients below this fraction of the largest count as zero


@dataclass(frozen=True)
class PatchSolution:
    """The patches solving ``A^T P = G_W`` and how well determined they are.

    ``patches`` (N, C*p*p) float64; ``rank`` of the patch rows' gradients ``A`` (N x D) and its ``singular_values``;
    ``full_rank``: rank N (unique patches); ``gradient_residual``: ``|A^T P - G_W| / |G_W|``.
    """

    patches: Tensor
    rank: int
    singular_values: Tensor
    gradient_residual: float

    @property
    def full_rank(self) -> bool:
        return self.rank == self.patches.shape[0]

    @property
    def condition(self) -> float:
        s = self.singular_values
        return float(s.max() / s.min()) if float(s.min()) > 0 else float("inf")


def solve_patches(row_gradients: Tensor, weight_gradient: Tensor, *, rcond: float = RCOND) -> PatchSolution:
    """The minimum-norm least-squares ``P`` of ``A^T P = G_W`` (float64) for ``A = row_gradients`` (N, D), the
    loss gradients of the N patch tokens, and ``G_W = weight_gradient`` (D, K), the patch embedding's weight
    gradient; singular values of ``A`` below ``rcond`` times the largest are dropped (the pseudo-inverse)."""
    a, g = row_gradients.double(), weight_gradient.double().reshape(row_gradients.shape[1], -1)
    u, s, vh = torch.linalg.svd(a.T, full_matrices=False)  # A^T = U S V^T: (D, N) = (D, r)(r)(r, N)
    keep = s > rcond * s.max() if s.numel() and float(s.max()) > 0 else torch.zeros_like(s, dtype=torch.bool)
    inverse = torch.where(keep, 1.0 / torch.where(keep, s, torch.ones_like(s)), torch.zeros_like(s))
    patches = vh.T @ (inverse[:, None] * (u.T @ g))
    residual = float((a.T @ patches - g).norm() / g.norm().clamp_min(1e-300))
    return PatchSolution(patches=patches, rank=int(keep.sum()), singular_values=s, gradient_residual=residual)


def spec_declines(observation: Observation, attack: str) -> list[str]:
    """Why ``attack`` cannot read the model's :class:`~gradinv.models.vit.ViTSpec` from ``observation`` (patch
    and position embeddings, their gradients); an empty list when it can."""
    shape = tuple(observation.knowledge.input_shape)
    if len(shape) != 3:
        return [f"{attack} inverts images (C, H, W); the input shape is {shape}"]
    try:
        spec = vit_spec(observation.model, shape)
    except GradinvError as err:
        return [f"{attack} needs a vision transformer with a learnable position embedding: {err}"]
    reasons = []
    _, h, w = shape
    if h % spec.patch_size or w % spec.patch_size:
        reasons.append(
            f"the {h}x{w} image is not cut into whole {spec.patch_size}x{spec.patch_size} patches: "
            "its border pixels never reach the model"
        )
    for name in (spec.position_embedding, spec.patch_embedding):
        if name not in observation.update:
            reasons.append(f"the update has no gradient for '{name}', which {attack} reads")
        elif float(observation.update[name].norm()) == 0:
            reasons.append(f"the gradient of '{name}' is zero: {attack} cannot read the patch tokens from it")
    return reasons


@dataclass(frozen=True)
class AprilSettings(LabelSettings):
    """The closed form's one number: singular values of the patch rows' gradients below ``rcond`` times the
    largest count as zero (float32 gradients carry about 1e-7 relative rounding)."""

    rcond: float = RCOND

    def problems(self) -> list[str]:
        reasons = [*super().problems(), *above("rcond", self.rcond, 0)]
        return reasons + ([] if self.rcond < 1 else [f"rcond must be < 1, got {self.rcond!r}"])


@register_attack
class April(Attack):
    name = "april"
    summary = "APRIL (Lu et al. 2022): closed form for ViTs from the position embedding's gradient, batch 1"
    table1 = {
        "initialisation": "-",
        "objective": "position-embedding gradient = token gradient; patch-embedding gradient constraints",
        "optimiser": "least squares (SVD pseudo-inverse)",
        "priors": "-",
    }
    Settings = AprilSettings
    requires = ("input_shape", "num_samples")

    def _unmet_assumptions(self, observation: Observation) -> list[str]:
        k = observation.knowledge
        reasons = []
        if int(k.num_samples) != 1:
            reasons.append(
                f"APRIL recovers one sample, the update holds {k.num_samples}: the position embedding's gradient "
                "sums every sample's token gradients; use batch 1"
            )
        if not isinstance(observation.protocol, FedSGD):
            reasons.append("APRIL inverts a FedSGD gradient; this update is a FedAvg weight delta")
        reasons += spec_declines(observation, "APRIL")
        return reasons + label_declines(observation, self.settings.label_method)

    def _reconstruct(
        self, observation: Observation, *, generator: torch.Generator, progress: bool, callback: Callback | None
    ) -> AttackOutput:
        shape = tuple(observation.knowledge.input_shape)
        spec = vit_spec(observation.model, shape)
        update = observation.update
        rows = update[spec.position_embedding].double().reshape(-1, spec.width)
        n = spec.num_patches(shape)
        patch_rows = rows[spec.prefix_tokens : spec.prefix_tokens + n]  # dL/dz_i of the patch tokens
        solution = solve_patches(patch_rows, update[spec.patch_embedding], rcond=self.settings.rcond)
        image = unpatchify(solution.patches[None], shape, spec.patch_size)
        extras = {
            "num_patches": n,
            "width": spec.width,
            "rank": solution.rank,
            "full_rank": solution.full_rank,
            "condition": solution.condition,
            "gradient_residual": solution.gradient_residual,
            "float64_inputs": image,
        }
        if spec.patch_bias is not None and spec.patch_bias in update:
            db = update[spec.patch_bias].double()
            extras["bias_residual"] = float((patch_rows.sum(0) - db).norm() / db.norm().clamp_min(1e-300))
        labels, label_source = labels_for(observation, method=self.settings.label_method)
        return AttackOutput(
            inputs=image.float().to(observation.device), labels=labels, label_source=label_source, extras=extras
        )


def position_term(objective: Objective, position: str, alpha: float) -> Objective:
    """``objective`` plus APRIL's attention privacy term ``alpha * (1 - cos(candidate[position],
    target[position]))`` on the position embedding's update (Lu et al. 2022, ``L = L_grad + alpha L_A``)."""

    def prepared(target: Mapping[str, Tensor], *, weights: Mapping[str, float] | None = None) -> Distance:
        base = objective(target, weights=weights)
        goal = target[position]
        goal_norm = goal.pow(2).sum().sqrt()

        def distance(candidate: Mapping[str, Tensor]) -> Tensor:
            c = candidate[position]
            cos = (c * goal).sum() / (c.pow(2).sum().sqrt() * goal_norm).clamp_min(1e-30)
            return base(candidate) + alpha * (1 - cos)

        return distance

    return prepared


@dataclass(frozen=True)
class AprilOptSettings(MatchingSettings):
    """APRIL's optimisation variant: gradient matching plus ``alpha`` times the position-embedding gradients'
    cosine distance, signed Adam from Gaussian noise inside the image box, no image prior.

    The gradient term defaults to the cosine distance (Geiping et al. 2020), which puts both terms on the same
    [0, 2] scale so that ``alpha`` means the same on every model; public re-implementations of APRIL match the
    gradients in squared Euclidean distance as DLG does (``objective="euclidean"``; then ``alpha`` weighs a
    bounded term against an unbounded one and must follow the gradients' scale).
    """

    iterations: int = 2000
    objective: str = "cosine"
    alpha: float = 1.0
    optimizer: str = "adam"
    lr: float = 0.1
    signed: bool = True
    schedule: str = "step"

    def problems(self) -> list[str]:
        return [*super().problems(), *at_least("alpha", self.alpha, 0)]


@register_attack
class AprilOpt(GradientMatchingAttack):
    name = "april-opt"
    summary = "APRIL-opt (Lu et al. 2022): gradient matching + cosine of the position embedding's gradients"
    table1 = {
        "initialisation": "Gaussian",
        "objective": "gradient cosine distance + alpha * position-embedding gradient cosine distance",
        "optimiser": "signed Adam, step decay, box",
        "priors": "-",
    }
    Settings = AprilOptSettings

    def _unmet_assumptions(self, observation: Observation) -> list[str]:
        reasons = []
        name = find_position_embedding(observation.model)
        if name is None:
            reasons.append(
                "APRIL-opt needs a learnable position embedding (gradinv's ViT, or a parameter named pos_embed, "
                "pos_embedding or position_embedding(s)); use invgrad for other models"
            )
        elif name not in observation.update:
            reasons.append(f"the update has no entry for the position embedding '{name}'")
        return reasons + super()._unmet_assumptions(observation)

    def _objective(self, observation: Observation) -> Objective:
        name = find_position_embedding(observation.model)
        return position_term(OBJECTIVES[self.settings.objective], name, self.settings.alpha)


__all__ = [
    "April",
    "AprilOpt",
    "AprilOptSettings",
    "AprilSettings",
    "PatchSolution",
    "position_term",
    "solve_patches",
    "spec_declines",
]
