"""Per-sample image quality metrics: MSE, PSNR and SSIM.

All functions take two image batches of shape ``(B, C, H, W)`` with values in ``[0, data_range]`` and
return a tensor of shape ``(B,)`` with one score per sample. Computations run in float64; the result is cast
back to the inputs' floating dtype (float64 for integer inputs). The functions are differentiable with
respect to both inputs, so they can also serve as losses.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from gradinv.errors import ShapeError

__all__ = ["mse", "psnr", "ssim", "MSE_FLOOR"]

#: Lower bound on the MSE inside :func:`psnr`: identical images get ``10*log10(range**2 / 1e-20)`` (200 dB for
#: ``data_range=1``), a large finite number instead of ``inf``, so means over a batch stay finite.
MSE_FLOOR = 1e-20

_K1 = 0.01
_K2 = 0.03


def _check_pair(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, torch.dtype]:
    """Validate two ``(B, C, H, W)`` batches, return them in float64 and the dtype to return scores in."""
    if not isinstance(x, Tensor) or not isinstance(y, Tensor):
        raise ShapeError(f"expected two torch tensors, got {type(x).__name__} and {type(y).__name__}")
    if x.ndim != 4 or y.ndim != 4:
        raise ShapeError(
            f"expected image batches of shape (B, C, H, W), got shapes {tuple(x.shape)} and "
            f"{tuple(y.shape)}; add a batch dimension with x[None] for a single image"
        )
    if x.shape != y.shape:
        raise ShapeError(f"image batches differ in shape: {tuple(x.shape)} vs {tuple(y.shape)}")
    out_dtype = x.dtype if x.is_floating_point() else torch.float64
    return x.to(torch.float64), y.to(device=x.device, dtype=torch.float64), out_dtype


def mse(x: Tensor, y: Tensor) -> Tensor:
    """Mean squared error per sample, averaged over channels and pixels; shape ``(B,)``."""
    x64, y64, out_dtype = _check_pair(x, y)
    return (x64 - y64).square().mean(dim=(1, 2, 3)).to(out_dtype)


def psnr(x: Tensor, y: Tensor, *, data_range: float = 1.0) -> Tensor:
    """Peak signal-to-noise ratio per sample in dB: ``10 * log10(data_range**2 / mse)``; shape ``(B,)``.

    The MSE is floored at :data:`MSE_FLOOR` (1e-20), so identical images give a large finite value (200 dB for
    ``data_range=1``) rather than ``inf``. PSNR is computed per sample and never from the batch-mean MSE.
    """
    x64, y64, out_dtype = _check_pair(x, y)
    err = (x64 - y64).square().mean(dim=(1, 2, 3)).clamp_min(MSE_FLOOR)
    return (10.0 * torch.log10(float(data_range) ** 2 / err)).to(out_dtype)


def _gaussian_window(size: int, sigma: float, device: torch.device) -> Tensor:
    """Normalised 1-D Gaussian of ``size`` taps (odd) and standard deviation ``sigma``, float64."""
    coords = torch.arange(size, dtype=torch.float64, device=device) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2.0 * sigma**2))
    return g / g.sum()


def ssim(
    x: Tensor,
    y: Tensor,
    *,
    data_range: float = 1.0,
    window_size: int = 11,
    sigma: float = 1.5,
) -> Tensor:
    """Structural similarity (Wang et al. 2004, IEEE TIP 13(4)) per sample; shape ``(B,)``.

    Local means, variances and the covariance are taken under a ``window_size`` x ``window_size`` Gaussian
    window (standard deviation ``sigma``, population statistics), with ``K1 = 0.01`` and ``K2 = 0.03``. The
    SSIM map is computed per channel by a depthwise, separable convolution with *valid* padding (no border
    effects), averaged over the map and then over channels. With the defaults this equals
    ``skimage.metrics.structural_similarity(..., gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False, data_range=1, channel_axis=0)``.

    For images smaller than the window, the window shrinks to the largest odd size that fits
    (``min(H, W)``, minus one if even) while ``sigma`` stays the same (a truncated Gaussian); a 1x1 image
    thus compares single pixels.
    """
    x64, y64, out_dtype = _check_pair(x, y)
    if window_size < 1 or window_size % 2 == 0:
        raise ShapeError(f"window_size must be a positive odd integer, got {window_size}")
    if sigma <= 0:
        raise ShapeError(f"sigma must be positive, got {sigma}")
    b, c, h, w = x64.shape
    if b == 0:
        return torch.zeros(0, dtype=out_dtype, device=x.device)
    if h == 0 or w == 0:
        raise ShapeError(f"images have no pixels: shape {tuple(x.shape)}")
    size = min(window_size, h, w)
    if size % 2 == 0:
        size -= 1
    g = _gaussian_window(size, float(sigma), x64.device)
    # Separable depthwise filter: one row and one column pass per channel, valid padding.
    g_row = g.view(1, 1, 1, size).repeat(5 * c, 1, 1, 1)
    g_col = g.view(1, 1, size, 1).repeat(5 * c, 1, 1, 1)
    stack = torch.cat([x64, y64, x64 * x64, y64 * y64, x64 * y64], dim=1)
    filtered = F.conv2d(F.conv2d(stack, g_row, groups=5 * c), g_col, groups=5 * c)
    mu_x, mu_y, e_xx, e_yy, e_xy = filtered.split(c, dim=1)
    var_x = e_xx - mu_x * mu_x
    var_y = e_yy - mu_y * mu_y
    cov_xy = e_xy - mu_x * mu_y
    c1 = (_K1 * float(data_range)) ** 2
    c2 = (_K2 * float(data_range)) ** 2
    num = (2.0 * mu_x * mu_y + c1) * (2.0 * cov_xy + c2)
    den = (mu_x * mu_x + mu_y * mu_y + c1) * (var_x + var_y + c2)
    ssim_map = num / den
    return ssim_map.mean(dim=(2, 3)).mean(dim=1).to(out_dtype)
