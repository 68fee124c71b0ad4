"""Rank analysis: does a layer's update determine its input, before any attack runs (R-GAP, Zhu & Blaschko 2021).

For one sample, a layer with ``n`` inputs gives two sets of linear constraints on its input: the forward
constraint ``W x = u`` (one per output unit, usable when the activation above can be inverted so that ``u`` is
known) and the gradient constraint ``dL/dW = delta x^T`` (a fully connected layer: all ``n`` inputs when
``delta != 0``; a convolution: ``rank(delta) <= min(O, P)`` independent copies of its ``C k^2`` taps, with ``O``
output channels and ``P`` output positions). A layer is *full* when the constraints reach the unknowns,
*deficient* by the shortfall otherwise; the network is predicted recoverable by R-GAP when every layer is full,
every activation below the classifier is invertible and the classifier has a bias. ``numeric=True`` checks the
count with the actual rank of the joint system at a random probe (random input, random upstream gradient):
what the counts bound, the probe measures.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from gradinv.attacks.components.chain import ChainLayer, layer_chain
from gradinv.errors import AttackError, ShapeError
from gradinv.models import MIN_MODEL_IMAGE_SIZE


@dataclass(frozen=True)
class LayerRank:
    """One layer's constraint count against its unknowns."""

    name: str
    kind: str
    activation: str
    unknowns: int
    forward: int
    gradient: int
    numeric_rank: int | None
    invertible_below: bool  # the activation producing this layer's input can be inverted (or it is the input)

    @property
    def constraints(self) -> int:
        return min(self.unknowns, self.forward + self.gradient)

    @property
    def deficit(self) -> int:
        rank = self.numeric_rank if self.numeric_rank is not None else self.constraints
        return max(0, self.unknowns - rank)

    @property
    def verdict(self) -> str:
        return "full" if self.deficit == 0 else f"deficient by {self.deficit}"


