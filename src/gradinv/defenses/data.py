"""Defenses on the private batch before the client trains: MixUp, InstaHide, pixelisation (survey Table 2,
"Original Data"). The server's ground truth stays the private images: these defenses succeed when what an
attack rebuilds no longer looks like them. All three act on pixels: they refuse token ids (a text model's
integer (B, L) batch) with a one-line error (:meth:`check_inputs`), as mixing or averaging token ids is
meaningless."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from gradinv.defenses import functional as D
from gradinv.defenses.base import ClientBatch, DataDefense, check_setting, register_defense
from gradinv.errors import ConfigError


def refuse_tokens(name: str, inputs: torch.Tensor) -> None:
    """One-line :class:`ConfigError` when ``inputs`` are token ids (not floating point): the pixel defense
    ``name`` cannot act on them."""
    if not (inputs.is_floating_point() or inputs.is_complex()):
        raise ConfigError(
            f"{name} acts on image pixels, but the client's inputs are token ids (dtype {inputs.dtype}, shape "
            f"{tuple(inputs.shape)}): drop {name} for a text model; the update defenses (noise, dpsgd, prune, sign) "
            "apply to any model"
        )


class _PixelDefense(DataDefense):
    """A data defense on image pixels: refuses token inputs."""

    def check_inputs(self, inputs: torch.Tensor) -> None:
        """Refuse, in one line, inputs this defense cannot act on (token ids); the scenario calls it when it is
        built and :meth:`transform` calls it again."""
        refuse_tokens(self.name, inputs)


class _Mixing(_PixelDefense):
    """k-way mixing within the client's batch; subclasses choose the weights and what hides the mix."""

    def _coefficients(self, batch: int, generator: torch.Generator) -> torch.Tensor:
        raise NotImplementedError

    def _hide(self, inputs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return inputs

    def transform(self, batch: ClientBatch, *, generator: torch.Generator) -> ClientBatch:
        self.check_inputs(batch.inputs)
        k, b = self.settings.k, batch.inputs.shape[0]
        if b < k:
            raise ConfigError(
                f"{self.name} mixes each sample with {k - 1} other(s) of the client's batch, which holds {b}: "
                f"use a batch of at least {k} or a smaller k"
            )
        partners = D.mix_partners(b, k, generator=generator)
        coeffs = self._coefficients(b, generator)
        inputs, targets = D.mix(batch.inputs, batch.soft_targets(), partners=partners, coeffs=coeffs)
        return dataclasses.replace(batch, inputs=self._hide(inputs, generator), targets=targets)


@dataclass(frozen=True)
class MixUpSettings:
    """``k``: samples per mixture (2 is MixUp); ``alpha``: Dirichlet / Beta concentration of the weights."""

    k: int = 2
    alpha: float = 1.0

    def __post_init__(self) -> None:
        check_setting(self.k >= 2, f"mixup k must be >= 2, got {self.k}")
        check_setting(self.alpha > 0, f"mixup alpha must be > 0, got {self.alpha}")


@register_defense
class MixUp(_Mixing):
    """MixUp (Zhang et al. 2018) as a defense: each training sample is a convex mix of k samples of the batch
    (weights ~ Dirichlet(alpha), Beta(alpha, alpha) for k = 2), its label the same mix of their labels."""

    name = "mixup"
    summary = "train on convex mixes of k samples and their labels (Zhang et al. 2018)"
    Settings = MixUpSettings
    primary = "k"

    def _coefficients(self, batch: int, generator: torch.Generator) -> torch.Tensor:
        return D.dirichlet_coefficients(batch, self.settings.k, alpha=self.settings.alpha, generator=generator)


@dataclass(frozen=True)
class InstaHideSettings:
    """``k``: samples per mixture; ``upper``: largest weight one sample may get (the paper's 0.65)."""

    k: int = 4
    upper: float = 0.65

    def __post_init__(self) -> None:
        check_setting(self.k >= 2, f"instahide k must be >= 2, got {self.k}")
        check_setting(1 / self.k < self.upper <= 1, f"instahide upper must be in (1/k, 1], got {self.upper}")


@register_defense
class InstaHide(_Mixing):
    """InstaHide, inside-dataset variant (Huang et al. 2020): mix k private samples (weights |N(0,1)|
    normalised, none above ``upper``), then flip each pixel's sign by a one-time random key; labels are mixed
    with the same weights. Pixels are flipped in the normalised (zero-centred) space."""

    name = "instahide"
    summary = "k-mix private samples, then flip pixel signs with a one-time key (Huang et al. 2020)"
    Settings = InstaHideSettings
    primary = "k"

    def _coefficients(self, batch: int, generator: torch.Generator) -> torch.Tensor:
        return D.instahide_coefficients(batch, self.settings.k, upper=self.settings.upper, generator=generator)

    def _hide(self, inputs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return D.random_sign_flip(inputs, generator=generator)[0]


@dataclass(frozen=True)
class PixelateSettings:
    """``block``: cell size in pixels; ``epsilon``: DP-Pix's privacy budget (None: plain pixelisation);
    ``m``: pixels that may differ between neighbouring images (DP-Pix's m)."""

    block: int = 4
    epsilon: float | None = None
    m: int = 16

    def __post_init__(self) -> None:
        check_setting(self.block >= 1, f"pixelate block must be >= 1, got {self.block}")
        check_setting(self.epsilon is None or self.epsilon > 0, f"pixelate epsilon must be > 0, got {self.epsilon}")
        check_setting(self.m >= 1, f"pixelate m must be >= 1, got {self.m}")


@register_defense
class Pixelate(_PixelDefense):
    """Pixelisation (Fan 2018, 2019): each block x block cell becomes its mean; with ``epsilon``, DP-Pix adds
    Laplace noise of scale m / (block^2 epsilon) to each cell. Acts on the images in [0, 1]."""

    name = "pixelate"
    summary = "average block x block cells, optionally DP-Pix's Laplace noise (Fan 2018)"
    Settings = PixelateSettings
    primary = "block"

    def check_input_shape(self, input_shape: tuple[int, ...]) -> None:
        """Refuse, in one line, images this defense cannot act on: ``input_shape`` is one sample's
        ``(C, H, W)`` (or a batch's ``(B, C, H, W)``); a block larger than the image is an error, not a blur.
        Call it where the image size is first known; :meth:`transform` calls it too."""
        shape = tuple(int(d) for d in input_shape)
        if len(shape) not in (3, 4):
            raise ConfigError(f"pixelate needs images (C, H, W), got shape {shape}: use it on image data")
        side = min(shape[-2:])
        if self.settings.block > side:
            raise ConfigError(
                f"pixelate block {self.settings.block} is larger than the {shape[-2]}x{shape[-1]} images: use a "
                f"block of at most {side} (e.g. pixelate:{max(1, side // 8)})"
            )

    def transform(self, batch: ClientBatch, *, generator: torch.Generator) -> ClientBatch:
        s = self.settings
        self.check_inputs(batch.inputs)
        if batch.inputs.ndim != 4:
            raise ConfigError(f"pixelate needs images (B, C, H, W), got shape {tuple(batch.inputs.shape)}")
        self.check_input_shape(tuple(batch.inputs.shape))
        images = batch.normalization.denormalize(batch.inputs).clamp(0, 1)
        if s.epsilon is None:
            out = D.pixelate(images, block=s.block)
        else:
            out = D.dp_pixelate(images, block=s.block, epsilon=s.epsilon, m=s.m, generator=generator)
        return dataclasses.replace(batch, inputs=batch.normalization.normalize(out))
