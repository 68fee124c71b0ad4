"""Compression that communication-efficient federations deploy, as defenses on the shared update, with what each
costs on the wire: k-bit stochastic quantisation (QSGD, Alistarh et al. 2017) and low-rank PowerSGD (Vogels et
al. 2019).

The maths are the pure functions :func:`quantize_update` and :func:`powersgd_update`; :class:`Quantize` and
:class:`PowerSGD` are their settings. ``bytes_sent(update)`` prices an update shaped like ``update`` in bytes
against :func:`~gradinv.defenses.base.payload_bytes` (every entry as a float32).

Both act on one round, as the simulated client plays one round: the error feedback both papers pair with their
compressors (the residual a client keeps and adds to its next update, and PowerSGD's warm start of ``Q`` from the
last round) needs state across rounds, so it is left out. In a first round, the one a gradient-inversion attack
usually targets, the client sends exactly what is modelled here.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from gradinv.defenses.base import (
    FLOAT32_BYTES,
    ClientState,
    UpdateDefense,
    check_setting,
    payload_bytes,
    register_defense,
)

Update = Mapping[str, Tensor]

#: the largest ``bits`` of :class:`Quantize` (beyond 16 a level index is as long as a float16)
MAX_BITS = 16
SCALES = ("max", "norm")


# -- maths --------------------------------------------------------------------------------------------------------


def quantize_tensor(
    v: Tensor, *, bits: int, stochastic: bool = True, scale: str = "max", generator: torch.Generator | None = None
) -> Tensor:
    """``v`` rounded to one of ``2**bits`` evenly spaced levels from ``-s`` to ``s``, where ``s`` is ``max |v|``
    (``scale="max"``) or ``||v||_2`` (``"norm"``, QSGD's scale).

    ``stochastic``: QSGD's rounding (Alistarh et al. 2017, Sec. 3.1): an entry between two levels goes to the upper
    one with probability equal to its distance from the lower one in level units, so the result is unbiased
    (``E[Q(v)] = v``); the uniform draws come from ``generator``. Otherwise each entry goes to its nearest level.
    """
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    s = v.abs().max() if scale == "max" else torch.linalg.vector_norm(v)
    if v.numel() == 0 or float(s) == 0.0:
        return torch.zeros_like(v)
    steps = 2**bits - 1  # intervals between the 2**bits levels
    position = ((v / s + 1) * (steps / 2)).clamp(0, steps)  # in level units, from -s (0) to s (steps)
    if stochastic:
        low = position.floor()
        u = torch.rand(v.shape, generator=generator, dtype=v.dtype).to(v.device)
        level = (low + (u < position - low).to(v.dtype)).clamp(max=steps)
    else:
        level = position.round()
    return (level * (2 / steps) - 1) * s


def quantize_update(
    update: Update, *, bits: int, stochastic: bool = True, scale: str = "max", generator: torch.Generator | None = None
) -> dict[str, Tensor]:
    """Every tensor of ``update`` through :func:`quantize_tensor`, each with its own scale, in the update's
    order (the random draws follow that order)."""
    return {
        k: quantize_tensor(v, bits=bits, stochastic=stochastic, scale=scale, generator=generator)
        for k, v in update.items()
    }


def quantized_bytes(update: Update, *, bits: int) -> int:
    """Bytes of ``update`` after :func:`quantize_update`: per tensor ``bits`` per entry (rounded up to whole
    bytes) and its scale as one float32."""
    return sum(math.ceil(bits * int(v.numel()) / 8) + FLOAT32_BYTES for v in update.values())


def as_matrix(v: Tensor) -> Tensor:
    """A tensor of two or more dimensions as PowerSGD's matrix: ``(out, rest)`` (a convolution's kernel
    ``(out, in, h, w)`` becomes ``(out, in*h*w)``)."""
    return v.reshape(v.shape[0], -1)


def orthonormal_columns(p: Tensor) -> Tensor:
    """An orthonormal basis of the span of ``p``'s columns (PowerSGD's ORTHOGONALIZE; Householder QR, which is
    orthonormal even where ``p`` has dependent or zero columns)."""
    return torch.linalg.qr(p, mode="reduced").Q


def low_rank(m: Tensor, *, rank: int, power_iterations: int = 1, generator: torch.Generator | None = None) -> Tensor:
    """PowerSGD's rank-``rank`` approximation ``P Q^T`` of the matrix ``m`` (Vogels et al. 2019, Algorithm 1).

    ``Q`` starts as standard Gaussian noise from ``generator`` (``(cols, r)``, r the rank capped at the matrix's
    smaller side); each power iteration takes ``P = orth(m Q)`` and ``Q = m^T P``. One iteration is the paper's
    compressor; more approach the best rank-r approximation (subspace iteration).
    """
    rows, cols = m.shape
    r = min(rank, rows, cols)
    q = torch.randn((cols, r), generator=generator, dtype=m.dtype).to(m.device)
    for _ in range(power_iterations):
        p = orthonormal_columns(m @ q)
        q = m.T @ p
    return p @ q.T


def powersgd_update(
    update: Update, *, rank: int, power_iterations: int = 1, generator: torch.Generator | None = None
) -> dict[str, Tensor]:
    """Every tensor of two or more dimensions of ``update`` as its :func:`low_rank` approximation (of its
    :func:`as_matrix` view, reshaped back); one-dimensional tensors (biases, normalisation scales) unchanged, as
    PowerSGD sends them uncompressed. Random draws follow the update's order."""
    out = {}
    for k, v in update.items():
        if v.ndim < 2:
            out[k] = v.clone()
            continue
        m = as_matrix(v)
        out[k] = low_rank(m, rank=rank, power_iterations=power_iterations, generator=generator).reshape(v.shape)
    return out


