"""Malicious servers: the server changes the model before sending it so that the client's update reveals
its data verbatim (the "malicious server" threat model).

Two constructions, each with its attack in :mod:`gradinv.attacks.imprint`:

- :class:`ImprintServer`, Robbing the Fed (Fowl, Geiping, Czaja, Goldblum, Goldstein 2022, "Robbing the
  Fed: Directly Obtaining Private Data in Federated Learning with Modified Models", ICLR). An *imprint
  block* is put in front of the model. Its first layer has ``bins`` rows that all equal one unit measurement
  vector ``m`` and biases ``-c_k``, with thresholds ``c_0 < c_1 < ... `` at the quantiles ``k / bins`` of
  the distribution of ``s = <m, x>``, so that ``h_k = relu(<m, x> - c_k)`` is active iff ``s > c_k``. Its
  gradient rows are cumulative sums, ``dL/dW_k = sum_{n: s_n > c_k} g_n x_n`` and ``dL/db_k = sum_{n: s_n >
  c_k} g_n``, and a sample alone in the bin ``(c_k, c_{k+1}]`` is
  ``x = (dW_k - dW_{k+1}) / (db_k - db_{k+1})``.
- :class:`TrapWeightsServer`, trap weights (Boenisch, Dziedzic, Schuster, Shamsabadi, Shumailov, Papernot
  2023, "When the Curious Abandon Honesty: Federated Learning Is Not Private", EuroS&P). The first fully
  connected layer gets rows whose pixel weights are half positive and half negative, the negative half
  scaled by ``s`` slightly above 1, so that ``<w, p>`` on non-negative pixels ``p`` is negative for most
  images: a row that a single sample activates gives that sample as ``dW_r / db_r``.

Both return a new module and never change the model they are given. Where a block is added in front of the
model (all of Robbing the Fed; trap weights on a model whose first layer is not fully connected), it is
*residual*: ``out = x + W2 relu(W1 x + b1) + b2`` with every column of ``W2`` equal and ``b2`` removing the
expected value of the added term, so the original model sees its input plus a small per-sample constant
image (``shift`` times a term of the order of the measurement's spread; ``shift = 1e-3`` by default): the model
keeps working as sent. Equal columns make ``dL/dh_k`` the same for every row of one sample, which is what the
bin differences need. As in the authors' implementation (breaching), the imprint rows are scaled down by
``gain`` (``W1 = gain m``, ``b1 = -gain c``) and ``W2`` up by ``1 / gain``: the function is the same, but a
FedAvg weight delta of these rows is then large against the rows themselves and survives float32 rounding.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import ClassVar

import torch
from torch import Tensor, nn

from gradinv.errors import ConfigError, ShapeError
from gradinv.registry import SERVERS, suggestion
from gradinv.types import Normalization

__all__ = [
    "MEASUREMENTS",
    "SERVERS",
    "ImprintBlock",
    "ImprintServer",
    "ImprintedModel",
    "TrapWeightsServer",
    "TrappedModel",
    "parse_server",
]

#: Measurement vectors of :class:`ImprintServer`: a fixed random Gaussian direction, or the pixel average.
MEASUREMENTS = ("random", "mean")
_DISTRIBUTIONS = ("gaussian", "laplace")
#: The lowest threshold sits this many scales below the centre: every sample activates the first row.
_FLOOR_SCALES = 20.0


# -- modules -----------------------------------------------------------------------------------------------


class ImprintBlock(nn.Module):
    """Residual block on the flattened input: ``x + restore(relu(measure(x)))``, reshaped like ``x``.

    ``measure`` is ``Linear(D, width)`` (the rows the attacks read), ``restore`` is ``Linear(width, D)``.
    """

    def __init__(self, in_features: int, width: int) -> None:
        super().__init__()
        self.in_features = int(in_features)
        self.measure = nn.Linear(self.in_features, int(width))
        self.restore = nn.Linear(int(width), self.in_features)

    def forward(self, x: Tensor) -> Tensor:
        flat = x.flatten(1)
        if flat.shape[1] != self.in_features:
            raise ShapeError(
                f"the malicious block was built for {self.in_features} input features, got {flat.shape[1]}: "
                "give the server the client's input_shape"
            )
        return (flat + self.restore(torch.relu(self.measure(flat)))).reshape(x.shape)


class ImprintedModel(nn.Module):
    """The model as a Robbing-the-Fed server sends it: ``model(imprint(x))``.

    ``input_shape`` is the shape of one input the server built the block for (``None``: flat only).
    """

    def __init__(self, imprint: ImprintBlock, model: nn.Module, *, input_shape: tuple[int, ...] | None) -> None:
        super().__init__()
        self.imprint = imprint
        self.model = model
        self.input_shape = input_shape

    def forward(self, x: Tensor) -> Tensor:
        return self.model(self.imprint(x))


class TrappedModel(nn.Module):
    """The model as a trap-weights server sends it: the original model (with its first fully connected layer
    trapped) or ``model(trap(x))`` with an added trap block; ``trap_layer`` names the trapped ``nn.Linear``."""

    def __init__(
        self,
        model: nn.Module,
        *,
        trap_layer: str,
        trap: ImprintBlock | None = None,
        input_shape: tuple[int, ...] | None = None,
    ) -> None:
        super().__init__()
        if trap is not None:
            self.trap = trap
        self.model = model
        self.trap_layer = trap_layer
        self.input_shape = input_shape

    def forward(self, x: Tensor) -> Tensor:
        trap = getattr(self, "trap", None)
        return self.model(x if trap is None else trap(x))


# -- helpers -----------------------------------------------------------------------------------------------


def _first_layer(model: nn.Module) -> tuple[str, nn.Module] | None:
    for name, module in model.named_modules():
        if any(True for _ in module.parameters(recurse=False)):
            return name, module
    return None


def _reference(model: nn.Module) -> tuple[torch.dtype, torch.device]:
    p = next(model.parameters(), None)
    return (p.dtype, p.device) if p is not None else (torch.float32, torch.device("cpu"))


def _check_shape(input_shape: tuple[int, ...] | None) -> tuple[int, ...] | None:
    if input_shape is None:
        return None
    shape = tuple(int(s) for s in input_shape)
    if not shape or any(s < 1 for s in shape):
        raise ConfigError(f"input_shape must be positive sizes such as (3, 32, 32), got {input_shape!r}")
    return shape


def _check_auxiliary(auxiliary: Tensor | None, input_shape: tuple[int, ...] | None) -> None:
    if auxiliary is None:
        return
    if not isinstance(auxiliary, Tensor) or auxiliary.ndim < 2 or auxiliary.shape[0] < 2:
        raise ConfigError(
            "auxiliary must be a batch of at least 2 normalised inputs (N, *input_shape) from the client's "
            f"data distribution, got {getattr(auxiliary, 'shape', type(auxiliary).__name__)}"
        )
    if input_shape is not None and tuple(auxiliary.shape[1:]) != input_shape:
        raise ConfigError(
            f"auxiliary inputs have shape {tuple(auxiliary.shape[1:])} but input_shape is {input_shape}: "
            "give inputs shaped like the client's"
        )


def _input_shape(
    server: str, model: nn.Module, input_shape: tuple[int, ...] | None, auxiliary: Tensor | None
) -> tuple[int, ...]:
    """The shape of one input: given, from the auxiliary inputs, or ``(D,)`` from a fully connected first layer."""
    if input_shape is not None:
        return input_shape
    if auxiliary is not None:
        return tuple(int(s) for s in auxiliary.shape[1:])
    first = _first_layer(model)
    if first is not None and isinstance(first[1], nn.Linear):
        return (int(first[1].in_features),)
    kind = type(first[1]).__name__ if first is not None else "no layer with parameters"
    raise ConfigError(
        f"{server} cannot tell the input size of a {type(model).__name__} (its first layer is {kind}): give "
        "input_shape=(C, H, W) or auxiliary inputs"
    )


def _channel_vectors(normalization: Normalization, features: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Per-feature mean and std of a channel-major flattened input (``C * H * W`` features)."""
    c = normalization.channels
    if features % c:
        raise ConfigError(
            f"the normalization has {c} channels but the input has {features} features, not a multiple: give "
            "the client's normalization"
        )
    per = features // c
    mean = torch.tensor(normalization.mean, dtype=dtype).repeat_interleave(per)
    std = torch.tensor(normalization.std, dtype=dtype).repeat_interleave(per)
    return mean, std


