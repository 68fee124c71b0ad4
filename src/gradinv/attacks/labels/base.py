"""Label recovery from the classifier layer's update: the common interface and what the methods share.

A label method takes an :class:`~gradinv.types.Observation` (and method options such as auxiliary data) and
returns a :class:`LabelEstimate`: the classes judged present, their counts when the method gives counts, and
the method's own per-class evidence. Methods read the classifier layer, the last ``nn.Linear`` of the model.

Notation (cross-entropy, mean over a batch of ``B``): with features ``h_n`` entering the classifier and
``g_n = softmax(z_n) - onehot(y_n)``, the classifier's gradient is ``dW = (1/B) sum_n g_n h_n^T`` and
``db = (1/B) sum_n g_n``. A FedAvg weight delta is turned into the gradient it approximately accumulates,
``-delta / (lr * local_steps)``: each local step adds one mini-batch mean gradient, and over the steps every
sample is visited about equally often.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.func import functional_call

from gradinv.errors import AttackError, ConfigError, MissingKnowledgeError
from gradinv.fl.functional import stateless_twin
from gradinv.fl.protocols import FedAvg
from gradinv.models import classifier_layer
from gradinv.registry import Registry
from gradinv.types import Observation


@dataclass(frozen=True, eq=False)
class LabelEstimate:
    """Recovered labels of a batch.

    ``classes``: the distinct classes judged present (sorted). ``counts``: per-class counts (length
    ``num_classes``, summing to the batch size) when the method gives counts, else ``None`` (the set alone).
    ``scores``: the method's per-class evidence (lower = more likely present for sign rules; the continuous
    count for count solvers), ``None`` where it has none. ``details``: method-specific diagnostics.
    """

    method: str
    num_classes: int
    classes: Tensor
    counts: Tensor | None = None
    scores: Tensor | None = None
    details: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_counts(cls, method: str, counts: Tensor, *, scores: Tensor | None = None, **details: Any) -> LabelEstimate:
        counts = counts.detach().to(torch.long).flatten()
        if (counts < 0).any():
            raise ValueError("label counts must be non-negative")
        classes = torch.nonzero(counts > 0).flatten()
        return cls(method, counts.numel(), classes, counts, None if scores is None else scores.detach(), details)

    @classmethod
    def from_classes(
        cls, method: str, classes: Tensor, *, num_classes: int, scores: Tensor | None = None, **details: Any
    ) -> LabelEstimate:
        classes = torch.unique(classes.detach().to(torch.long).flatten())
        return cls(method, num_classes, classes, None, None if scores is None else scores.detach(), details)

    @property
    def gives_counts(self) -> bool:
        return self.counts is not None

    @property
    def labels(self) -> Tensor:
        """The recovered multiset, sorted (with counts), or the recovered set (without)."""
        if self.counts is None:
            return self.classes.clone()
        return torch.repeat_interleave(torch.arange(self.num_classes), self.counts)

    def as_batch(self, batch_size: int) -> Tensor:
        """``batch_size`` labels for an attack that needs one label per sample."""
        labels = self.labels
        if labels.numel() != batch_size:
            what = "counts sum" if self.gives_counts else "set has"
            raise AttackError(
                f"label method {self.method!r} {what} {labels.numel()} labels for a batch of {batch_size}: "
                "choose a method that counts labels (ilrg, llg, fedavg-count) or give the labels"
            )
        return labels


@dataclass(frozen=True, eq=False)
class ClassifierUpdate:
    """The classifier layer's update expressed as the mean-loss gradient it equals (FedSGD) or approximates
    (FedAvg: ``-delta / (lr * local_steps)``), in float64."""

    layer: str
    weight: Tensor  # (K, D)
    bias: Tensor | None  # (K,)
    exact: bool  # False for FedAvg deltas (a multi-step approximation)

    @property
    def num_classes(self) -> int:
        return self.weight.shape[0]

    @property
    def row_sums(self) -> Tensor:
        """``sum_d dW[c, d]``: the per-class quantity LLG reads."""
        return self.weight.sum(dim=1)

    def require_bias(self, method: str) -> Tensor:
        if self.bias is None:
            raise AttackError(
                f"{method} reads the classifier's bias gradient, but layer '{self.layer}' has no bias: "
                "use llg, llg-star or fedavg-count, which read the weights"
            )
        return self.bias


def classifier_update(observation: Observation) -> ClassifierUpdate:
    """The last linear layer's update (found by module type) as a gradient of the mean loss."""
    name, _ = classifier_layer(observation.model)
    try:
        w = observation.update[f"{name}.weight"]
    except KeyError:
        raise AttackError(
            f"the update holds no '{name}.weight': label recovery needs the classifier's update"
        ) from None
    b = observation.update.get(f"{name}.bias")
    if not bool(w.any()) and (b is None or not bool(b.any())):
        raise AttackError(
            f"the classifier's update '{name}' is exactly zero (the model fits this batch to float precision): "
            "it carries no label information"
        )
    protocol = observation.protocol
    scale = -1.0 / (protocol.lr * protocol.local_steps) if isinstance(protocol, FedAvg) else 1.0
    return ClassifierUpdate(
        layer=name,
        weight=scale * w.detach().cpu().double(),
        bias=None if b is None else scale * b.detach().cpu().double(),
        exact=not isinstance(protocol, FedAvg),
    )


