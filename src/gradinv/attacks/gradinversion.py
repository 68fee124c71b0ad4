"""GradInversion (Yin, Mallya, Vahdat, Alvarez, Kautz, Molchanov, CVPR 2021, "See through Gradients: Image Batch
Recovery via GradInversion").

Threat model: an honest-but-curious server that knows the input shape, the number of samples and (for the box
constraint) the normalisation, and holds the model as sent, BatchNorm running statistics included; labels come
from the threat model or from the last layer's gradient by the paper's rule for a batch of *distinct* labels
(label method ``yin``, Sec. 3.2; it refuses batches whose labels repeat).

The objective (Eq. 3) is a gradient-matching distance plus fidelity priors (Eq. 7-10) and group consistency
(Eq. 11-12):

- ``L_grad``: Eq. 4 is the Euclidean distance between the candidate's and the observed gradient, per parameter
  tensor (``objective="layer_euclidean"``, or the squared ``"euclidean"``), divided here by the observed
  update's size (``relative``) so that the prior weights do not depend on the model's gradient scale. On
  trained models it stalls at candidates whose gradient is near zero (see :class:`GradInversionSettings`), so
  the default distance is the cosine of Inverting Gradients;
- fidelity: total variation, the l2 norm of the candidate and the BatchNorm prior of Eq. 10, the distance of
  the per-channel mean and variance of every BatchNorm layer's input on the candidate to the model's running
  statistics (to the client batch's own statistics when the threat model gives them);
- group consistency: several restarts ("seeds") run together; each is pulled towards a consensus, the
  pixel-wise mean of the restarts after registering them to each other (Eq. 12). The paper registers with
  RANSAC-flow; here registration is a search over integer translations up to ``max_shift`` pixels and, for
  samples that share a label, the assignment of each restart's samples to the consensus's slots (Hungarian),
  since such samples are interchangeable between restarts. The engine's group term (each restart to the
  restarts' unregistered mean) is ``registration="none"``.

Optimiser: plain Adam, lr 0.1, cosine decay, box constraint (the paper's Sec. 4 and breaching's
``seethroughgradients`` configuration). The restarts run as one batched ``torch.func.vmap`` computation.
The output is the candidate with the lowest final cost among the restarts and their registered consensus.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from gradinv._settings import at_least, one_of
from gradinv.attacks.base import AttackOutput, Callback, register_attack
from gradinv.attacks.components.engine import MatchingSettings, final_costs, group_gradient
from gradinv.attacks.components.objectives import OBJECTIVES, Distance, Objective
from gradinv.attacks.components.priors import Prior, bn_statistics, bn_targets, build_priors, combine_priors
from gradinv.attacks.matching import GradientMatchingAttack
from gradinv.errors import ConfigError
from gradinv.models import classifier_layer
from gradinv.types import Observation

REGISTRATIONS = ("none", "shift")
OUTPUTS = ("auto", "best", "consensus")


# -- the BatchNorm prior, measured in the client's mode ------------------------------------------------------------


def running_statistics(observation: Observation) -> dict[str, tuple[Tensor, Tensor]]:
    """Per BatchNorm layer, the running mean and variance the server sent (what a trained model's buffers say
    about its training data), whatever else the threat model gives."""
    return bn_targets(observation.with_knowledge(bn_statistics=None))


def batchnorm_prior(
    observation: Observation,
    targets: Mapping[str, tuple[Tensor, Tensor]],
    *,
    train_mode: bool | None = None,
) -> Prior | None:
    """The engine's BatchNorm prior (Eq. 10, :func:`~gradinv.attacks.components.priors.bn_statistics`) against
    ``targets``, or None when ``targets`` is empty (a model without BatchNorm)."""
    return bn_statistics(observation, targets=targets, train_mode=train_mode) if targets else None


def layer_euclidean(target: Mapping[str, Tensor], *, weights: Mapping[str, float] | None = None) -> Distance:
    """Eq. 4 of Yin et al. 2021: ``sum_l ||grad_l(x) - observed_l||_2``, the Euclidean distance of every
    parameter tensor's gradient, not squared, summed over the tensors."""
    w = {k: 1.0 if weights is None else float(weights.get(k, 1.0)) for k in target}

    def distance(candidate: Mapping[str, Tensor]) -> Tensor:
        return sum(w[k] * ((candidate[k] - t).pow(2).sum() + 1e-30).sqrt() for k, t in target.items() if w[k])

    return distance