def _residual_restore(block: ImprintBlock, *, weight: float, offset: float) -> None:
    """Every entry of ``restore.weight`` is ``weight``; its bias removes ``weight * offset`` (``offset = E[sum h]``)."""
    block.restore.weight.fill_(weight)
    block.restore.bias.fill_(-weight * offset)


# -- Robbing the Fed ---------------------------------------------------------------------------------------


@SERVERS.register
@dataclass(frozen=True, eq=False)
class ImprintServer:
    """Robbing the Fed (Fowl et al. 2022): prepend an imprint block with ``bins`` bins.

    The measurement is ``m`` of unit norm: ``"random"`` (a Gaussian direction drawn from ``seed``) or
    ``"mean"`` (``1 / sqrt(D)``, the pixel average up to scale). The distribution of ``s = <m, x>`` over
    normalised inputs is a ``distribution`` (``"gaussian"`` or ``"laplace"``) with centre ``loc`` and scale
    ``scale``: given, else fitted to ``auxiliary`` (normalised inputs of the client's data distribution the
    server holds: mean and std, or median and mean absolute deviation), else ``N(0, 1)``, the value for
    standardised, independent pixels (pixels of real images are correlated: fit it when you can). The
    thresholds are ``c_k = F^-1(k / bins)`` for ``k >= 1`` and ``c_0 = loc - 20 scale``, so the ``bins`` bins
    hold equal probability. ``input_shape`` (one input, e.g. ``(3, 32, 32)``) is needed unless the auxiliary
    inputs or a fully connected first layer tell it. ``gain`` scales the imprint rows and ``shift`` the change
    the original model sees (module docstring). Spec: ``imprint:BINS`` or ``imprint:KEY=VALUE,...``
    (:func:`parse_server`).
    """

    name: ClassVar[str] = "imprint"
    primary: ClassVar[str] = "bins"

    bins: int = field(default=128, metadata={"expects": "an integer >= 2"})
    measurement: str = "random"
    seed: int = 0
    distribution: str = "gaussian"
    loc: float | None = None
    scale: float | None = None
    input_shape: tuple[int, ...] | None = None
    auxiliary: Tensor | None = field(default=None, repr=False)
    gain: float = 1e-3
    shift: float = 1e-3

    def __post_init__(self) -> None:
        if isinstance(self.bins, bool) or not isinstance(self.bins, int) or self.bins < 2:
            raise ConfigError(f"an imprint server needs an integer number of bins >= 2, got {self.bins!r}")
        if self.measurement not in MEASUREMENTS:
            raise ConfigError(
                f"unknown imprint measurement {self.measurement!r}: choose one of {', '.join(MEASUREMENTS)}"
            )
        if self.distribution not in _DISTRIBUTIONS:
            raise ConfigError(f"unknown distribution {self.distribution!r}: choose one of {', '.join(_DISTRIBUTIONS)}")
        if self.scale is not None and not self.scale > 0:
            raise ConfigError(f"the measurement's scale must be positive, got {self.scale}")
        if not self.gain > 0 or not self.shift > 0:
            raise ConfigError(f"gain and shift must be positive, got gain={self.gain} and shift={self.shift}")
        object.__setattr__(self, "input_shape", _check_shape(self.input_shape))
        _check_auxiliary(self.auxiliary, self.input_shape)

    def spec(self) -> str:
        """This server as a spec (its settings, not its runtime input shape or auxiliary data)."""
        return SERVERS.spec(self)

    def measurement_vector(self, features: int) -> Tensor:
        """The unit measurement vector ``m`` for ``features`` input features (float64)."""
        if self.measurement == "mean":
            return torch.full((features,), 1.0 / math.sqrt(features), dtype=torch.float64)
        m = torch.randn(features, generator=torch.Generator().manual_seed(self.seed), dtype=torch.float64)
        return m / m.norm()

    def fit(self, m: Tensor) -> tuple[float, float]:
        """Centre and scale of ``<m, x>``: the given ones, else fitted to the auxiliary inputs, else (0, 1)."""
        loc, scale = 0.0, 1.0
        if self.auxiliary is not None:
            s = self.auxiliary.detach().flatten(1).to(torch.float64) @ m
            if self.distribution == "gaussian":
                loc, scale = float(s.mean()), float(s.std())
            else:  # Laplace maximum likelihood: median and mean absolute deviation from it
                loc = float(s.median())
                scale = float((s - loc).abs().mean())
            if not scale > 0:
                raise ConfigError("the auxiliary inputs all have the same measurement: give varied inputs")
        return (loc if self.loc is None else float(self.loc)), (scale if self.scale is None else float(self.scale))

    def _quantile(self, q: Tensor, loc: float, scale: float) -> Tensor:
        if self.distribution == "gaussian":
            dist = NormalDist(loc, scale)
            return torch.tensor([dist.inv_cdf(float(p)) for p in q], dtype=torch.float64)
        centred = q - 0.5
        return loc - scale * torch.sign(centred) * torch.log1p(-2 * centred.abs())

    def thresholds(self, loc: float, scale: float) -> Tensor:
        """``c_0 = loc - 20 scale`` and ``c_k = F^-1(k / bins)`` for ``k = 1 .. bins - 1`` (float64, increasing)."""
        q = torch.arange(1, self.bins, dtype=torch.float64) / self.bins
        return torch.cat(
            [torch.tensor([loc - _FLOOR_SCALES * scale], dtype=torch.float64), self._quantile(q, loc, scale)]
        )

    def expected_activation(self, c: Tensor, loc: float, scale: float) -> float:
        """``E[sum_k relu(s - c_k)]`` under the fitted distribution (midpoint rule on 4,096 quantiles)."""
        q = (torch.arange(4096, dtype=torch.float64) + 0.5) / 4096
        s = self._quantile(q, loc, scale)
        return float(torch.relu(s[:, None] - c[None, :]).sum(1).mean())

    def modify(self, model: nn.Module) -> nn.Module:
        """A new :class:`ImprintedModel` wrapping a copy of ``model``; ``model`` itself is left unchanged."""
        shape = _input_shape("an imprint server", model, self.input_shape, self.auxiliary)
        features = math.prod(shape)
        if self.auxiliary is not None and math.prod(self.auxiliary.shape[1:]) != features:
            raise ConfigError(
                f"auxiliary inputs have {math.prod(self.auxiliary.shape[1:])} features, the model takes {features}"
            )
        m = self.measurement_vector(features)
        loc, scale = self.fit(m)
        c = self.thresholds(loc, scale)
        dtype, device = _reference(model)
        block = ImprintBlock(features, self.bins)
        with torch.no_grad():
            block.measure.weight.copy_(self.gain * m.expand(self.bins, features))
            block.measure.bias.copy_(-self.gain * c)
            offset = self.gain * self.expected_activation(c, loc, scale)
            _residual_restore(block, weight=self.shift / (self.gain * self.bins), offset=offset)
        block = block.to(dtype=dtype, device=device)
        return ImprintedModel(block, copy.deepcopy(model), input_shape=shape if len(shape) > 1 else None)


