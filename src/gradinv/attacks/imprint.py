"""Analytic attacks of a malicious server that modified the model it sent (:mod:`gradinv.fl.malicious`).

- ``rtf``: Robbing the Fed (Fowl, Geiping, Czaja, Goldblum, Goldstein 2022, "Robbing the Fed: Directly
  Obtaining Private Data in Federated Learning with Modified Models", ICLR). The imprint block's rows are
  sorted by threshold ``c_0 < c_1 < ...``; row ``k`` sums the samples with ``<m, x> > c_k``, so bin ``k``
  gives ``x_k = (dW_k - dW_{k+1}) / (db_k - db_{k+1})`` (the last bin: ``dW_K / db_K``). A bin holding one
  sample gives it exactly; a bin holding several gives the mixture ``sum_n g_n x_n / sum_n g_n``.
- ``trap-weights``: trap weights (Boenisch, Dziedzic, Schuster, Shamsabadi, Shumailov, Papernot 2023, "When
  the Curious Abandon Honesty: Federated Learning Is Not Private", EuroS&P). Every row ``r`` of the trapped
  layer with a non-zero bias gradient gives the candidate ``dW_r / db_r``, exact when one sample fired it.

Both read the ratio of a weight and a bias update, so they work on FedSGD gradients and on one-step,
full-batch FedAvg weight deltas (``-lr`` times the gradient). Several local steps move the thresholds and the
rows between steps; the result then depends on how far they move (on 16 digits with 64 bins and 3 steps of
8: 69% recovered behind a ConvNet, 0-13% behind the MLP or LeNet).

Threat model: malicious server (``ThreatModel(server=ImprintServer(...))`` or ``TrapWeightsServer``); the
attack finds the block or layer in ``observation.model``. The number of recovered inputs may be below the
batch size; :func:`score_recovered` scores such a set against the true images.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn

from gradinv._settings import at_least
from gradinv.attacks.base import Attack, AttackOutput, Callback, register_attack
from gradinv.attacks.labels import label_method_problems, labels_for
from gradinv.errors import AttackError, GradinvError, ShapeError
from gradinv.fl.malicious import ImprintBlock, ImprintedModel, TrappedModel
from gradinv.metrics.image import psnr
from gradinv.types import Observation

__all__ = ["RecoveryScores", "RobbingTheFed", "TrapWeights", "score_recovered"]


class RecoveryScores(NamedTuple):
    """Per true image: the best PSNR over the recovered images and which one gives it (``-1``: none)."""

    psnr: Tensor
    best: Tensor
    fraction: float
    threshold_db: float


def score_recovered(rec_images: Tensor, truth_images: Tensor, *, threshold_db: float = 40.0) -> RecoveryScores:
    """For each true image the recovered image of highest PSNR (:func:`gradinv.metrics.psnr`, images in
    ``[0, 1]``): per-sample PSNR (``-inf`` if nothing was recovered) and the fraction of true images above
    ``threshold_db``. Several true images may pick the same recovered image (a mixture matches none well)."""
    if rec_images.ndim != 4 or truth_images.ndim != 4:
        raise ShapeError(
            f"expected image batches (N, C, H, W), got {tuple(rec_images.shape)} and {tuple(truth_images.shape)}"
        )
    if rec_images.shape[1:] != truth_images.shape[1:]:
        raise ShapeError(
            f"recovered images have shape {tuple(rec_images.shape[1:])}, true images {tuple(truth_images.shape[1:])}"
        )
    n = truth_images.shape[0]
    best_psnr = torch.full((n,), -math.inf, dtype=torch.float64)
    best = torch.full((n,), -1, dtype=torch.long)
    rec = rec_images.detach().clamp(0, 1)
    if rec.shape[0]:
        for i in range(n):
            scores = psnr(rec, truth_images[i : i + 1].detach().expand_as(rec)).to(torch.float64)
            j = int(scores.argmax())
            best_psnr[i], best[i] = scores[j], j
    fraction = float((best_psnr > threshold_db).double().mean()) if n else math.nan
    return RecoveryScores(best_psnr, best, fraction, float(threshold_db))


def _shape(observation: Observation, model: nn.Module, features: int) -> tuple[int, ...]:
    for shape in (observation.knowledge.input_shape, getattr(model, "input_shape", None)):
        if shape is not None and math.prod(shape) == features:
            return tuple(shape)
    return (features,)


def _labels(observation: Observation, method: str) -> tuple[Tensor | None, str | None]:
    """The batch's labels (a multiset, not aligned with the recovered inputs), or ``None`` where unrecoverable."""
    try:
        return labels_for(observation, method=method)
    except (GradinvError, ValueError, RuntimeError) as err:
        return None, f"unavailable: {err}"


def _updates(observation: Observation, name: str) -> tuple[Tensor, Tensor]:
    try:
        return observation.update[f"{name}.weight"].double(), observation.update[f"{name}.bias"].double()
    except KeyError:
        raise AttackError(f"the update has no weight and bias for the layer '{name}' the server planted") from None


