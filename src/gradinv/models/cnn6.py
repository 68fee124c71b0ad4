"""CNN6 of R-GAP (Zhu & Blaschko, "R-GAP: Recursive Gradient Attack on Privacy", ICLR 2021)."""

from __future__ import annotations

import torch
from torch import nn

from gradinv.errors import ConfigError
from gradinv.models._registry import register_model

# (in, out, kernel, stride, padding) for each bias-free conv; ``None`` stands for the input channels.
_CONVS: tuple[tuple[int | None, int, int, int, int], ...] = (
    (None, 12, 4, 2, 2),
    (12, 36, 3, 2, 1),
    (36, 36, 3, 1, 1),
    (36, 36, 3, 1, 1),
    (36, 64, 3, 2, 1),
    (64, 128, 3, 1, 1),
)


DEFAULT_CHANNELS = tuple(c[1] for c in _CONVS)


def cnn6_feature_side(image_size: int) -> int:
    """Spatial side of CNN6's last feature map for a square input (5 at 32x32)."""
    side = image_size
    for _, _, k, s, p in _CONVS:
        side = (side + 2 * p - k) // s + 1
    return side


class CNN6(nn.Module):
    """Six bias-free convs, each followed by LeakyReLU(0.2) (or sigmoid), then ``fc`` with a bias.

    ``fc`` takes ``128 * s * s`` features, 3200 at 32x32 (s = 5).
    """

    def __init__(
        self,
        *,
        in_channels: int = 3,
        num_classes: int = 10,
        image_size: int = 32,
        activation: str = "leaky_relu",
        channels: tuple[int, ...] = DEFAULT_CHANNELS,
    ) -> None:
        super().__init__()
        channels = tuple(int(c) for c in channels)
        if len(channels) != len(_CONVS) or any(c < 1 for c in channels):
            raise ConfigError(f"cnn6 needs {len(_CONVS)} positive channel counts, got {channels}")
        if in_channels < 1 or num_classes < 1:
            raise ConfigError(f"in_channels and num_classes must be positive, got {in_channels}, {num_classes}")
        if activation not in ("leaky_relu", "sigmoid"):
            raise ConfigError(f"cnn6 activation must be 'leaky_relu' or 'sigmoid', got {activation!r}")
        layers: list[nn.Module] = []
        widths = (in_channels, *channels)
        for i, (_, _, k, s, p) in enumerate(_CONVS):
            conv = nn.Conv2d(widths[i], widths[i + 1], k, stride=s, padding=p, bias=False)
            act = nn.LeakyReLU(0.2) if activation == "leaky_relu" else nn.Sigmoid()
            layers += [conv, act]
        self.body = nn.Sequential(*layers)
        side = cnn6_feature_side(image_size)
        self.fc = nn.Linear(channels[-1] * side * side, num_classes, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x).flatten(1))


@register_model("cnn6", summary="R-GAP CNN6: 6 bias-free convs, LeakyReLU(0.2), linear (Zhu & Blaschko 2021)")
def _build(
    *,
    in_channels: int,
    num_classes: int,
    image_size: int,
    activation: str = "leaky_relu",
    channels: tuple[int, ...] = DEFAULT_CHANNELS,
) -> CNN6:
    return CNN6(
        in_channels=in_channels,
        num_classes=num_classes,
        image_size=image_size,
        activation=activation,
        channels=channels,
    )
