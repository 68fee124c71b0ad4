"""Image priors added to the gradient-matching objective."""

from __future__ import annotations

from torch import Tensor


def total_variation(x: Tensor) -> Tensor:
    """Anisotropic total variation: mean absolute difference of neighbouring pixels (Rudin et al. 1992),
    as used by Inverting Gradients (Geiping et al. 2020). ``x`` is (..., H, W)."""
    dx = (x[..., :, 1:] - x[..., :, :-1]).abs().mean()
    dy = (x[..., 1:, :] - x[..., :-1, :]).abs().mean()
    return dx + dy