@dataclass(frozen=True)
class RankReport:
    """Per-layer analysis, in forward order, and the whole-network prediction."""

    layers: tuple[LayerRank, ...]
    recoverable: bool
    reason: str

    def table(self) -> str:
        head = "| layer | kind | activation | unknowns | forward | gradient | numeric rank | verdict |"
        rows = [head, "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in self.layers:
            numeric = "-" if r.numeric_rank is None else str(r.numeric_rank)
            rows.append(
                f"| {r.name} | {r.kind} | {r.activation} | {r.unknowns} | {r.forward} | {r.gradient} | {numeric} "
                f"| {r.verdict} |"
            )
        verdict = "recoverable" if self.recoverable else "not recoverable"
        text = "\n".join(rows) + f"\n\nR-GAP prediction: {verdict} ({self.reason})"
        return text if self.copa_count is None else text + f"\n{self.copa_count}"

    @property
    def copa_count(self) -> str | None:
        """COPA's count where a layer is deficient: from the topmost deficient layer down, its own constraints
        plus the gradient constraints of the layers below, against the image's unknowns (necessary, not
        sufficient: the joint problem is nonlinear)."""
        deficient = [i for i, r in enumerate(self.layers) if r.deficit > 0]
        if not deficient:
            return None
        top = deficient[-1]
        if top == 0:
            return f"COPA: {self.layers[0].name} is the first layer; nothing below it to pull back through"
        joint = self.layers[top].constraints + sum(r.gradient for r in self.layers[:top])
        unknowns = self.layers[0].unknowns
        enough = "enough" if joint >= unknowns else "too few"
        return (
            f"COPA: layers {self.layers[0].name}..{self.layers[top].name} jointly give {joint} constraints for "
            f"{unknowns} image values ({enough})"
        )


def _counts(layer: ChainLayer, *, is_head: bool) -> tuple[int, int, int]:
    n = int(torch.tensor(layer.in_shape).prod())
    out = int(torch.tensor(layer.out_shape).prod())
    forward = 0 if is_head else out  # the classifier's output pre-image is not needed: its gradient gives x
    if layer.kind == "linear":
        gradient = n
    else:
        conv: nn.Conv2d = layer.module
        o, p = layer.out_shape[0], int(layer.out_shape[1] * layer.out_shape[2])
        taps = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
        gradient = min(o, p) * taps
    return n, forward, min(gradient, n)


def _numeric_rank(layer: ChainLayer, generator: torch.Generator) -> int:
    from gradinv.attacks.rgap import layer_system

    module = layer.module
    x = torch.rand((1, *layer.in_shape), generator=generator, dtype=torch.float64)
    weight = module.weight.detach().double()
    u = (module(x.float()).double() if layer.kind == "conv" else x.flatten(1) @ weight.T)[0]
    delta = torch.randn(u.shape, generator=generator, dtype=torch.float64)
    if layer.kind == "linear":
        grad_weight = torch.outer(delta, x.flatten())
    else:
        grad_weight = torch.nn.grad.conv2d_weight(
            x, weight.shape, delta[None], stride=module.stride, padding=module.padding
        )
    normal, _ = layer_system(layer, weight, None, u, delta, grad_weight)
    eig = torch.linalg.eigvalsh(normal)
    return int((eig > eig.max() * 1e-10).sum())


def check_input_shape(input_shape: tuple[int, ...]) -> None:
    """Refuse, in one line, an input shape no model is built for: every size positive and, for images
    ``(C, H, W)``, sides of at least :data:`~gradinv.models.MIN_MODEL_IMAGE_SIZE` pixels (the check
    :func:`gradinv.models.build_model` makes for a registered model, here for any module)."""
    shape = tuple(input_shape)
    if not shape or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in shape):
        raise ShapeError(f"input shape must be positive integers such as (3, 32, 32), got {shape}")
    if len(shape) == 3 and min(shape[1:]) < MIN_MODEL_IMAGE_SIZE:
        raise ShapeError(
            f"cannot analyse {shape[1]}x{shape[2]} images: models take {MIN_MODEL_IMAGE_SIZE} pixels or more; "
            f"use --image-size {MIN_MODEL_IMAGE_SIZE} or more"
        )


def rank_analysis(
    model: nn.Module, input_shape: tuple[int, ...], *, numeric: bool = False, seed: int = 0
) -> RankReport:
    """R-GAP's rank analysis of ``model`` for inputs of ``input_shape`` (batch 1)."""
    check_input_shape(input_shape)
    chain = layer_chain(model, tuple(input_shape))
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for i, layer in enumerate(chain):
        head = i == len(chain) - 1
        n, forward, gradient = _counts(layer, is_head=head)
        below = True if i == 0 else chain[i - 1].invertible
        rank = _numeric_rank(layer, generator) if numeric and not head else None
        rows.append(LayerRank(layer.name, layer.kind, layer.activation, n, forward, gradient, rank, below))
    head = chain[-1]
    if head.kind != "linear" or head.module.bias is None:
        return RankReport(tuple(rows), False, "the last layer is not a fully connected classifier with a bias")
    blocked = [r.name for r in rows[1:] if not r.invertible_below]
    if blocked:
        return RankReport(tuple(rows), False, f"non-invertible activation below {', '.join(blocked)}")
    deficient = [r.name for r in rows if r.deficit]
    if deficient:
        return RankReport(tuple(rows), False, f"rank-deficient: {', '.join(deficient)}")
    return RankReport(tuple(rows), True, "every layer has at least as many constraints as unknowns")


def analyze_model(model: nn.Module, input_shape: tuple[int, ...], **options) -> RankReport:
    """:func:`rank_analysis` with model errors reported as :class:`~gradinv.errors.AttackError`."""
    try:
        return rank_analysis(model, input_shape, **options)
    except AttackError:
        raise
    except RuntimeError as exc:  # a shape the model cannot take
        raise AttackError(f"cannot analyse the model on inputs of shape {tuple(input_shape)}: {exc}") from None
