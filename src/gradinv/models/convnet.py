"""ConvNet of Inverting Gradients (Geiping, Bauermeister, Dröge & Moeller, NeurIPS 2020; ``inversefed``)."""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from gradinv.errors import ConfigError, ShapeError
from gradinv.models._registry import register_model


class ConvNet(nn.Module):
    """inversefed's ``ConvNet``: eight 3x3 conv-BN-ReLU blocks and two 3x3 max-pools.

    Widths w, 2w, 2w, 4w, 4w, 4w | pool | 4w, 4w | pool, then ``linear`` on ``4w * s * s`` features
    with ``s = image_size // 3 // 3`` (``36 * w`` at 32x32). Parameter names match inversefed
    (``model.conv0.weight`` … ``model.linear.bias``), so its checkpoints load as they are.
    """

    def __init__(self, *, width: int = 64, in_channels: int = 3, num_classes: int = 10, image_size: int = 32) -> None:
        super().__init__()
        if width < 1 or in_channels < 1 or num_classes < 1:
            raise ConfigError(
                f"width, in_channels and num_classes must be positive, got {width}, {in_channels}, {num_classes}"
            )
        side = image_size // 3 // 3
        if side < 1:
            raise ShapeError(f"convnet needs images of at least 9x9 pixels (two 3x3 max-pools), got {image_size}")
        channels = [
            in_channels,
            width,
            2 * width,
            2 * width,
            4 * width,
            4 * width,
            4 * width,
            4 * width,
            4 * width,
        ]
        layers: list[tuple[str, nn.Module]] = []
        for i in range(8):
            layers += [
                (f"conv{i}", nn.Conv2d(channels[i], channels[i + 1], kernel_size=3, padding=1)),
                (f"bn{i}", nn.BatchNorm2d(channels[i + 1])),
                (f"relu{i}", nn.ReLU()),
            ]
            if i == 5:
                layers.append(("pool0", nn.MaxPool2d(3)))
        layers += [
            ("pool1", nn.MaxPool2d(3)),
            ("flatten", nn.Flatten()),
            ("linear", nn.Linear(4 * width * side * side, num_classes)),
        ]
        self.model = nn.Sequential(OrderedDict(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


@register_model(
    "convnet",
    sizes="9 pixels or more",
    min_size=9,
    summary="Inverting Gradients ConvNet, 8 conv-BN-ReLU, width=64 (Geiping et al. 2020)",
)
def _build(*, in_channels: int, num_classes: int, image_size: int, width: int = 64) -> ConvNet:
    return ConvNet(width=width, in_channels=in_channels, num_classes=num_classes, image_size=image_size)