def relative_objective(base: Objective) -> Objective:
    """``base``'s distance divided by the distance of a zero update to the observed one (the observed update's
    squared norm for ``euclidean``, the sum of its tensors' norms for ``layer_euclidean``): a relative error,
    whatever the model's gradient scale."""

    def objective(target: Mapping[str, Tensor], *, weights: Mapping[str, float] | None = None) -> Distance:
        distance = base(target, weights=weights)
        with torch.no_grad():
            norm = float(distance({k: torch.zeros_like(t) for k, t in target.items()}))
        scale = 1.0 / max(norm, 1e-30)

        def relative(candidate: Mapping[str, Tensor]) -> Tensor:
            return distance(candidate) * scale

        return relative

    return objective


#: the objectives GradInversion takes: the engine's and Eq. 4's per-tensor Euclidean distance
OBJECTIVE_CHOICES = {**OBJECTIVES, "layer_euclidean": layer_euclidean}
#: the distances ``relative`` divides by the observed update's size
RELATIVE = ("euclidean", "layer_euclidean")


# -- registration of the restarts (Eq. 12) --------------------------------------------------------------------------


def _offsets(max_shift: int) -> list[tuple[int, int]]:
    return [(dy, dx) for dy in range(-max_shift, max_shift + 1) for dx in range(-max_shift, max_shift + 1)]


def _crop(padded: Tensor, dy: int, dx: int, pad: int, size: tuple[int, int]) -> Tensor:
    """From images padded by ``pad`` on each side: the images moved by (dy, dx) pixels (borders replicated)."""
    h, w = size
    return padded[..., pad - dy : pad - dy + h, pad - dx : pad - dx + w]


def _pad(x: Tensor, pad: int) -> Tensor:
    """(N, C, H, W) images padded by replicating their borders (nothing to do without a shift)."""
    return F.pad(x, (pad, pad, pad, pad), mode="replicate") if pad else x


def label_groups(labels: Tensor) -> list[Tensor]:
    """Index sets of the batch's samples that share a label (more than one each): the samples a restart may
    hold in another order than the consensus. Soft labels give none."""
    if labels.is_floating_point() or labels.dim() != 1:
        return []
    groups = []
    for value in torch.unique(labels):
        idx = torch.nonzero(labels == value).flatten()
        if idx.numel() > 1:
            groups.append(idx)
    return groups


@dataclass(frozen=True, eq=False)
class Registration:
    """Restarts registered to their consensus: ``consensus`` (B, C, H, W), the pixel-wise mean of the
    registered restarts; ``targets`` (R, B, C, H, W), the consensus moved back into each restart's own frame
    and order (what group consistency pulls each restart towards); per restart and sample, the consensus slot
    it was matched to (``slots``) and the translation that moves it onto that slot (``shifts``, (R, B, 2) as
    (dy, dx) pixels)."""

    consensus: Tensor
    targets: Tensor
    slots: Tensor
    shifts: Tensor