# -- trap weights ------------------------------------------------------------------------------------------


@SERVERS.register
@dataclass(frozen=True, eq=False)
class TrapWeightsServer:
    """Trap weights (Boenisch et al. 2023) on the first fully connected layer.

    Each row ``w`` is drawn as ``|w_i| ~ U(0, 1/sqrt(D))``; a random half of its entries is made negative and
    multiplied by ``scale`` (the paper's ``s``, slightly above 1), so that ``z = <w, p> = P - s N`` (``P``,
    ``N``: the positive and negative parts on pixels ``p >= 0``) is negative for most images. The weights
    act on pixels in ``[0, 1]``: with the client's ``normalization`` (``x = (p - mu) / sigma``) they are
    folded into the normalised input space, ``W = w * sigma`` and ``b = <w, mu>``; without it the model's
    input must itself be non-negative pixels. With ``rate`` and ``auxiliary`` (normalised inputs of the
    client's distribution) each row gets its own ``s_r``, the ``1 - rate`` quantile of ``P / N`` over the
    auxiliary inputs, so it fires for about that fraction of images (``1 / batch size`` is best). How often
    a fixed ``s`` fires depends on the data: the default 1.05 was the best of 1.02 to 1.3 on 32 px digits
    (batches 16 to 256, 3 seeds); the calibrated ``rate`` recovers about 1.3 to 4 times as many images
    (``bench/imprint.py``).

    If the model's first layer with parameters is an ``nn.Linear`` it is trapped in a copy of the model
    (its shape is unchanged; the bias becomes ``<w, mu>``); otherwise a residual block with ``width`` trap
    rows is put in front (see the module docstring), which needs ``input_shape`` or ``auxiliary``. Spec:
    ``trap:SCALE`` or ``trap:KEY=VALUE,...`` (:func:`parse_server`).
    """

    name: ClassVar[str] = "trap"
    primary: ClassVar[str] = "scale"

    scale: float = 1.05
    rate: float | None = None
    seed: int = 0
    width: int = 256
    normalization: Normalization | None = None
    input_shape: tuple[int, ...] | None = None
    auxiliary: Tensor | None = field(default=None, repr=False)
    shift: float = 1e-3

    def __post_init__(self) -> None:
        if not self.scale > 0:
            raise ConfigError(f"the trap scale s must be positive (slightly above 1, e.g. 1.05), got {self.scale}")
        if self.rate is not None:
            if not 0 < self.rate < 1:
                raise ConfigError(f"rate is a fraction of images in (0, 1), e.g. 1/64, got {self.rate}")
            if self.auxiliary is None:
                raise ConfigError("rate needs auxiliary inputs to calibrate each row: give auxiliary= or drop rate")
        if isinstance(self.width, bool) or not isinstance(self.width, int) or self.width < 1:
            raise ConfigError(f"width must be a positive integer, got {self.width!r}")
        if not self.shift > 0:
            raise ConfigError(f"shift must be positive, got {self.shift}")
        object.__setattr__(self, "input_shape", _check_shape(self.input_shape))
        _check_auxiliary(self.auxiliary, self.input_shape)

    def spec(self) -> str:
        """This server as a spec (its settings, not its runtime normalisation, input shape or auxiliary data)."""
        return SERVERS.spec(self)

    def trap_weights(self, rows: int, features: int) -> tuple[Tensor, Tensor]:
        """Weights on pixels and the bias, float64: ``(rows, features)`` and ``(rows,)``.

        The bias is zero on pixels; with ``normalization`` the pair is folded into normalised space.
        """
        g = torch.Generator().manual_seed(self.seed)
        magnitude = torch.rand(rows, features, generator=g, dtype=torch.float64) / math.sqrt(features)
        order = torch.argsort(torch.rand(rows, features, generator=g, dtype=torch.float64), dim=1)
        negative = torch.zeros(rows, features, dtype=torch.bool)
        negative.scatter_(1, order[:, : features // 2], True)
        positive_part = torch.where(negative, 0.0, magnitude)
        negative_part = torch.where(negative, magnitude, 0.0)
        s = torch.full((rows, 1), float(self.scale), dtype=torch.float64)
        mean = std = None
        if self.normalization is not None:
            mean, std = _channel_vectors(self.normalization, features, torch.float64)
        if self.rate is not None and self.auxiliary is not None:
            x = self.auxiliary.detach().flatten(1).to(torch.float64)
            pixels = x if mean is None else x * std + mean
            ratio = (pixels @ positive_part.T) / (pixels @ negative_part.T).clamp_min(1e-12)
            s = torch.quantile(ratio, 1.0 - float(self.rate), dim=0).clamp_min(1e-6)[:, None]
        w = positive_part - s * negative_part
        b = torch.zeros(rows, dtype=torch.float64)
        if mean is not None:
            b = w @ mean
            w = w * std
        return w, b

    def modify(self, model: nn.Module) -> nn.Module:
        """A new :class:`TrappedModel` around a copy of ``model``; ``model`` itself is left unchanged."""
        dtype, device = _reference(model)
        first = _first_layer(model)
        copied = copy.deepcopy(model)
        if first is not None and isinstance(first[1], nn.Linear):
            name, layer = first
            target = dict(copied.named_modules())[name]
            if target.bias is None:
                raise ConfigError(
                    f"trap weights need a bias in the first fully connected layer '{name}' (the attack divides by "
                    "its gradient): use a model with biases"
                )
            if self.input_shape is not None and math.prod(self.input_shape) != layer.in_features:
                raise ConfigError(
                    f"input_shape {self.input_shape} has {math.prod(self.input_shape)} features but the first "
                    f"layer '{name}' takes {layer.in_features}"
                )
            w, b = self.trap_weights(layer.out_features, layer.in_features)
            with torch.no_grad():
                target.weight.copy_(w)
                target.bias.copy_(b)
            shape = _input_shape("a trap-weights server", model, self.input_shape, self.auxiliary)
            return TrappedModel(copied, trap_layer=f"model.{name}", input_shape=shape if len(shape) > 1 else None)
        shape = _input_shape("a trap-weights server", model, self.input_shape, self.auxiliary)
        features = math.prod(shape)
        block = ImprintBlock(features, self.width)
        w, b = self.trap_weights(self.width, features)
        with torch.no_grad():
            block.measure.weight.copy_(w)
            block.measure.bias.copy_(b)
            # the rows fire rarely: the added term's expected value is close to zero
            _residual_restore(block, weight=self.shift / self.width, offset=0.0)
        block = block.to(dtype=dtype, device=device)
        return TrappedModel(
            copied, trap_layer="trap.measure", trap=block, input_shape=shape if len(shape) > 1 else None
        )


# -- parsing -----------------------------------------------------------------------------------------------

_SPEC_HELP = (
    "'honest', 'imprint[:BINS[:random|mean]]' (Robbing the Fed) or 'trap[:SCALE]' (trap weights), settings by "
    "name as in 'imprint:bins=256,seed=1'"
)
#: the settings the older positional forms name, in order: ``imprint:BINS:MEASUREMENT``, ``trap:SCALE``
_POSITIONAL = {"imprint": ("bins", "measurement"), "trap": ("scale",)}


def parse_server(
    spec: str,
    *,
    input_shape: tuple[int, ...] | None = None,
    normalization: Normalization | None = None,
    auxiliary: Tensor | None = None,
) -> ImprintServer | TrapWeightsServer | None:
    """A server from a spec: ``"honest"`` -> ``None``; otherwise the registry's grammar (:data:`SERVERS`),
    ``"imprint"``, ``"imprint:128"``, ``"imprint:bins=256,measurement=mean,seed=1"``, ``"trap:1.2"``, plus the
    positional ``"imprint:256:mean"``.

    The runtime arguments a spec cannot carry go to the server that takes them: ``input_shape`` and
    ``auxiliary`` to either, ``normalization`` to trap weights.
    """
    if not isinstance(spec, str):
        raise ConfigError(f"a server spec is a string such as 'imprint:128', got {type(spec).__name__}")
    text = spec.strip().lower()
    kind, _, rest = text.partition(":")
    kind = kind.strip()
    if kind in ("honest", "none", "") and ":" not in text:
        return None
    if kind not in SERVERS:
        raise ConfigError(f"unknown server {spec!r}: use {_SPEC_HELP}{suggestion(kind, SERVERS)}")
    if ":" in rest and "=" not in rest:  # the positional form, e.g. imprint:256:mean
        parts = [p.strip() for p in rest.split(":")]
        names = _POSITIONAL.get(kind, (SERVERS[kind].primary,))
        if len(parts) > len(names):
            raise ConfigError(f"server spec {spec!r} has too many parts: use {_SPEC_HELP}")
        rest = ",".join(f"{key}={value}" for key, value in zip(names, parts, strict=False) if value)
    cls = SERVERS[kind]
    runtime = {"input_shape": input_shape, "normalization": normalization, "auxiliary": auxiliary}
    accepted = {f.name for f in dataclasses.fields(cls)}
    return SERVERS.parse(f"{kind}:{rest}", **{k: v for k, v in runtime.items() if k in accepted})