def _out_of_range(x: Tensor, observation: Observation, shape: tuple[int, ...]) -> Tensor:
    """Per candidate, the mean distance of its de-normalised pixels outside ``[0, 1]`` (0 without a known
    normalisation). A mixture with weights of both signs extrapolates and leaves the range; a sample does not."""
    norm = observation.knowledge.normalization
    if norm is None or len(shape) != 3 or shape[0] != norm.channels or x.shape[0] == 0:
        return torch.zeros(x.shape[0], dtype=torch.float64)
    pixels = norm.denormalize(x.reshape(-1, *shape)).flatten(1)
    return (pixels.clamp(max=0).abs() + (pixels - 1).clamp(min=0)).mean(1)


@dataclass(frozen=True)
class RobbingTheFedSettings:
    #: a bin counts as occupied when ``|db_k - db_{k+1}|`` exceeds this fraction of the largest such difference
    min_relative_weight: float = 1e-6
    label_method: str = "auto"

    def problems(self) -> list[str]:
        return [
            *at_least("min_relative_weight", self.min_relative_weight, 0),
            *label_method_problems(self.label_method),
        ]


def _planted_layer_declines(observation: Observation, name: str) -> list[str]:
    update = observation.update
    if f"{name}.weight" not in update or f"{name}.bias" not in update:
        return [f"the update has no weight and bias for the layer '{name}' the server planted"]
    return []


@register_attack
class RobbingTheFed(Attack):
    name = "rtf"
    summary = "Robbing the Fed (Fowl et al. 2022): a malicious imprint block, one sample per occupied bin"
    table1 = {
        "initialisation": "-",
        "objective": "bin differences of a planted imprint layer",
        "optimiser": "closed form (malicious server)",
        "priors": "-",
    }
    Settings = RobbingTheFedSettings
    requires = ()

    def _unmet_assumptions(self, observation: Observation) -> list[str]:
        model = observation.model
        if not isinstance(model, ImprintedModel) or not isinstance(getattr(model, "imprint", None), ImprintBlock):
            return [
                "rtf needs a model sent by a malicious Robbing-the-Fed server, with an imprint block: simulate one "
                "with ThreatModel(server=ImprintServer(...)) from gradinv.fl.malicious"
            ]
        reasons = _planted_layer_declines(observation, "imprint.measure")
        if not reasons and not bool(observation.update["imprint.measure.bias"].any()):
            reasons.append("every bin's bias update is zero: no sample reached the imprint block's bins")
        return reasons

    def _reconstruct(
        self,
        observation: Observation,
        *,
        generator: torch.Generator,
        progress: bool,
        callback: Callback | None,
    ) -> AttackOutput:
        model = observation.model
        gw, gb = _updates(observation, "imprint.measure")
        c = -observation.parameters["imprint.measure.bias"].double()
        order = torch.argsort(c)
        c, gw, gb = c[order], gw[order], gb[order]
        dw = gw - torch.cat([gw[1:], torch.zeros_like(gw[:1])])
        db = gb - torch.cat([gb[1:], torch.zeros_like(gb[:1])])
        largest = float(db.abs().max()) if db.numel() else 0.0
        if largest == 0.0:
            raise AttackError("every bin's bias update is zero: no sample reached the imprint block's bins")
        occupied = torch.nonzero(db.abs() > self.settings.min_relative_weight * largest).flatten()
        batch = observation.knowledge.num_samples
        if batch is not None and occupied.numel() > batch:  # keep the strongest bins: there are at most B
            strongest = torch.argsort(db[occupied].abs(), descending=True)[:batch]
            occupied = torch.sort(occupied[strongest]).values
        x = dw[occupied] / db[occupied, None]
        m = observation.parameters["imprint.measure.weight"].double()[0]
        s = x @ m
        upper = torch.cat([c[1:], torch.tensor([math.inf], dtype=torch.float64)])
        in_bin = (s > c[occupied]) & (s <= upper[occupied])
        shape = _shape(observation, model, x.shape[1])
        labels, label_source = _labels(observation, self.settings.label_method)
        return AttackOutput(
            inputs=x.float().reshape(-1, *shape),
            labels=labels,
            label_source=label_source,
            extras={
                "bins": int(c.numel()),
                "occupied_bins": int(occupied.numel()),
                "bin_index": order[occupied].tolist(),
                # a single sample's measurement lies in its own bin; False flags a mixture for sure
                "in_bin": in_bin.tolist(),
                "labels_aligned": False,
            },
        )