def num_samples(observation: Observation, method: str) -> int:
    n = observation.knowledge.num_samples
    if n is None:
        raise MissingKnowledgeError(f"{method} needs the number of samples: give it in the threat model")
    return int(n)


# -- probing the model: what features and probabilities it produces on inputs the server chooses --------------


@dataclass(frozen=True, eq=False)
class Probe:
    """Per-sample classifier inputs ``features`` (N, D) and softmax ``probs`` (N, K), float64."""

    features: Tensor
    probs: Tensor

    @property
    def feature_sums(self) -> Tensor:
        return self.features.sum(dim=1)


def probe_model(observation: Observation, inputs: Tensor, *, parameters: Mapping[str, Tensor] | None = None) -> Probe:
    """Run ``inputs`` through the model as sent (or with ``parameters``) and capture the classifier's input.

    Works on a private copy of the model: the observation's model gets no hook and no state change.
    """
    twin = stateless_twin(observation.model, train_mode=observation.train_mode)
    name, _ = classifier_layer(twin)
    layer = twin.get_submodule(name)
    captured: list[Tensor] = []
    handle = layer.register_forward_pre_hook(lambda _m, args: captured.append(args[0].detach()))
    try:
        with torch.no_grad():
            state = ({**(parameters or observation.parameters)}, dict(observation.buffers))
            logits = functional_call(twin, state, (inputs.to(observation.device),))
    finally:
        handle.remove()
    features = captured[-1].flatten(1).cpu().double()
    return Probe(features=features, probs=torch.softmax(logits.cpu().double(), dim=-1))


def random_inputs(observation: Observation, count: int, *, seed: int = 0) -> Tensor:
    """``count`` dummy inputs drawn from N(0, 1) in the normalised input space (no data knowledge)."""
    shape = observation.knowledge.input_shape
    if shape is None:
        raise MissingKnowledgeError("probing the model needs the input shape: give it in the threat model")
    generator = torch.Generator().manual_seed(int(seed))
    return torch.randn((count, *shape), generator=generator)


def require_nonnegative_features(
    observation: Observation, method: str, *, probe: Probe | None = None, probes: int = 8
) -> None:
    """Sign rules assume the classifier's inputs are non-negative (ReLU or sigmoid before it); check that the
    model gives non-negative features on the server's probe inputs (random ones unless ``probe`` is given)
    and say so when it does not."""
    probe = probe or probe_model(observation, random_inputs(observation, probes, seed=12345))
    lowest = float(probe.features.min())
    if lowest < 0:
        raise AttackError(
            f"{method} assumes non-negative features entering the classifier (ReLU/sigmoid), but this model "
            f"gives negative ones (min {lowest:.3g}): use ilrg or fedavg-count"
        )


def round_counts(continuous: Tensor, total: int) -> Tensor:
    """Non-negative integer counts summing to ``total`` nearest to ``continuous``: round, then move the
    difference to the classes whose rounding erred most in that direction (iLRG's post-processing). Refuses
    (:class:`AttackError`) non-finite estimates: a vanishing or non-finite update gives nothing to count."""
    if not bool(torch.isfinite(continuous).all()):
        raise AttackError(
            "the label counts came out non-finite (the classifier's update vanishes or is not finite): "
            "give the labels, or use a method that reads the update's signs"
        )
    x = continuous.double().clamp(min=0, max=total)
    counts = torch.round(x).long()
    error = counts.double() - x
    diff = total - int(counts.sum())
    while diff != 0:
        if diff > 0:  # add where rounding went down the most
            j = int(torch.argmin(error))
            counts[j] += 1
            error[j] += 1
            diff -= 1
        else:  # remove where rounding went up the most, among classes still counted
            candidates = torch.where(counts > 0, error, torch.full_like(error, -torch.inf))
            j = int(torch.argmax(candidates))
            counts[j] -= 1
            error[j] -= 1
            diff += 1
    return counts


# -- the registry ------------------------------------------------------------------------------------------------

LabelFn = Callable[..., LabelEstimate]


@dataclass(frozen=True)
class LabelMethod:
    """A registered label method: the function, a one-line summary, whether it counts, whether it iterates."""

    name: str
    fn: LabelFn
    summary: str
    gives_counts: bool
    iterative: bool = False
    options: tuple[str, ...] = ()

    def __call__(self, observation: Observation, **options: Any) -> LabelEstimate:
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            raise ConfigError(
                f"label method {self.name!r} takes no option(s) {unknown}; "
                f"its options are {list(self.options) or 'none'}"
            )
        return self.fn(observation, **options)


#: label methods by name (a :class:`~gradinv.registry.Registry` of :class:`LabelMethod` records), filled by
#: :func:`register_label_method` in each method's file
LABEL_METHODS: Registry = Registry("label method")


def register_label_method(
    name: str, *, summary: str, gives_counts: bool, iterative: bool = False, options: tuple[str, ...] = ()
) -> Callable[[LabelFn], LabelFn]:
    """Function decorator: register ``fn`` in :data:`LABEL_METHODS` as ``name``."""

    def wrap(fn: LabelFn) -> LabelFn:
        LABEL_METHODS.register(LabelMethod(name, fn, summary, gives_counts, iterative, options))
        return fn

    return wrap