def register_restarts(
    x: Tensor, *, max_shift: int, groups: list[Tensor] = (), reference: int = 0, passes: int = 2
) -> Registration:
    """Register restarts ``x`` (R, B, C, H, W) to their consensus (Yin et al. 2021, Eq. 12).

    Start from restart ``reference`` (e.g. the one matching best); then, ``passes`` times, find for every
    restart's sample the translation (up to ``max_shift`` pixels each way) that brings it closest to its
    consensus slot, and, within ``groups`` (the samples sharing a label), the assignment of samples to slots
    with the least total distance (Hungarian); the new consensus is the pixel-wise mean of the registered
    restarts.
    """
    r, b, c, h, w = x.shape
    x = x.detach()
    offsets = _offsets(max_shift)
    padded = _pad(x.reshape(r * b, c, h, w), max_shift).reshape(r, b, c, h + 2 * max_shift, w + 2 * max_shift)
    moved = [_crop(padded, dy, dx, max_shift, (h, w)) for dy, dx in offsets]  # views, (R, B, C, H, W) each
    consensus = x[reference]
    own = torch.arange(b, device=x.device)
    slots = own.expand(r, b).clone()
    best = torch.zeros(r, b, dtype=torch.long, device=x.device)
    for _ in range(passes):
        ref = consensus.reshape(b, -1)
        dist = torch.stack([(m.reshape(r, b, -1) - ref).pow(2).sum(-1) for m in moved])  # (S, R, B)
        best = dist.argmin(0)
        slots = own.expand(r, b).clone()
        for idx in groups:
            idx = idx.to(x.device)
            # pair[k, r, i, j]: sample idx[i] of restart r moved by offset k, against consensus slot idx[j]
            pair = torch.stack(
                [torch.cdist(m[:, idx].reshape(r, len(idx), -1), ref[idx].expand(r, -1, -1)) for m in moved]
            )
            cost, shift = pair.pow(2).min(0)  # (R, m, m)
            for k in range(r):
                rows, cols = linear_sum_assignment(cost[k].cpu().numpy())
                rows_t, cols_t = torch.as_tensor(rows, device=x.device), torch.as_tensor(cols, device=x.device)
                slots[k, idx[rows_t]] = idx[cols_t]
                best[k, idx[rows_t]] = shift[k, rows_t, cols_t]
        aligned = torch.empty_like(x)
        for k, m in enumerate(moved):
            where = best == k
            if bool(where.any()):
                rr, bb = torch.nonzero(where, as_tuple=True)
                aligned[rr, slots[rr, bb]] = m[rr, bb]
        consensus = aligned.mean(0)
    # the consensus back in each restart's frame: slot slots[r, i], moved by minus the restart's shift
    back = _pad(consensus, max_shift)
    targets = torch.empty_like(x)
    for k, (dy, dx) in enumerate(offsets):
        where = best == k
        if bool(where.any()):
            rr, bb = torch.nonzero(where, as_tuple=True)
            targets[rr, bb] = _crop(back, -dy, -dx, max_shift, (h, w))[slots[rr, bb]]
    table = torch.tensor(offsets, dtype=torch.long, device=x.device)
    return Registration(consensus=consensus, targets=targets, slots=slots, shifts=table[best])


def mean_consensus(x: Tensor) -> Registration:
    """The engine's consensus: the restarts' pixel-wise mean, nothing registered."""
    r, b = x.shape[:2]
    consensus = x.detach().mean(0)
    return Registration(
        consensus=consensus,
        targets=consensus.expand_as(x),
        slots=torch.arange(b, device=x.device).expand(r, b).clone(),
        shifts=torch.zeros(r, b, 2, dtype=torch.long, device=x.device),
    )


# -- the preset -----------------------------------------------------------------------------------------------------


#: the BatchNorm prior's weight with the cosine objective, by what the statistics are (GradAttack's scripts, Huang
#: et al. 2021): the client batch's own ("BN_exact") or the model's running statistics
BN_WEIGHT_EXACT = 5e-3
BN_WEIGHT_RUNNING = 1e-3


