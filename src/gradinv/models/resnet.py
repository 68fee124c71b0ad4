"""CIFAR-style ResNets (He, Zhang, Ren & Sun, CVPR 2016) with BatchNorm.

``resnet18`` is the 4-stage ImageNet design adapted to 32x32 inputs (3x3 stride-1 stem, no max-pool),
as used by Inverting Gradients (Geiping et al. 2020); ``resnet20``/``resnet32`` are the 3-stage
16/32/64-channel CIFAR networks of He et al. §4.2, here with 1x1 projection shortcuts (option B).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from gradinv.errors import ConfigError
from gradinv.models._registry import register_model


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity or 1x1 conv-BN (option B) shortcut."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """Stem 3x3 conv-BN-ReLU (stride 1), stages of basic blocks, global average pool, ``fc``.

    Any image size of at least 1 pixel works (adaptive pooling).
    """

    def __init__(
        self,
        *,
        blocks: Sequence[int],
        widths: Sequence[int],
        in_channels: int = 3,
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        if in_channels < 1 or num_classes < 1:
            raise ConfigError(f"in_channels and num_classes must be positive, got {in_channels}, {num_classes}")
        if len(blocks) != len(widths) or not blocks:
            raise ConfigError(f"blocks {tuple(blocks)} and widths {tuple(widths)} must be equally long")
        self.conv1 = nn.Conv2d(in_channels, widths[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        in_planes = widths[0]
        stages = []
        for i, (n, planes) in enumerate(zip(blocks, widths, strict=True)):
            stage = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                stage.append(BasicBlock(in_planes, planes, stride))
                in_planes = planes
            stages.append(nn.Sequential(*stage))
        # layer1 … layerN, as in torchvision.
        for i, stage in enumerate(stages, start=1):
            self.add_module(f"layer{i}", stage)
        self.num_stages = len(stages)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        for i in range(1, self.num_stages + 1):
            x = getattr(self, f"layer{i}")(x)
        return self.fc(self.avgpool(x).flatten(1))


def resnet18(*, in_channels: int = 3, num_classes: int = 10) -> ResNet:
    """ResNet-18 for 32x32 inputs: BasicBlock x [2, 2, 2, 2], widths 64-512, 11.2M parameters."""
    return ResNet(blocks=(2, 2, 2, 2), widths=(64, 128, 256, 512), in_channels=in_channels, num_classes=num_classes)


def resnet20(*, in_channels: int = 3, num_classes: int = 10) -> ResNet:
    """ResNet-20 of He et al. (2016), CIFAR variant: 3 stages of 3 blocks, widths 16/32/64."""
    return ResNet(blocks=(3, 3, 3), widths=(16, 32, 64), in_channels=in_channels, num_classes=num_classes)


def resnet32(*, in_channels: int = 3, num_classes: int = 10) -> ResNet:
    """ResNet-32 of He et al. (2016), CIFAR variant: 3 stages of 5 blocks, widths 16/32/64."""
    return ResNet(blocks=(5, 5, 5), widths=(16, 32, 64), in_channels=in_channels, num_classes=num_classes)


@register_model("resnet18", summary="ResNet-18, CIFAR stem (3x3, stride 1, no max-pool), BatchNorm")
def _build_resnet18(*, in_channels: int, num_classes: int, image_size: int) -> ResNet:
    return resnet18(in_channels=in_channels, num_classes=num_classes)


@register_model("resnet20", summary="ResNet-20, CIFAR variant of He et al. 2016 (16/32/64 channels)")
def _build_resnet20(*, in_channels: int, num_classes: int, image_size: int) -> ResNet:
    return resnet20(in_channels=in_channels, num_classes=num_classes)


@register_model("resnet32", summary="ResNet-32, CIFAR variant of He et al. 2016 (16/32/64 channels)")
def _build_resnet32(*, in_channels: int, num_classes: int, image_size: int) -> ResNet:
    return resnet32(in_channels=in_channels, num_classes=num_classes)
