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
from gradinv.models import classifier_layer, next_token_loss, text_model_spec
from gradinv.registry import integration
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

    Token inputs: an integer ``inputs`` (B, L) holds token ids (:meth:`from_tokens` builds such a scenario and
    picks the loss). ``targets`` are what ``loss_fn`` compares the model's output with when they are not the
    labels: a language model's are its own tokens (next-token loss), and its ``labels`` are None. The server
    then knows ``input_shape=(L,)`` and ``num_samples=B``; the vocabulary is the sent model's; no normalisation
    applies.

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
    labels: Tensor | None
    protocol: Protocol = field(default_factory=FedSGD)
    normalization: Normalization | None = None
    threat: ThreatModel = field(default_factory=ThreatModel)
    train_mode: bool = False
    loss_fn: LossFn = cross_entropy
    defenses: Sequence[ClientDefense | str] = ()
    seed: int = 0
    clients: int = 1
    #: what ``loss_fn`` compares the output with when not ``labels`` (a language model: its tokens), batch-first
    targets: Tensor | None = None
    #: how the server gets the weighted mean: ``"mean"`` (in the clear, as secure aggregation reveals it) or
    #: ``"ckks"`` (TenSEAL CKKS, ``pip install gradinv[he]``: encrypted, added, only the sum decrypted; equal to
    #: the mean up to CKKS noise, about 1e-8, which differs between runs: :mod:`gradinv.integrations.he`)
    aggregation: str = "mean"

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
        if _is_tokens(self.inputs):
            _check_token_ids("inputs", self.inputs)
            _check_token_ranges(self.model, self.inputs)
            if self.normalization is not None:
                raise ConfigError("token inputs are not normalised: leave normalization=None for token ids")
        else:
            _check_tensor("inputs", self.inputs)
        if self.inputs.ndim < 2:
            raise ShapeError(f"inputs must be a batch (B, ...), got shape {tuple(self.inputs.shape)}")
        if self.inputs.shape[0] < 1:
            raise ConfigError("the client's batch is empty: give at least one sample")
        if self.labels is None:
            if self.targets is None:
                raise DataError(
                    "labels are None and no targets are given: pass class labels, or the loss's targets (for a "
                    "language model, Scenario.from_tokens uses the tokens themselves)"
                )
        else:
            _check_labels(self.labels, self.inputs.shape[0])
        if self.targets is not None:
            if not isinstance(self.targets, Tensor):
                raise DataError(f"targets must be a torch.Tensor, got {type(self.targets).__name__}")
            if self.targets.ndim < 1 or self.targets.shape[0] != self.inputs.shape[0]:
                raise ShapeError(
                    f"targets must hold one entry per sample ({self.inputs.shape[0]}) along their first dimension, "
                    f"got shape {tuple(self.targets.shape)}"
                )
        for d in defenses:  # a defense that cannot act on these inputs says so now, not mid-round
            check = getattr(d, "check_inputs", None)
            if callable(check):
                check(self.inputs)
        client_slices(self.inputs.shape[0], self.clients)  # checks that the clients can share the batch
        if self.aggregation not in ("mean", "ckks"):
            raise ConfigError(f"aggregation must be 'mean' or 'ckks', got {self.aggregation!r}")
        if self.aggregation == "ckks":
            integration("he").require_tenseal()  # an optional extra: loaded only when asked for

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

    @classmethod
    def from_tokens(
        cls,
        model: nn.Module,
        tokens: Tensor,
        labels: Tensor | None = None,
        **options,
    ) -> Scenario:
        """A scenario from token ids ``tokens`` (B, L), e.g. ``TextDataset.sample``.

        The model's output decides the loss: next-token logits (B, L, V) make it a language model, trained with
        :func:`~gradinv.models.next_token_loss` against the tokens themselves (``labels`` must be None); class
        logits (B, C) make it a classifier, trained with cross-entropy against ``labels`` (B,). A ``loss_fn``
        in ``options`` replaces that loss. The other ``options`` are the constructor's (``protocol``,
        ``defenses``, ``threat``, ``seed``, ``clients``...). Data defenses on pixels (mixup, instahide, pixelate)
        refuse token inputs; update defenses act unchanged.
        """
        _check_token_ids("tokens", tokens)
        _check_token_ranges(model, tokens)
        if _is_language_model(model, tokens):
            if labels is not None:
                raise ConfigError(
                    "a language model's loss has no labels (its targets are the next tokens): pass labels=None"
                )
            if tokens.shape[1] < 2:
                raise ShapeError(
                    f"a language model's next-token loss needs sequences of at least 2 tokens, got length "
                    f"{tokens.shape[1]}: use a longer --seq-len"
                )
            options.setdefault("loss_fn", next_token_loss)
            return cls(model, tokens, None, targets=tokens, **options)
        if labels is None:
            raise ConfigError(
                "this model classifies sequences (its output is (B, C)): pass labels, one class index per sequence"
            )
        return cls(model, tokens, labels, **options)

    @property
    def is_tokens(self) -> bool:
        """Whether the inputs are token ids (an integer (B, L) batch)."""
        return _is_tokens(self.inputs)

    @property
    def loss_targets(self) -> Tensor:
        """What the loss compares the output with: ``targets`` when given, else the labels."""
        return self.labels if self.targets is None else self.targets

    @property
    def norm(self) -> Normalization | None:
        """The inputs' normalisation (identity for images without one); None for token ids."""
        if self.is_tokens:
            return None
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
                targets=self.loss_targets[part],
                normalization=self.norm,
                num_classes=num_classes,
            )
            updates.append(self._client_round(twin, params, buffers, batch, generator))
            sizes.append(part.stop - part.start)
        if self.aggregation == "ckks":
            update = integration("he").CKKSAggregator().aggregate(updates, sizes).update
        else:
            update = aggregate(updates, sizes)
        sent = copy.deepcopy(model)
        t = self.threat
        knowledge = Knowledge(
            input_shape=tuple(self.inputs.shape[1:]) if t.known_input_shape else None,
            num_samples=int(self.inputs.shape[0]) if t.known_num_samples else None,
            labels=self.labels.clone() if t.known_labels and self.labels is not None else None,
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
        labels = None if self.labels is None else self.labels.clone()
        return GroundTruth(inputs=self.inputs.detach().clone(), labels=labels, normalization=self.norm)


def _check_tensor(what: str, x: object) -> None:
    """Refuse inputs that are not a floating-point tensor of finite values, saying how to fix them."""
    if not isinstance(x, Tensor):
        raise DataError(f"{what} must be a torch.Tensor, got {type(x).__name__}: convert with torch.as_tensor(...)")
    if not x.is_floating_point():
        raise DataError(f"{what} must be floating point, got dtype {x.dtype}: convert 0-255 images by x.float() / 255")
    if not bool(torch.isfinite(x).all()):
        raise DataError(f"{what} hold NaN or infinite values: clean or drop those samples before the round")


_INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def _is_tokens(x: object) -> bool:
    """Whether ``x`` is a tensor of token ids (an integer dtype; bool is not one)."""
    return isinstance(x, Tensor) and x.dtype in _INT_DTYPES


def _check_token_ids(what: str, x: object) -> None:
    """Refuse token ids that are not an integer (B, L) tensor of non-negative ids, saying how to fix them."""
    if not isinstance(x, Tensor):
        raise DataError(f"{what} must be a torch.Tensor of token ids, got {type(x).__name__}: use torch.tensor(ids)")
    if x.dtype not in _INT_DTYPES:
        raise DataError(f"{what} must be integer token ids, got dtype {x.dtype}: convert with .long()")
    if x.ndim != 2 or x.shape[0] < 1 or x.shape[1] < 1:
        raise DataError(
            f"integer {what} are token ids, a batch of sequences (B, L) with B, L >= 1, got shape {tuple(x.shape)}: "
            "images must be floating point (convert 0-255 images by x.float() / 255)"
        )
    if int(x.min()) < 0:
        raise DataError(f"{what} hold negative token ids (down to {int(x.min())}): ids index the vocabulary from 0")


def _check_token_ranges(model: nn.Module, tokens: Tensor) -> None:
    """Token ids inside the model's vocabulary and sequences no longer than its positions (models with a
    :func:`~gradinv.models.text_model_spec`; another model's own forward pass checks)."""
    try:
        spec = text_model_spec(model)
    except ConfigError:
        return
    top, length = int(tokens.max()), int(tokens.shape[1])
    if top >= spec.vocab_size:
        raise DataError(
            f"token id {top} is outside the model's vocabulary of {spec.vocab_size} (ids 0..{spec.vocab_size - 1}): "
            f"encode with the tokenizer the model was built for, or build it with vocab_size of at least {top + 1}"
        )
    if length > spec.max_positions:
        raise ShapeError(
            f"sequences of {length} tokens are longer than the model's {spec.max_positions} positions: shorten them "
            f"(--seq-len {spec.max_positions}) or build the model with n_positions of at least {length}"
        )


def _is_language_model(model: nn.Module, tokens: Tensor) -> bool:
    """Whether ``model`` gives next-token logits (1, L, V) on one sequence (else class logits (1, C)). One
    forward pass in eval mode without gradients (no dropout: the global RNG is not touched)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(tokens[:1])
    except (IndexError, RuntimeError) as exc:  # a model without a text spec, e.g. ids beyond its embedding
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(
            f"the model cannot read these token ids ({first}): check they were encoded for its vocabulary and fit "
            "its positions"
        ) from None
    finally:
        model.train(was_training)
    if not isinstance(out, Tensor):
        raise ConfigError(
            f"the model's forward returned a {type(out).__name__}, not a tensor of logits: wrap the model in an "
            "nn.Module whose forward returns only the logits"
        )
    if out.ndim == 3 and tuple(out.shape[:2]) == tuple(tokens[:1].shape):
        return True
    if out.ndim == 2 and out.shape[0] == 1:
        return False
    raise ShapeError(
        f"a text model gives next-token logits (B, L, V) or class logits (B, C); this one gave {tuple(out.shape)} "
        f"for one sequence of {tokens.shape[1]} tokens"
    )


def _check_labels(labels: object, batch: int) -> None:
    if not isinstance(labels, Tensor):
        raise DataError(f"labels must be a torch.Tensor of class indices, got {type(labels).__name__}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise DataError(f"labels must be integer class indices, got dtype {labels.dtype}: use labels.long()")
    if labels.shape != (batch,):
        raise ShapeError(f"labels must have shape ({batch},) to match the batch, got {tuple(labels.shape)}")


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
