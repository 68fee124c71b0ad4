"""LeNet variant of Deep Leakage from Gradients (Zhu, Liu & Han, NeurIPS 2019)."""

from __future__ import annotations

import torch
from torch import nn

from gradinv.errors import ConfigError, ShapeError
from gradinv.models._registry import register_model


class LeNet(nn.Module):
    """DLG's LeNet: three 5x5 sigmoid convs (strides 2, 2, 1, 12 channels) and one linear layer.

    As in DLG, every weight and bias is drawn from U(-0.5, 0.5); the classifier is ``fc``
    with ``12 * (H/4) * (W/4)`` inputs (768 at 32x32). ``image_size`` must be a multiple of 4.
    """

    def __init__(self, *, in_channels: int = 3, num_classes: int = 10, image_size: int = 32) -> None:
        super().__init__()
        if in_channels < 1 or num_classes < 1:
            raise ConfigError(f"in_channels and num_classes must be positive, got {in_channels}, {num_classes}")
        if image_size < 4 or image_size % 4:
            raise ShapeError(
                f"lenet needs an image size that is a positive multiple of 4 (e.g. 28, 32, 64), got {image_size}"
            )
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, 12, kernel_size=5, padding=2, stride=2),
            nn.Sigmoid(),
            nn.Conv2d(12, 12, kernel_size=5, padding=2, stride=2),
            nn.Sigmoid(),
            nn.Conv2d(12, 12, kernel_size=5, padding=2, stride=1),
            nn.Sigmoid(),
        )
        self.fc = nn.Linear(12 * (image_size // 4) ** 2, num_classes)
        for param in self.parameters():
            nn.init.uniform_(param, -0.5, 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x).flatten(1))


@register_model(
    "lenet",
    sizes="multiples of 4 (28, 32, 64, ...)",
    summary="DLG LeNet: 3 sigmoid convs + linear, U(-0.5, 0.5) init (Zhu et al. 2019)",
)
def _build(*, in_channels: int, num_classes: int, image_size: int) -> LeNet:
    return LeNet(in_channels=in_channels, num_classes=num_classes, image_size=image_size)