def powersgd_bytes(update: Update, *, rank: int) -> int:
    """Bytes of ``update`` after :func:`powersgd_update`: per matrix ``(rows, cols)`` its factors ``P`` and ``Q``
    as float32, ``4 r (rows + cols)`` with ``r = min(rank, rows, cols)``; a one-dimensional tensor as float32."""
    total = 0
    for v in update.values():
        if v.ndim < 2:
            total += FLOAT32_BYTES * int(v.numel())
            continue
        rows, cols = as_matrix(v).shape
        total += FLOAT32_BYTES * min(rank, rows, cols) * (rows + cols)
    return total


def round_bytes(defenses: Iterable[object], update: Update) -> int:
    """Bytes a client sends for an update shaped like ``update`` under ``defenses`` (in the order they act): the
    encoding of the last update defense that prices it (``bytes_sent``), else every entry as a float32."""
    priced = [d for d in defenses if getattr(d, "stage", None) == "update" and callable(getattr(d, "bytes_sent", None))]
    return priced[-1].bytes_sent(update) if priced else payload_bytes(update)


# -- defenses -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QuantizeSettings:
    """``bits``: bits per entry, 1 to 16 (``2**bits`` levels); ``stochastic``: QSGD's unbiased random rounding,
    else round to nearest; ``scale``: each tensor's range, ``"max"`` (max |entry|) or ``"norm"`` (its L2 norm, as
    QSGD)."""

    bits: int = 8
    stochastic: bool = True
    scale: str = "max"

    def __post_init__(self) -> None:
        check_setting(
            isinstance(self.bits, int) and not isinstance(self.bits, bool) and 1 <= self.bits <= MAX_BITS,
            f"quantize bits must be a whole number from 1 to {MAX_BITS} (bits sent per entry), got {self.bits!r}: "
            "e.g. quantize:8",
        )
        check_setting(
            self.scale in SCALES,
            f"quantize scale must be 'max' (max |entry|) or 'norm' (L2 norm, as QSGD), got {self.scale!r}: "
            "e.g. quantize:bits=4,scale=norm",
        )


@register_defense
class Quantize(UpdateDefense):
    """k-bit quantisation with QSGD's stochastic rounding (Alistarh et al. 2017): each tensor is sent as one scale
    (float32) and, per entry, the index of one of ``2**bits`` evenly spaced levels from ``-scale`` to ``scale``,
    rounded up or down at random so that the update stays unbiased.

    QSGD itself sends a sign and a magnitude level (zero included) under a variable-length code; this fixed-width
    variant folds the sign into the level index so that an entry costs exactly ``bits`` (``bits=1``: a stochastic
    sign of magnitude ``scale``). No entry is dropped, so an adaptive attack has nothing to mask (not
    ``sparsifies``). One round: no error feedback."""

    name = "quantize"
    summary = "k-bit stochastic quantisation per tensor, unbiased (QSGD, Alistarh et al. 2017)"
    Settings = QuantizeSettings
    primary = "bits"

    def transform(
        self, update: Mapping[str, Tensor], *, client: ClientState, generator: torch.Generator
    ) -> dict[str, Tensor]:
        s = self.settings
        return quantize_update(update, bits=s.bits, stochastic=s.stochastic, scale=s.scale, generator=generator)

    def bytes_sent(self, update: Mapping[str, Tensor]) -> int:
        return quantized_bytes(update, bits=self.settings.bits)


@dataclass(frozen=True)
class PowerSGDSettings:
    """``rank``: rank r of each matrix's approximation; ``power_iterations``: power-iteration steps from a
    Gaussian start (1 in the paper, where a warm start across rounds stands in for more)."""

    rank: int = 2
    power_iterations: int = 1

    def __post_init__(self) -> None:
        check_setting(
            isinstance(self.rank, int) and not isinstance(self.rank, bool) and self.rank >= 1,
            f"powersgd rank must be a whole number >= 1, got {self.rank!r}: e.g. powersgd:2",
        )
        check_setting(
            isinstance(self.power_iterations, int)
            and not isinstance(self.power_iterations, bool)
            and self.power_iterations >= 1,
            f"powersgd power_iterations must be a whole number >= 1, got {self.power_iterations!r}: "
            "e.g. powersgd:rank=2,power_iterations=1",
        )


@register_defense
class PowerSGD(UpdateDefense):
    """PowerSGD (Vogels et al. 2019): every update tensor of two or more dimensions, viewed as a matrix
    ``(out, rest)``, is sent as the factors ``P`` (orthonormalised) and ``Q`` of a rank-r approximation
    ``P Q^T`` found by power iteration from a Gaussian ``Q``; biases and other vectors are sent as they are.

    One round: no error feedback and no warm start, which need the client's state from the rounds before."""

    name = "powersgd"
    summary = "rank-r power-iteration compression of each weight matrix (PowerSGD, Vogels et al. 2019)"
    Settings = PowerSGDSettings
    primary = "rank"

    def transform(
        self, update: Mapping[str, Tensor], *, client: ClientState, generator: torch.Generator
    ) -> dict[str, Tensor]:
        s = self.settings
        return powersgd_update(update, rank=s.rank, power_iterations=s.power_iterations, generator=generator)

    def bytes_sent(self, update: Mapping[str, Tensor]) -> int:
        return powersgd_bytes(update, rank=self.settings.rank)


__all__ = [
    "PowerSGD",
    "PowerSGDSettings",
    "Quantize",
    "QuantizeSettings",
    "as_matrix",
    "low_rank",
    "orthonormal_columns",
    "payload_bytes",
    "powersgd_bytes",
    "powersgd_update",
    "quantize_tensor",
    "quantize_update",
    "quantized_bytes",
    "round_bytes",
]