@dataclass(frozen=True)
class GradInversionSettings(MatchingSettings):
    """The paper's optimiser and priors; the matching distance and the weights are where this preset deviates.

    Paper (Sec. 4) and breaching's ``seethroughgradients``: Adam (plain, not signed), lr 0.1, cosine decay, box;
    Euclidean distance (Eq. 4) scaled by 1e-4, TV 1e-4, l2 1e-6, BN 0.1, group 0.01 (ImageNet ResNet-50, 224 px,
    20,000 iterations). Deviations, each measured on a ConvNet trained 300 steps on digits (not the data the
    report scores): the Euclidean distance stalls at the trivial "zero update" on trained models (relative error
    ~1, below a grey image's PSNR after 2,000 iterations), so the default distance is the cosine (Geiping et al.
    2020) and Eq. 4 stays available (``objective="layer_euclidean"`` or ``"euclidean"``, made scale-free by
    ``relative``); TV 0.05 and BN as GradAttack weighs it for this objective (Huang et al. 2021): ``bn`` None
    takes :data:`BN_WEIGHT_EXACT` (0.005) when the threat model gives the client batch's own statistics, else
    :data:`BN_WEIGHT_RUNNING` (0.001, against the running statistics); 4,000 iterations for 32 px images; 4
    restarts; group 0.01 on the engine's squared group term; registration by translations instead of RANSAC-flow.
    """

    iterations: int = 4000
    restarts: int = 4
    init: str = "gaussian"
    objective: str = "cosine"
    tv: float = 5e-2
    l2: float = 1e-4
    bn: float | None = None
    group: float = 1e-2
    optimizer: str = "adam"
    lr: float = 0.1
    signed: bool = False
    schedule: str = "cosine"
    boxed: bool = True
    label_method: str = "yin"
    #: with a Euclidean distance: divide it by the observed update's size (a relative error)
    relative: bool = True
    #: how restarts are registered to their consensus: ``shift`` (translations, label-group assignment), ``none``
    registration: str = "shift"
    max_shift: int = 2
    #: (``shift``) register the restarts again every this many iterations; in between, each restart is pulled
    #: towards the last registered consensus (registering at every step costs more than the batched gradient step
    #: itself on a batch of 8: measured in ``bench/iterative.py``; the consensus moves slowly)
    register_every: int = 10
    #: the result: ``auto`` (lowest final cost among the restarts and the consensus), ``best`` restart, ``consensus``
    output: str = "auto"

    def problems(self) -> list[str]:
        # the objective is checked here, against the engine's and Eq. 4's
        base = dataclasses.replace(self, objective="euclidean", bn=self.bn or 0.0)
        return [
            *MatchingSettings.problems(base),
            *one_of("objective", self.objective, sorted(OBJECTIVE_CHOICES)),
            *(
                ["optimizer must be a first-order one (adam, adamw, sgd): the restarts are coupled every step"]
                if self.optimizer == "lbfgs"
                else []
            ),
            *one_of("registration", self.registration, REGISTRATIONS),
            *at_least("max_shift", self.max_shift, 0),
            *at_least("register_every", self.register_every, 1),
            *one_of("output", self.output, OUTPUTS),
        ]


def distinct_label_declines(observation: Observation, method: str) -> list[str]:
    """Yin et al.'s label rule needs distinct labels: impossible when the batch outnumbers the classes."""
    k = observation.knowledge
    if k.labels is not None or method != "yin" or k.num_samples is None:
        return []
    try:
        classes = classifier_layer(observation.model)[1].out_features
    except ConfigError:
        return []
    if k.num_samples > classes:
        return [
            f"label method 'yin' recovers distinct labels, impossible for {k.num_samples} samples of {classes} "
            "classes: give the labels or use label_method=ilrg (or llg)"
        ]
    return []


