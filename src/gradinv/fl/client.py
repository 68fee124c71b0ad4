"""The client's round as its defenses see it: the batch it trains on and the state it defends its update from.

A defense acts at one of :data:`STAGES`, in this order: ``"data"`` (on the :class:`ClientBatch` before
training), ``"model"`` (on the model the client trains with), ``"update"`` (on what it shares, with the
:class:`ClientState`). The defenses themselves live in :mod:`gradinv.defenses`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Literal

import torch
from torch import Tensor, nn

from gradinv.errors import ConfigError
from gradinv.fl.protocols import LossFn, Protocol
from gradinv.types import STAGES, Normalization

Stage = Literal["data", "model", "update"]


@dataclasses.dataclass(frozen=True, eq=False)
class ClientBatch:
    """The client's batch as it trains: normalised ``inputs``, ``targets`` (class indices (B,) or soft labels
    (B, K)), the data's normalisation and the number of classes."""

    inputs: Tensor
    targets: Tensor
    normalization: Normalization | None  # None for token inputs
    num_classes: int | None

    def soft_targets(self) -> Tensor:
        """The targets as probabilities (B, K)."""
        if self.targets.is_floating_point():
            return self.targets
        if self.num_classes is None:
            raise ConfigError("mixing labels needs the number of classes: the model has no linear classifier")
        return torch.nn.functional.one_hot(self.targets, self.num_classes).to(self.inputs.dtype)


@dataclasses.dataclass(frozen=True, eq=False)
class ClientState:
    """What the client holds when it defends its update: the model (a stateless twin), its parameters and
    buffers, the batch it trained on (after any data defense), the loss, the protocol and, for a shuffling
    FedAvg client, the sample order its local steps took (None: the fixed cyclic order)."""

    model: nn.Module
    params: Mapping[str, Tensor]
    buffers: Mapping[str, Tensor]
    batch: ClientBatch
    loss_fn: LossFn
    protocol: Protocol
    train_mode: bool
    order: Tensor | None = None


__all__ = ["STAGES", "ClientBatch", "ClientState", "Stage"]