def row_inputs(observation: Observation, name: str, *, tolerance: float) -> tuple[Tensor, tuple[int, ...], dict]:
    """Inputs read from the rows of the fully connected layer ``name``: each row ``r`` with a non-zero bias
    update gives ``dW_r / db_r``, exact when one sample alone drives the row (PPDL-AHE's batch case, and trap
    weights). Candidates within ``tolerance`` (relative L2) are merged; groups are ranked in-range first (a
    candidate whose de-normalised pixels leave ``[0, 1]`` is a mixture with weights of both signs), then by the
    number of rows that agree, then by their summed ``|db_r|``; at most the batch size are returned."""
    model = observation.model
    gw, gb = _updates(observation, name)
    rows = torch.nonzero(gb != 0).flatten()
    candidates = gw[rows] / gb[rows, None]
    strength = gb[rows].abs()
    shape = _shape(observation, model, gw.shape[1])
    violation = _out_of_range(candidates, observation, shape)
    # greedy grouping, strongest rows first
    by_strength = torch.argsort(strength, descending=True)
    candidates, strength, violation = candidates[by_strength], strength[by_strength], violation[by_strength]
    norms = candidates.norm(dim=1).clamp_min(1e-30)
    group = torch.full((candidates.shape[0],), -1, dtype=torch.long)
    heads: list[int] = []
    for i in range(candidates.shape[0]):
        if group[i] >= 0:
            continue
        group[i] = len(heads)
        rest = torch.nonzero(group < 0).flatten()
        if rest.numel():
            dist = (candidates[rest] - candidates[i]).norm(dim=1) / torch.maximum(norms[rest], norms[i])
            group[rest[dist < tolerance]] = len(heads)
        heads.append(i)
    size = torch.bincount(group, minlength=len(heads)).double() if heads else torch.zeros(0)
    weight = torch.zeros(len(heads), dtype=torch.float64).index_add_(0, group, strength) if heads else size
    head = torch.tensor(heads, dtype=torch.long)
    bad = (violation[head] > 1e-3).double() if heads else size
    # rank: in range first, then more agreeing rows, then stronger rows (lexicographic via stable sorts)
    ranking = torch.arange(len(heads))
    for key, descending in ((weight, True), (size, True), (bad, False)):
        ranking = ranking[torch.sort(key[ranking], descending=descending, stable=True).indices]
    batch = observation.knowledge.num_samples
    keep = ranking if batch is None else ranking[:batch]
    x = candidates[head[keep]] if heads else candidates
    found = {
        "active_rows": int(rows.numel()),
        "distinct_candidates": len(heads),
        "rows_per_input": size[keep].long().tolist() if heads else [],
        "out_of_range": bad[keep].bool().tolist() if heads else [],
    }
    return x, shape, found


@dataclass(frozen=True)
class TrapWeightsSettings:
    #: two candidates are the same sample when their relative L2 distance is below this
    duplicate_tolerance: float = 1e-3
    label_method: str = "auto"

    def problems(self) -> list[str]:
        return [
            *at_least("duplicate_tolerance", self.duplicate_tolerance, 0),
            *label_method_problems(self.label_method),
        ]


@register_attack
class TrapWeights(Attack):
    """Candidates ``dW_r / db_r`` of every row with a non-zero bias update, grouped into distinct inputs.

    Rule for the returned inputs (at most the batch size when it is known): a row fired by one sample gives
    that sample exactly, several rows often give the same one, while rows fired by several samples give
    mixtures that no other row repeats. Candidates within ``duplicate_tolerance`` (relative L2) are merged.
    The groups are ranked (1) in-range first: a candidate whose de-normalised pixels leave ``[0, 1]`` is a
    mixture with weights of both signs, (2) by the number of rows that agree on it, (3) by the summed
    ``|db_r|`` of those rows; each group is returned as its strongest row's candidate.
    """

    name = "trap-weights"
    summary = "Trap weights (Boenisch et al. 2023): rows a single sample activates give it as dW_r / db_r"
    table1 = {
        "initialisation": "-",
        "objective": "rows a single sample activates",
        "optimiser": "closed form (malicious server)",
        "priors": "-",
    }
    Settings = TrapWeightsSettings
    requires = ()

    def _unmet_assumptions(self, observation: Observation) -> list[str]:
        model = observation.model
        name = getattr(model, "trap_layer", None) if isinstance(model, TrappedModel) else None
        layer = dict(model.named_modules()).get(name) if isinstance(name, str) else None
        if not isinstance(layer, nn.Linear):
            return [
                "trap-weights needs a model sent by a malicious trap-weights server: simulate one with "
                "ThreatModel(server=TrapWeightsServer(...)) from gradinv.fl.malicious"
            ]
        return _planted_layer_declines(observation, name)

    def _reconstruct(
        self,
        observation: Observation,
        *,
        generator: torch.Generator,
        progress: bool,
        callback: Callback | None,
    ) -> AttackOutput:
        name = observation.model.trap_layer
        x, shape, found = row_inputs(observation, name, tolerance=self.settings.duplicate_tolerance)
        labels, label_source = _labels(observation, self.settings.label_method)
        return AttackOutput(
            inputs=x.float().reshape(-1, *shape),
            labels=labels,
            label_source=label_source,
            extras={"layer": name, **found, "labels_aligned": False},
        )