@register_attack
class GradInversion(GradientMatchingAttack):
    """GradInversion: Euclidean gradient matching, fidelity priors (TV, l2, BatchNorm statistics) and
    registered group consistency over batched restarts (Yin et al. 2021)."""

    name = "gradinversion"
    summary = (
        "GradInversion (Yin et al. 2021): Euclidean matching + TV, l2, BatchNorm statistics, registered group "
        "consistency over restarts, distinct-label recovery"
    )
    Settings = GradInversionSettings
    table1 = {
        "initialisation": "Gaussian (several seeds)",
        "objective": "Euclidean distance (Eq. 4; the preset's default is the cosine, see its settings)",
        "optimiser": "Adam, cosine decay, box",  # plain (unsigned) Adam
        "priors": "total variation, l2, BatchNorm statistics, group consistency (registered consensus)",
    }

    def _unmet_assumptions(self, observation: Observation) -> list[str]:
        return [
            *super()._unmet_assumptions(observation),
            *distinct_label_declines(observation, self.settings.label_method),
        ]

    def _objective(self, observation: Observation) -> Objective:
        s = self.settings
        base = OBJECTIVE_CHOICES[s.objective]
        return relative_objective(base) if s.relative and s.objective in RELATIVE else base

    def _bn_prior(self, observation: Observation) -> Prior | None:
        """Eq. 10 against :func:`~gradinv.attacks.components.priors.bn_targets` (the batch's own statistics
        when the threat model gives them, else the running statistics)."""
        return batchnorm_prior(observation, bn_targets(observation))

    def bn_weight(self, observation: Observation) -> float:
        """The BatchNorm prior's weight on ``observation`` (``bn`` None: by what the statistics are, see the
        settings)."""
        if self.settings.bn is not None:
            return self.settings.bn
        return BN_WEIGHT_EXACT if observation.knowledge.bn_statistics is not None else BN_WEIGHT_RUNNING

    def _prior(self, observation: Observation, labels: Tensor) -> Prior | None:
        s = self.settings
        bn = self.bn_weight(observation)
        others = build_priors(observation, labels, {"tv": s.tv, "l2": s.l2, "label": s.label})
        return combine_priors((1.0, others), (bn, self._bn_prior(observation) if bn else None))

    def _resolved(self, observation: Observation) -> dict[str, Any]:
        return {"bn": self.bn_weight(observation)}

    def _register(self, x: Tensor, groups: list[Tensor], reference: int) -> Registration:
        if self.settings.registration == "none":
            return mean_consensus(x)
        return register_restarts(x, max_shift=self.settings.max_shift, groups=groups, reference=reference)

    def _coupling(self, labels: Tensor) -> Callable[[Tensor, Tensor], Tensor]:
        groups = label_groups(labels)
        state: dict[str, object] = {"step": 0, "targets": None}

        def registered(x: Tensor, values: Tensor) -> Tensor:  # Eq. 11-12: the pull to the registered consensus
            if self.settings.registration == "none" or state["step"] % self.settings.register_every == 0:
                state["targets"] = self._register(x, groups, int(torch.argmin(values))).targets
            state["step"] += 1
            return group_gradient(x, state["targets"])

        return registered

    def _reconstruct(
        self,
        observation: Observation,
        *,
        generator: torch.Generator,
        progress: bool,
        callback: Callback | None,
    ) -> AttackOutput:
        s = self.settings
        run = self._run(observation, generator=generator, progress=progress, callback=callback)
        result, labels, one, bounds = run.result, run.labels, run.cost, run.bounds
        groups = label_groups(labels)
        candidates, costs, best = result.candidates, result.costs, result.best
        registration = self._register(candidates, groups, best) if s.restarts > 1 else mean_consensus(candidates)
        consensus = registration.consensus
        if bounds is not None:
            consensus = torch.maximum(torch.minimum(consensus, bounds[1]), bounds[0])
        consensus_cost = final_costs(one, consensus.unsqueeze(0))[0] if s.restarts > 1 else torch.tensor(math.inf)
        use_consensus = s.restarts > 1 and (
            s.output == "consensus" or (s.output == "auto" and float(consensus_cost) < float(costs[best]))
        )
        inputs = consensus.clone() if use_consensus else candidates[best].clone()
        return AttackOutput(
            inputs=inputs,
            labels=labels,
            label_source=run.label_source,
            trace=result.trace,
            extras={
                "restart_costs": costs.tolist(),
                "consensus_cost": float(consensus_cost),
                "best_restart": best,
                "output": "consensus" if use_consensus else f"restart {best}",
                "shifts": registration.shifts.tolist(),
                "iterations_run": result.iterations_run,
                "stopped": result.stopped,
                "bn_prior": "on" if self.bn_weight(observation) and self._has_batchnorm(observation) else "off",
            },
            settings=self._resolved(observation),
        )

    @staticmethod
    def _has_batchnorm(observation: Observation) -> bool:
        return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in observation.model.modules())


__all__ = [
    "BN_WEIGHT_EXACT",
    "BN_WEIGHT_RUNNING",
    "GradInversion",
    "GradInversionSettings",
    "Registration",
    "batchnorm_prior",
    "label_groups",
    "layer_euclidean",
    "mean_consensus",
    "register_restarts",
    "relative_objective",
    "running_statistics",
]
