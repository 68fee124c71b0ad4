"""Small image transforms on tensors: centre-crop + resize, and channel conversion."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from gradinv.errors import ConfigError, DataError

#: ITU-R BT.601 luma weights for R, G, B.
LUMA_WEIGHTS = (0.299, 0.587, 0.114)


def _check_image_tensor(images: Tensor, what: str) -> None:
    if not isinstance(images, Tensor) or images.dim() not in (3, 4):
        raise DataError(
            f"{what} expects a (C,H,W) or (N,C,H,W) tensor, got "
            f"{tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__}"
        )


def center_crop_resize(img: Tensor, size: int, *, antialias: bool = True) -> Tensor:
    """Crop the largest centred square and resize it to ``size`` x ``size`` (bilinear).

    Accepts ``(C,H,W)`` or ``(N,C,H,W)``; integer inputs are converted to float32 (values kept).
    """
    _check_image_tensor(img, "center_crop_resize")
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ConfigError(f"image size must be a positive integer, got {size!r}")
    if not img.is_floating_point():
        img = img.to(torch.float32)
    h, w = img.shape[-2:]
    side = min(h, w)
    if side == 0:
        raise DataError(f"cannot resize an empty image of shape {tuple(img.shape)}")
    top, left = (h - side) // 2, (w - side) // 2
    img = img[..., top : top + side, left : left + side]
    if side == size:
        return img.contiguous()
    batched = img.dim() == 4
    x = img if batched else img.unsqueeze(0)
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=antialias)
    return x if batched else x.squeeze(0)


def to_channels(images: Tensor, channels: int) -> Tensor:
    """Convert ``(C,H,W)``/``(N,C,H,W)`` images to ``channels``: grey→RGB repeats, RGB→grey uses luma."""
    _check_image_tensor(images, "to_channels")
    if channels not in (1, 3):
        raise ConfigError(f"channels must be 1 (grey) or 3 (RGB), got {channels!r}")
    have = images.shape[-3]
    if have == channels:
        return images
    if have == 1 and channels == 3:
        reps = (3, 1, 1) if images.dim() == 3 else (1, 3, 1, 1)
        return images.repeat(*reps)
    if have == 3 and channels == 1:
        x = images if images.is_floating_point() else images.to(torch.float32)
        r, g, b = (x.narrow(-3, i, 1) for i in range(3))  # one channel at a time: no 3-channel temporary
        return (r * LUMA_WEIGHTS[0]).add_(g, alpha=LUMA_WEIGHTS[1]).add_(b, alpha=LUMA_WEIGHTS[2])
    raise DataError(
        f"cannot convert images with {have} channels to {channels}: only grey (1) and RGB (3) images are "
        "supported; drop the extra channels (e.g. alpha) first"
    )
