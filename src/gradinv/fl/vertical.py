"""Vertical (feature-partitioned) federated learning, as attacked by CAFE (Jin, Chen, Hsu, Yu, Chen, NeurIPS 2021).

The setting of the paper (its Section 3 and its code, github.com/DeRafael/CAFE):

- ``N`` samples; each of ``M`` parties holds one region of every sample's image (the code splits 28x28 MNIST
  into four 14x14 quadrants, :class:`FeatureSplit` ``"grid"``; ``"columns"`` and ``"rows"`` give vertical and
  horizontal strips). The server holds the labels and a top model.
- Each party has a bottom model: conv 5x5 + ReLU + max-pool blocks (the code has two, 64 and 128 channels), then
  fully connected layers, the first of which (``fc1``) is the layer CAFE attacks; its output is the party's
  embedding. The top model is one dense layer on the concatenated embeddings, trained with cross-entropy.
- Iteration ``t``: the server picks a batch of sample indices ``s(t)`` (size ``B``) and sends it to the
  parties; each party sends its bottom model's output on its slices of those samples; the server runs the top
  model and the mean loss with its labels, sends each party ``dL/de`` back, and receives each party's bottom
  gradients (the paper's "aggregated gradients" ``grad_Theta L``). The model is updated every iteration (the
  code: Adam with learning rate 1e-6 on every model), so CAFE attacks while training proceeds.

Threat model (what :class:`VerticalObservation` holds): the server is honest-but-curious. It knows the batch
indices, its own labels, the architecture and every iteration's parameters (it receives the gradients and the
update rule is public), the embeddings it received and the gradients it sent back, and, per iteration, the
gradients of each party's first FC layer (the others are not kept, to bound memory: CAFE uses only these).
It never holds the parties' data; :meth:`VerticalScenario.ground_truth` gives that for scoring only.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from gradinv._settings import at_least, one_of
from gradinv.errors import ConfigError, DataError, ShapeError
from gradinv.types import GroundTruth, Normalization

SPLITS = ("grid", "columns", "rows")
OPTIMISERS = ("adam", "sgd")


def _grid_shape(parties: int) -> tuple[int, int]:
    """Rows and columns of a near-square grid of ``parties`` regions (4 -> 2x2, as CAFE's code)."""
    rows = max(r for r in range(1, math.isqrt(parties) + 1) if parties % r == 0)
    return rows, parties // rows


def _bounds(size: int, parts: int) -> list[tuple[int, int]]:
    """Contiguous, near-equal parts of ``range(size)`` (sizes differ by at most 1)."""
    base, extra = divmod(size, parts)
    edges = [0]
    for k in range(parts):
        edges.append(edges[-1] + base + (1 if k < extra else 0))
    return [(edges[k], edges[k + 1]) for k in range(parts)]


@dataclass(frozen=True)
class FeatureSplit:
    """Which pixels each party holds: ``regions[m] = (top, bottom, left, right)`` of every (C, H, W) image."""

    input_shape: tuple[int, int, int]
    regions: tuple[tuple[int, int, int, int], ...]

    @classmethod
    def make(cls, input_shape: Sequence[int], parties: int, how: str = "grid") -> FeatureSplit:
        """``parties`` regions of ``input_shape`` (C, H, W): ``"grid"`` (near-square tiles, row by row),
        ``"columns"`` (vertical strips) or ``"rows"`` (horizontal strips)."""
        shape = tuple(int(s) for s in input_shape)
        if len(shape) != 3:
            raise ShapeError(f"a feature split needs a (C, H, W) input shape, got {shape}")
        problems = one_of("split", how, SPLITS) + at_least("parties", parties, 1)
        if problems:
            raise ConfigError("; ".join(problems))
        _, h, w = shape
        rows, cols = {"grid": _grid_shape(parties), "columns": (1, parties), "rows": (parties, 1)}[how]
        if rows > h or cols > w:
            raise ShapeError(
                f"{parties} parties split as {how!r} need {rows}x{cols} regions, more than a {h}x{w} image has: "
                "use fewer parties or larger images"
            )
        regions = tuple((t, b, l, r) for t, b in _bounds(h, rows) for l, r in _bounds(w, cols))
        return cls(shape, regions)

    @property
    def parties(self) -> int:
        return len(self.regions)

    def part_shape(self, party: int) -> tuple[int, int, int]:
        t, b, l, r = self.regions[party]
        return (self.input_shape[0], b - t, r - l)

    def parts(self, x: Tensor) -> tuple[Tensor, ...]:
        """Each party's slice of a batch ``x`` (B, C, H, W)."""
        return tuple(x[..., t:b, l:r] for t, b, l, r in self.regions)

    def assemble(self, parts: Sequence[Tensor]) -> Tensor:
        """The batch whose slices are ``parts`` (the inverse of :meth:`parts`)."""
        out = parts[0].new_zeros((parts[0].shape[0], *self.input_shape))
        for (t, b, l, r), p in zip(self.regions, parts, strict=True):
            out[..., t:b, l:r] = p
        return out


class BottomModel(nn.Module):
    """A party's bottom model in the shape of CAFE's ``local_embedding``: ``features`` (conv 5x5 + ReLU +
    2x2 max-pool per entry of ``conv_channels``; none gives an FC-first model), ``fc1`` (the first FC layer,
    attacked), ReLU, ``fc2`` to an ``embed``-dimensional embedding.

    The code has two conv blocks (64 and 128 channels) and fc1 of 256 outputs; the default here is one block of
    16 channels and 32 outputs (a 14x14 slice gives fc1 16x7x7 = 784 inputs), small enough to keep every
    iteration's first-layer gradients. With 8 channels the max-pooled ReLU features lose part of the image."""

    def __init__(
        self, in_shape: Sequence[int], *, conv_channels: Sequence[int] = (16,), hidden: int = 32, embed: int = 10
    ):
        super().__init__()
        c, h, w = (int(s) for s in in_shape)
        layers: list[nn.Module] = []
        for ch in conv_channels:
            layers += [nn.Conv2d(c, int(ch), 5, padding=2), nn.ReLU(), nn.MaxPool2d(2, ceil_mode=True)]
            c, h, w = int(ch), -(-h // 2), -(-w // 2)
        self.features = nn.Sequential(*layers, nn.Flatten())
        self.fc1 = nn.Linear(c * h * w, hidden)
        self.fc2 = nn.Linear(hidden, embed)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(torch.relu(self.fc1(self.features(x))))


def build_vertical_models(
    split: FeatureSplit,
    *,
    num_classes: int,
    conv_channels: Sequence[int] = (16,),
    hidden: int = 32,
    embed: int = 10,
    seed: int = 0,
) -> tuple[tuple[BottomModel, ...], nn.Linear]:
    """One :class:`BottomModel` per party and the top model (one dense layer on the concatenated embeddings,
    CAFE's ``server``), initialised from ``seed`` (PyTorch's default initialisation; the global RNG is
    untouched)."""
    problems = [*at_least("num_classes", num_classes, 2), *at_least("hidden", hidden, 1), *at_least("embed", embed, 1)]
    problems += (
        [f"conv_channels must be positive, got {tuple(conv_channels)}"] if any(c < 1 for c in conv_channels) else []
    )
    if problems:
        raise ConfigError("; ".join(problems))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        bottoms = tuple(
            BottomModel(split.part_shape(m), conv_channels=conv_channels, hidden=hidden, embed=embed)
            for m in range(split.parties)
        )
        top = nn.Linear(split.parties * embed, num_classes)
    return bottoms, top


@dataclass(frozen=True)
class VerticalFL:
    """The vertical protocol's public settings (CAFE's code: 4 workers, quadrants, batch 40 of 800 samples or
    8 of 40, Adam with learning rate 1e-6 on every model, 20,000 iterations; fewer here, see ``iterations``).

    ``seed`` fixes the batch indices of every iteration; ``lr = 0`` freezes the model (the paper's nested-loop
    setting, where the attack sees one fixed model)."""

    parties: int = 4
    split: str = "grid"
    batch_size: int = 8
    iterations: int = 200
    lr: float = 1e-6
    optimizer: str = "adam"
    seed: int = 0

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise ConfigError(f"VerticalFL: {'; '.join(problems)}")

    def problems(self) -> list[str]:
        """Every value this protocol cannot run with."""
        found = []
        for key in ("parties", "batch_size", "iterations", "seed"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int):
                found.append(f"{key} must be an integer, got {value!r}")
        for key in ("split", "optimizer"):
            if not isinstance(getattr(self, key), str):
                found.append(f"{key} must be a string, got {getattr(self, key)!r}")
        if isinstance(self.lr, bool) or not isinstance(self.lr, (int, float)):
            found.append(f"lr must be a float, got {self.lr!r}")
        if found:
            return found
        return [
            *at_least("parties", self.parties, 1),
            *one_of("split", self.split, SPLITS),
            *at_least("batch_size", self.batch_size, 1),
            *at_least("iterations", self.iterations, 1),
            *at_least("lr", self.lr, 0),
            *one_of("optimizer", self.optimizer, OPTIMISERS),
        ]


def _stack(snapshots: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    return {k: torch.stack([s[k] for s in snapshots]) for k in snapshots[0]}


@dataclass(frozen=True, eq=False)
class VerticalObservation:
    """What the server holds after ``T`` iterations of vertical training (never the parties' data).

    Per party ``m``: ``bottoms[m]`` (the architecture; ``parameters[m][name]`` stacks the parameters used at
    every iteration, shape ``(T, *shape)``: views of one tensor when the model is frozen), ``buffers[m]``,
    ``layer_gradients[m]`` (``{"weight": (T, out, in), "bias": (T, out)}``: the gradient of the batch's mean
    loss w.r.t. the first FC layer ``layer``), ``embeddings[m]`` and ``output_gradients[m]`` (``(T, B, k)``: the
    bottom outputs the server received and ``dL/de`` it sent back). ``batches`` (``(T, B)``) are the indices
    of every iteration's samples; ``labels`` are the server's own labels of all ``N`` samples.
    """

    bottoms: tuple[nn.Module, ...]
    top: nn.Module
    split: FeatureSplit
    layer: str
    batches: Tensor
    parameters: tuple[Mapping[str, Tensor], ...]
    top_parameters: Mapping[str, Tensor]
    buffers: tuple[Mapping[str, Tensor], ...]
    layer_gradients: tuple[Mapping[str, Tensor], ...]
    embeddings: tuple[Tensor, ...]
    output_gradients: tuple[Tensor, ...]
    labels: Tensor
    num_samples: int
    normalization: Normalization
    protocol: VerticalFL = field(default_factory=VerticalFL)

    def __post_init__(self) -> None:
        m = self.split.parties
        counts = {
            "bottoms": len(self.bottoms),
            "parameters": len(self.parameters),
            "buffers": len(self.buffers),
            "layer_gradients": len(self.layer_gradients),
            "embeddings": len(self.embeddings),
            "output_gradients": len(self.output_gradients),
        }
        problems = [f"{k} has {v} entries" for k, v in counts.items() if v != m]
        if self.batches.dim() != 2 or self.batches.is_floating_point():
            problems.append(f"batches must be an integer (T, B) tensor, got shape {tuple(self.batches.shape)}")
        else:
            t = self.batches.shape[0]
            for k, g in enumerate(self.layer_gradients):
                if set(g) != {"weight", "bias"} or g["weight"].shape[0] != t or g["bias"].shape[0] != t:
                    problems.append(f"layer_gradients[{k}] must hold 'weight' and 'bias' for all {t} iterations")
            if self.batches.numel() and not 0 <= int(self.batches.min()) <= int(self.batches.max()) < self.num_samples:
                problems.append(f"batch indices must lie in 0..{self.num_samples - 1}")
        if self.labels.shape != (self.num_samples,):
            problems.append(f"labels must have shape ({self.num_samples},), got {tuple(self.labels.shape)}")
        if problems:
            raise ShapeError(f"inconsistent vertical observation for {m} parties: {'; '.join(problems)}")

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return self.split.input_shape

    @property
    def iterations(self) -> int:
        return int(self.batches.shape[0])

    @property
    def parties(self) -> int:
        return self.split.parties

    @property
    def device(self) -> torch.device:
        return self.batches.device

    def bottom_parameters(self, iteration: int, party: int) -> dict[str, Tensor]:
        """Party ``party``'s bottom parameters as used at ``iteration``."""
        return {k: v[iteration] for k, v in self.parameters[party].items()}

    def top_parameters_at(self, iteration: int) -> dict[str, Tensor]:
        return {k: v[iteration] for k, v in self.top_parameters.items()}


def _check_bottom(model: nn.Module, layer: str, party: int) -> list[str]:
    try:
        module = model.get_submodule(layer)
    except AttributeError:
        return [f"bottom model {party} has no layer {layer!r}: name its first fully connected layer"]
    if not isinstance(module, nn.Linear) or module.bias is None:
        return [
            f"bottom model {party}'s layer {layer!r} must be an nn.Linear with a bias (CAFE reads its bias gradient)"
        ]
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return [f"bottom model {party} has BatchNorm: a sample's gradient would depend on its batch; remove it"]
    return []


@dataclass(frozen=True, eq=False)
class VerticalScenario:
    """``N`` samples (normalised ``inputs``, ``labels``) trained on vertically by ``protocol.parties`` parties
    (``bottoms``) and a server (``top``); :meth:`observe` runs the ``T`` iterations and returns what the server
    sees, :meth:`ground_truth` the data for scoring. The given models are not changed (the run trains copies).
    """

    bottoms: tuple[nn.Module, ...]
    top: nn.Module
    inputs: Tensor
    labels: Tensor
    normalization: Normalization
    protocol: VerticalFL = field(default_factory=VerticalFL)
    layer: str = "fc1"

    def __post_init__(self) -> None:
        object.__setattr__(self, "bottoms", tuple(self.bottoms))
        x, y = self.inputs, self.labels
        if not isinstance(x, Tensor) or x.dim() != 4 or not x.is_floating_point():
            raise DataError(f"inputs must be a float (N, C, H, W) tensor, got {getattr(x, 'shape', type(x).__name__)}")
        if not isinstance(y, Tensor) or y.dtype != torch.int64 or y.shape != (x.shape[0],):
            raise DataError(f"labels must be an int64 tensor of shape ({x.shape[0]},), got {getattr(y, 'shape', y)}")
        if x.shape[1] != self.normalization.channels:
            raise ShapeError(f"inputs have {x.shape[1]} channels, the normalization {self.normalization.channels}")
        problems = []
        n, p = int(x.shape[0]), self.protocol
        if p.batch_size > n:
            problems.append(f"batch_size {p.batch_size} is larger than the data set ({n} samples): use at most {n}")
        if len(self.bottoms) != p.parties:
            problems.append(f"{p.parties} parties need {p.parties} bottom models, got {len(self.bottoms)}")
        for m, bottom in enumerate(self.bottoms):
            problems += _check_bottom(bottom, self.layer, m)
        if problems:
            raise ConfigError("; ".join(problems))
        FeatureSplit.make(x.shape[1:], p.parties, p.split)  # checks the image is large enough

    @classmethod
    def from_images(
        cls,
        images: Tensor,
        labels: Tensor,
        *,
        normalization: Normalization,
        protocol: VerticalFL | None = None,
        num_classes: int | None = None,
        model_seed: int = 0,
        conv_channels: Sequence[int] = (16,),
        hidden: int = 32,
        embed: int = 10,
    ) -> VerticalScenario:
        """A scenario from images in [0, 1] with :func:`build_vertical_models` of seed ``model_seed``."""
        if not isinstance(images, Tensor) or images.dim() != 4:
            raise DataError(f"images must be an (N, C, H, W) tensor, got {getattr(images, 'shape', type(images))}")
        if images.numel() and not (images.min() >= 0 and images.max() <= 1):
            raise DataError("images must lie in [0, 1]: divide 0-255 images by 255")
        protocol = protocol or VerticalFL()
        split = FeatureSplit.make(images.shape[1:], protocol.parties, protocol.split)
        classes = num_classes if num_classes is not None else max(int(labels.max()) + 1, 2)
        bottoms, top = build_vertical_models(
            split, num_classes=classes, conv_channels=conv_channels, hidden=hidden, embed=embed, seed=model_seed
        )
        return cls(bottoms, top, normalization.normalize(images), labels, normalization, protocol)

    @property
    def split(self) -> FeatureSplit:
        return FeatureSplit.make(self.inputs.shape[1:], self.protocol.parties, self.protocol.split)

    def batch_indices(self) -> Tensor:
        """``(T, B)``: the sample indices of every iteration, drawn from ``protocol.seed``."""
        p, n = self.protocol, int(self.inputs.shape[0])
        generator = torch.Generator().manual_seed(int(p.seed))
        return torch.stack([torch.randperm(n, generator=generator)[: p.batch_size] for _ in range(p.iterations)])

    def observe(self) -> VerticalObservation:
        """Run the ``T`` training iterations and return what the server holds."""
        p, split = self.protocol, self.split
        bottoms = [copy.deepcopy(b).eval() for b in self.bottoms]
        top = copy.deepcopy(self.top).eval()
        models = [*bottoms, top]
        for mod in models:
            for q in mod.parameters():
                q.requires_grad_(True)
        params = [q for mod in models for q in mod.parameters()]
        if p.lr > 0:
            opt_cls = torch.optim.Adam if p.optimizer == "adam" else torch.optim.SGD
            options = {"eps": 1e-7} if p.optimizer == "adam" else {}  # Keras's Adam epsilon, as CAFE's code
            optimiser = opt_cls(params, lr=p.lr, **options)
        batches = self.batch_indices().to(self.inputs.device)
        snaps: list[list[dict[str, Tensor]]] = [[] for _ in models]
        grads: list[dict[str, list[Tensor]]] = [{"weight": [], "bias": []} for _ in bottoms]
        embeds: list[list[Tensor]] = [[] for _ in bottoms]
        back: list[list[Tensor]] = [[] for _ in bottoms]
        for t in range(p.iterations):
            if p.lr > 0 or t == 0:
                for k, mod in enumerate(models):
                    snaps[k].append({name: q.detach().clone() for name, q in mod.named_parameters()})
            index = batches[t]
            parts = split.parts(self.inputs[index].detach())
            outputs = [b(x) for b, x in zip(bottoms, parts, strict=True)]
            for e in outputs:
                e.retain_grad()
            loss = F.cross_entropy(top(torch.cat(outputs, dim=1)), self.labels[index])
            for q in params:
                q.grad = None
            loss.backward()
            for m, (b, e) in enumerate(zip(bottoms, outputs, strict=True)):
                fc = b.get_submodule(self.layer)
                grads[m]["weight"].append(fc.weight.grad.detach().clone())
                grads[m]["bias"].append(fc.bias.grad.detach().clone())
                embeds[m].append(e.detach().clone())
                back[m].append(e.grad.detach().clone())
            if p.lr > 0:
                optimiser.step()
        if p.lr > 0:
            stacked = [_stack(s) for s in snaps]
        else:  # a frozen model: every iteration's parameters are views of the one copy
            stacked = [{k: v.unsqueeze(0).expand(p.iterations, *v.shape) for k, v in s[0].items()} for s in snaps]
        return VerticalObservation(
            bottoms=tuple(copy.deepcopy(b).requires_grad_(False) for b in self.bottoms),
            top=copy.deepcopy(self.top).requires_grad_(False),
            split=split,
            layer=self.layer,
            batches=batches,
            parameters=tuple(stacked[:-1]),
            top_parameters=stacked[-1],
            buffers=tuple({k: v.detach().clone() for k, v in b.named_buffers()} for b in self.bottoms),
            layer_gradients=tuple({k: torch.stack(v) for k, v in g.items()} for g in grads),
            embeddings=tuple(torch.stack(e) for e in embeds),
            output_gradients=tuple(torch.stack(g) for g in back),
            labels=self.labels.clone(),
            num_samples=int(self.inputs.shape[0]),
            normalization=self.normalization,
            protocol=p,
        )

    def ground_truth(self) -> GroundTruth:
        """The parties' data (normalised inputs) and the labels: for scoring only."""
        return GroundTruth(self.inputs.detach().clone(), self.labels.clone(), self.normalization)


def first_layer_terms(
    observation: VerticalObservation, inputs: Tensor, *, iteration: int = 0
) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
    """For scoring CAFE's steps I and II: per party, every sample's input to the first FC layer ``H`` (N, in)
    and the gradient of a batch's mean loss w.r.t. its output ``V`` (N, out; a sample's loss gradient over
    ``B``), with the parameters of ``iteration``, from the true normalised ``inputs``."""
    split, layer = observation.split, observation.layer
    b = observation.protocol.batch_size
    hs: list[Tensor] = []
    zs: list[Tensor] = []
    outputs = []
    parts = split.parts(inputs.detach())
    for m, bottom in enumerate(observation.bottoms):
        twin = copy.deepcopy(bottom)
        fc = twin.get_submodule(layer)
        pre = fc.register_forward_pre_hook(lambda _m, args: hs.append(args[0].detach().flatten(1)))
        post = fc.register_forward_hook(lambda _m, _args, out: zs.append(out))
        params = observation.bottom_parameters(iteration, m)
        params[f"{layer}.weight"] = params[f"{layer}.weight"].detach().clone().requires_grad_(True)
        try:
            outputs.append(functional_call(twin, (params, dict(observation.buffers[m])), (parts[m],)))
        finally:
            pre.remove()
            post.remove()
    logits = functional_call(observation.top, observation.top_parameters_at(iteration), (torch.cat(outputs, dim=1),))
    loss = F.cross_entropy(logits, observation.labels.to(logits.device), reduction="sum") / b
    vs = torch.autograd.grad(loss, zs)
    return tuple(hs), tuple(v.detach() for v in vs)


__all__ = [
    "OPTIMISERS",
    "SPLITS",
    "BottomModel",
    "FeatureSplit",
    "VerticalFL",
    "VerticalObservation",
    "VerticalScenario",
    "build_vertical_models",
    "first_layer_terms",
]
