"""A client's round of federated training, and what the server observes of it."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from gradinv.errors import ConfigError, DataError, ShapeError
from gradinv.fl.client import STAGES, ClientBatch, ClientState
from gradinv.fl.functional import batch_statistics, stateless_twin
from gradinv.fl.protocols import FedSGD, LossFn, Protocol, aggregate, client_slices, client_update, cross_entropy
from gradinv.models import classifier_layer
from gradinv.types import (
    ClientDefense,
    GroundTruth,
    Knowledge,
    Normalization,
    Observation,
    ThreatModel,
    as_defenses,
    named_state,
)


@dataclass(frozen=True, eq=False)
class Scenario:
    """What a client does: a model, its private batch, a loss and a training protocol.

    ``inputs`` are normalised with ``normalization``; ``labels`` are class indices. :meth:`observe` gives what
    an honest-but-curious server sees, :meth:`ground_truth` the private batch for scoring.

    ``defenses`` (a sequence of instances or spec strings such as ``("prune:0.9",)``, see
    :mod:`gradinv.defenses`) act in order: data defenses on the batch before training, model defenses on the
    client's computation, then update defenses on what is shared; ``seed`` fixes their randomness (noise,
    mixing partners, keys). ``clients > 1`` shares the batch among that many clients (contiguous, near-equal
    parts), each training and defending on its own, and the server sees only the sample-weighted mean of their
    updates (secure aggregation or homomorphic encryption of the sum).

    ``train_mode=False`` (default) computes the update with BatchNorm using the running statistics the server
    sent, as in Inverting Gradients' experiments (inversefed) and breaching when public buffers are sent;
    ``train_mode=True`` normalises with the private batch's own statistics, which attacks must then replay.
    """

    model: nn.Module
    inputs: Tensor
    labels: Tensor
    protocol: Protocol = field(default_factory=FedSGD)
    normalization: Normalization | None = None
    threat: ThreatModel = field(default_factory=ThreatModel)
    train_mode: bool = False
    loss_fn: LossFn = cross_entropy
    defenses: Sequence[ClientDefense | str] = ()
    seed: int = 0
    clients: int = 1

    def __post_init__(self) -> None:
        defenses = as_defenses(self.defenses)
        for d in defenses:
            if not callable(getattr(d, "transform", None)):
                raise ConfigError(f"defense {d.name!r} has no transform method: subclass a gradinv.defenses class")
        stages = [STAGES.index(d.stage) for d in defenses]
        if stages != sorted(stages):
            raise ConfigError(
                f"defenses act in order, data, then model, then update: got {[d.name for d in defenses]}; "
                "put the data defenses (mixup, instahide, pixelate) first and the update defenses last"
            )
        updates = [d for d in defenses if d.stage == "update"]
        retrains = [d.name for d in updates[1:] if getattr(d, "retrains", False)]
        if retrains:
            raise ConfigError(
                f"{retrains[0]} recomputes the client's training, so it must be the first update defense: "
                f"got {[d.name for d in updates]}"
            )
        object.__setattr__(self, "defenses", defenses)
        _check_tensor("inputs", self.inputs)
        if not isinstance(self.labels, Tensor):
            raise DataError(f"labels must be a torch.Tensor of class indices, got {type(self.labels).__name__}")
        if self.labels.is_floating_point() or self.labels.is_complex() or self.labels.dtype == torch.bool:
            raise DataError(f"labels must be integer class indices, got dtype {self.labels.dtype}: use labels.long()")
        if self.inputs.ndim < 2:
            raise ShapeError(f"inputs must be a batch (B, ...), got shape {tuple(self.inputs.shape)}")
        if self.labels.shape != (self.inputs.shape[0],):
            raise ShapeError(
                f"labels must have shape ({self.inputs.shape[0]},) to match the batch, got {tuple(self.labels.shape)}"
            )
        if self.inputs.shape[0] < 1:
            raise ConfigError("the client's batch is empty: give at least one sample")
        client_slices(self.inputs.shape[0], self.clients)  # checks that the clients can share the batch

    @classmethod
    def from_images(
        cls,
        model: nn.Module,
        images: Tensor,
        labels: Tensor,
        *,
        normalization: Normalization,
        **options,
    ) -> Scenario:
        """A scenario from images in [0, 1], normalised with ``normalization`` as the client's pipeline does."""
        _check_tensor("images", images)
        if images.numel() and not (images.min() >= 0 and images.max() <= 1):
            raise DataError(
                f"images must lie in [0, 1], got values in [{float(images.min()):g}, {float(images.max()):g}]: "
                "divide 0-255 images by 255 (or pass normalised inputs to Scenario(...) directly)"
            )
        return cls(model, normalization.normalize(images), labels, normalization=normalization, **options)

    @property
    def norm(self) -> Normalization:
        return self.normalization or Normalization.identity(self.inputs.shape[1])

    def sent_model(self) -> nn.Module:
        """The model the server sends: the scenario's own, or a malicious server's modification of it."""
        server = self.threat.server
        return self.model if server is None else server.modify(self.model)

    def observe(self) -> Observation:
        """The server's view: the model as sent, the shared update by parameter name, and its knowledge."""
        model = self.sent_model()
        params, buffers = named_state(model)
        twin = stateless_twin(model, train_mode=self.train_mode)
        generator = torch.Generator().manual_seed(int(self.seed))
        num_classes = _num_classes(model)
        updates, sizes = [], []
        for part in client_slices(self.inputs.shape[0], self.clients):
            batch = ClientBatch(
                inputs=self.inputs[part].detach(),
                targets=self.labels[part],
                normalization=self.norm,
                num_classes=num_classes,
            )
            updates.append(self._client_round(twin, params, buffers, batch, generator))
            sizes.append(part.stop - part.start)
        update = aggregate(updates, sizes)
        sent = copy.deepcopy(model)
        t = self.threat
        knowledge = Knowledge(
            input_shape=tuple(self.inputs.shape[1:]) if t.known_input_shape else None,
            num_samples=int(self.inputs.shape[0]) if t.known_num_samples else None,
            labels=self.labels.clone() if t.known_labels else None,
            normalization=self.norm if t.known_normalization else None,
            bn_statistics=self.bn_statistics(model) if t.known_bn_statistics else None,
        )
        return Observation(
            model=sent,
            parameters=params,
            buffers=buffers,
            update={k: v.detach() for k, v in update.items()},
            protocol=self.protocol,
            knowledge=knowledge,
            train_mode=self.train_mode,
            defenses=self.defenses,
            clients=self.clients,
        )

    def bn_statistics(self, model: nn.Module | None = None) -> dict[str, tuple[Tensor, Tensor]]:
        """Per BatchNorm layer of ``model`` (default: the sent model), the per-channel mean and (biased)
        variance of its input on the client's whole batch, computed as the client's forward pass does (in the
        scenario's mode). What GradAttack's "BN exact" threat model hands the attacker (Huang et al. 2021)."""
        model = self.sent_model() if model is None else model
        twin = stateless_twin(model, train_mode=self.train_mode)
        names = [n for n, m in twin.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        params, buffers = named_state(model)
        with torch.no_grad():
            return batch_statistics(twin, names)(params, buffers, self.inputs.detach())

    def _client_round(
        self,
        twin: nn.Module,
        params: dict[str, Tensor],
        buffers: dict[str, Tensor],
        batch: ClientBatch,
        generator: torch.Generator,
    ) -> dict[str, Tensor]:
        """One client's round: data defenses, the protocol's local training (through any model defense), update
        defenses."""
        for defense in self.defenses:
            if defense.stage == "data":
                batch = defense.transform(batch, generator=generator)
            elif defense.stage == "model":
                twin = defense.transform(twin, generator=generator)
        order = None
        if getattr(self.protocol, "shuffle", False):  # a fresh private order of the samples every epoch
            n = batch.inputs.shape[0]
            visits = self.protocol.local_steps * (self.protocol.local_batch_size or n)
            order = torch.cat([torch.randperm(n, generator=generator) for _ in range(-(-visits // n))])
        with torch.no_grad():
            update = client_update(
                self.protocol,
                twin,
                params,
                {k: v.clone() for k, v in buffers.items()},
                batch.inputs,
                batch.targets,
                loss_fn=_logits_checked(self.loss_fn),
                order=order,
            )
        client = ClientState(
            model=twin,
            params=params,
            buffers=buffers,
            batch=batch,
            loss_fn=self.loss_fn,
            protocol=self.protocol,
            train_mode=self.train_mode,
            order=order,
        )
        for defense in self.defenses:
            if defense.stage == "update":
                update = defense.transform(update, client=client, generator=generator)
        return update

    def ground_truth(self) -> GroundTruth:
        """The private batch, for evaluation only."""
        return GroundTruth(inputs=self.inputs.detach().clone(), labels=self.labels.clone(), normalization=self.norm)


def _check_tensor(what: str, x: object) -> None:
    """Refuse inputs that are not a floating-point tensor of finite values, saying how to fix them."""
    if not isinstance(x, Tensor):
        raise DataError(f"{what} must be a torch.Tensor, got {type(x).__name__}: convert with torch.as_tensor(...)")
    if not x.is_floating_point():
        raise DataError(f"{what} must be floating point, got dtype {x.dtype}: convert 0-255 images by x.float() / 255")
    if not bool(torch.isfinite(x).all()):
        raise DataError(f"{what} hold NaN or infinite values: clean or drop those samples before the round")


def _logits_checked(loss_fn: LossFn) -> LossFn:
    """``loss_fn`` that first checks that the model's forward returned a tensor (the logits)."""

    def loss(output: Tensor, targets: Tensor) -> Tensor:
        if not isinstance(output, Tensor):
            raise ConfigError(
                f"the model's forward returned a {type(output).__name__}, not a tensor of logits: wrap the model "
                "in an nn.Module whose forward returns only the logits (e.g. output[0] or output['logits'])"
            )
        return loss_fn(output, targets)

    return loss


def _num_classes(model: nn.Module) -> int | None:
    """The classifier's output size (for soft labels), or None for a model without a linear layer."""
    try:
        return classifier_layer(model)[1].out_features
    except ConfigError:
        return None


def observation_from_files(
    model: nn.Module,
    *,
    update_path: str | Path,
    weights_path: str | Path | None = None,
    protocol: Protocol | None = None,
    knowledge: Knowledge | None = None,
    train_mode: bool = False,
    defenses: Sequence[ClientDefense | str] = (),
    clients: int = 1,
) -> Observation:
    """An observation from files a real server holds: a saved model and a captured update (safetensors).

    ``weights_path`` (optional) loads the parameters the model was sent with; ``update_path`` holds the
    client's update keyed by parameter name. Both are checked against the model's parameter names and shapes.
    ``defenses`` (objects or spec strings, parsed here) and ``clients`` are the protocol's public facts the
    update was made under.
    """
    from gradinv.io import load_state_into, load_update

    model = copy.deepcopy(model)
    if weights_path is not None:
        load_state_into(model, weights_path)
    params, buffers = named_state(model)
    update = load_update(update_path, params)
    return Observation(
        model=model,
        parameters=params,
        buffers=buffers,
        update=update,
        protocol=protocol or FedSGD(),
        knowledge=knowledge or Knowledge(),
        train_mode=train_mode,
        defenses=as_defenses(defenses),
        clients=clients,
    )
