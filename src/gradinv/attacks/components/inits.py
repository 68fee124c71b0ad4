"""Initialisations of the dummy data an iterative attack starts from (survey Table 1, "initialisation").

Each is ``init(shape, *, generator, bounds, scale) -> Tensor`` in the model's (normalised) input space, drawn on
the CPU from the seeded generator so a seed gives the same start on any device. ``shape`` is
``(restarts, batch, *input_shape)``; ``bounds`` are the per-channel limits of valid images when the
normalisation is known (see :func:`gradinv.attacks.components.replay.box_bounds`), else ``None``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

Bounds = tuple[Tensor, Tensor] | None
Init = Callable[..., Tensor]


def _image_space(u: Tensor, bounds: Bounds) -> Tensor:
    """Values ``u`` in [0, 1] (image space) mapped into the normalised input space (identity if unknown)."""
    if bounds is None:
        return u
    low, high = (b.to(u.device) for b in bounds)
    return low + u * (high - low)


def gaussian(
    shape: tuple[int, ...], *, generator: torch.Generator, bounds: Bounds = None, scale: float = 1.0
) -> Tensor:
    """Standard normal noise times ``scale`` (DLG, Zhu et al. 2019; Inverting Gradients, Geiping et al. 2020)."""
    return scale * torch.randn(shape, generator=generator)


def uniform(shape: tuple[int, ...], *, generator: torch.Generator, bounds: Bounds = None, scale: float = 1.0) -> Tensor:
    """Uniform noise over valid images (over [-scale, scale] when the normalisation is unknown)."""
    u = torch.rand(shape, generator=generator)
    return _image_space(u, bounds) if bounds is not None else scale * (2 * u - 1)


def constant(
    shape: tuple[int, ...], *, generator: torch.Generator, bounds: Bounds = None, scale: float = 0.5
) -> Tensor:
    """Every pixel the same value: ``scale`` in image space (SAPAG, Wang et al. 2020, start from a constant
    image, 0.5 grey by default); the seed is not used, so restarts differ only through the optimiser."""
    return _image_space(torch.full(shape, float(scale)), bounds) if bounds is not None else torch.full(shape, scale)


def pattern(shape: tuple[int, ...], *, generator: torch.Generator, bounds: Bounds = None, scale: float = 4) -> Tensor:
    """A patterned random seed (Wei et al. 2020, Sec. 4.1): a random ``scale`` x ``scale`` patch in image space,
    tiled over the image. CPL's code tiles a half-size patch 2 x 2 (the ``cpl`` preset sets that size); the
    4-pixel default here is a finer pattern."""
    side = max(1, int(scale))
    *lead, h, w = shape
    patch = torch.rand((*lead, side, side), generator=generator)
    tiled = patch.repeat(*([1] * len(lead)), -(-h // side), -(-w // side))[..., :h, :w]
    return _image_space(tiled.contiguous(), bounds) if bounds is not None else 2 * tiled - 1


#: name -> initialisation; ``scale`` is each one's single number (noise scale, grey level, patch side)
INITS: dict[str, Init] = {"gaussian": gaussian, "uniform": uniform, "constant": constant, "pattern": pattern}
#: the ``scale`` each initialisation uses when a preset gives none
INIT_SCALES: dict[str, float] = {"gaussian": 1.0, "uniform": 1.0, "constant": 0.5, "pattern": 4.0}
