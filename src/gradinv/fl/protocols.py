"""Federated training protocols: what a client computes from its private batch.

Both protocols are written once, as pure functions of a parameter dictionary built on ``torch.func``, so the
client's simulation and an attacker's differentiable replay of it are the same code. Their settings
(:class:`FedSGD`, :class:`FedAvg`, :func:`protocol_from_dict`) live in the core module :mod:`gradinv.protocol`
and are re-exported here.

- FedSGD (McMahan et al. 2017): the client shares the gradient of the mean loss over its batch.
- FedAvg (McMahan et al. 2017): the client runs K local SGD steps (local batch size, learning rate) and
  shares the weight delta ``w_K - w_0``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad

from gradinv.errors import ConfigError
from gradinv.fl.functional import is_bound
from gradinv.protocol import FedAvg, FedSGD, Protocol, protocol_from_dict

Params = dict[str, Tensor]
LossFn = Callable[[Tensor, Tensor], Tensor]


def cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean cross-entropy; ``targets`` are class indices (B,) or soft labels (B, K) given as probabilities."""
    if targets.dtype in (torch.int64, torch.int32):
        return F.cross_entropy(logits, targets)
    return -(targets * F.log_softmax(logits, dim=-1)).sum(dim=-1).mean()


def loss_gradient(
    model: nn.Module,
    params: Mapping[str, Tensor],
    buffers: Mapping[str, Tensor],
    inputs: Tensor,
    targets: Tensor,
    *,
    loss_fn: LossFn = cross_entropy,
    autograd: bool = False,
    aux: Callable[[], Any] | None = None,
) -> Params | tuple[Params, Any]:
    """Gradient of ``loss_fn(model(inputs), targets)`` with respect to ``params``, differentiable in inputs.

    ``autograd``: take it with ``torch.autograd.grad(create_graph=True)`` instead of ``torch.func.grad``; the
    parameters must then require grad (leaves or functions of leaves). Cheaper for one candidate outside ``vmap``
    (no transform wrappers); ``torch.func`` is what ``vmap`` over restarts needs. ``aux``: called right after the
    forward pass (e.g. to collect what hooks measured there); then ``(gradient, aux())`` is returned, the latter
    still differentiable in the inputs.
    """
    if autograd:
        names = list(params)
        output = (
            model(inputs)
            if is_bound(model, params, buffers)
            else functional_call(model, (dict(params), buffers), (inputs,))
        )
        loss = loss_fn(output, targets)
        extra = aux() if aux is not None else None
        grads = dict(zip(names, torch.autograd.grad(loss, [params[k] for k in names], create_graph=True), strict=True))
        return grads if aux is None else (grads, extra)

    def loss_of(p: Params) -> Tensor | tuple[Tensor, Any]:
        loss = loss_fn(functional_call(model, (p, buffers), (inputs,)), targets)
        return loss if aux is None else (loss, aux())

    return grad(loss_of, has_aux=aux is not None)(dict(params))


def client_update(
    protocol: Protocol,
    model: nn.Module,
    params: Mapping[str, Tensor],
    buffers: Mapping[str, Tensor],
    inputs: Tensor,
    targets: Tensor,
    *,
    loss_fn: LossFn = cross_entropy,
    autograd: bool = False,
    order: Tensor | None = None,
) -> Params:
    """What the client shares under ``protocol``: a gradient (FedSGD) or a weight delta (FedAvg).

    Pure and differentiable in ``inputs`` and ``targets``: attacks replay it on dummy data (``autograd``: see
    :func:`loss_gradient`). ``order`` (FedAvg): the sample indices the local steps visit, at least
    ``local_steps * b`` of them, step ``k`` taking ``order[k*b:(k+1)*b]`` (a shuffling client's per-epoch
    permutations, concatenated); None: the fixed cyclic order ``0, 1, ..., n-1, 0, 1, ...``.
    """
    if isinstance(protocol, FedSGD):
        return loss_gradient(model, params, buffers, inputs, targets, loss_fn=loss_fn, autograd=autograd)
    if isinstance(protocol, FedAvg):
        n = inputs.shape[0]
        b = protocol.local_batch_size or n
        if order is not None and order.numel() < protocol.local_steps * b:
            raise ConfigError(
                f"order has {order.numel()} sample indices but {protocol.local_steps} local steps of {b} need "
                f"{protocol.local_steps * b}: give one index per sample visit"
            )
        current = dict(params)
        for step in range(protocol.local_steps):
            idx = torch.arange(step * b, step * b + b) % n if order is None else order[step * b : step * b + b]
            g = loss_gradient(model, current, buffers, inputs[idx], targets[idx], loss_fn=loss_fn, autograd=autograd)
            current = {k: current[k] - protocol.lr * g[k] for k in current}
        return {k: current[k] - params[k] for k in current}
    raise ConfigError(f"unknown protocol {protocol!r}: use FedSGD() or FedAvg(...)")


def client_slices(num_samples: int, clients: int) -> list[slice]:
    """How a batch of ``num_samples`` is shared by ``clients`` clients: contiguous, sizes differing by at most 1."""
    if not 1 <= clients <= num_samples:
        raise ConfigError(f"{clients} clients cannot share {num_samples} samples: use 1 to {num_samples} clients")
    base, extra = divmod(num_samples, clients)
    bounds = [0]
    for k in range(clients):
        bounds.append(bounds[-1] + base + (1 if k < extra else 0))
    return [slice(bounds[k], bounds[k + 1]) for k in range(clients)]


def aggregate(updates: list[Params], sizes: list[int]) -> Params:
    """The sample-weighted mean of client updates (FedAvg's server step; what secure aggregation reveals)."""
    total = sum(sizes)
    return {k: sum(u[k] * (n / total) for u, n in zip(updates, sizes, strict=True)) for k in updates[0]}


def aggregated_update(
    protocol: Protocol,
    model: nn.Module,
    params: Mapping[str, Tensor],
    buffers: Mapping[str, Tensor],
    inputs: Tensor,
    targets: Tensor,
    *,
    clients: int = 1,
    loss_fn: LossFn = cross_entropy,
    autograd: bool = False,
) -> Params:
    """What the server sees when ``clients`` clients share the batch (split by :func:`client_slices`) and only
    the weighted mean of their updates is revealed (secure aggregation, Bonawitz et al. 2017). Pure and
    differentiable in ``inputs`` and ``targets``, as :func:`client_update`."""
    if clients == 1:
        return client_update(protocol, model, params, buffers, inputs, targets, loss_fn=loss_fn, autograd=autograd)
    parts = client_slices(inputs.shape[0], clients)
    updates = [
        client_update(protocol, model, params, buffers, inputs[s], targets[s], loss_fn=loss_fn, autograd=autograd)
        for s in parts
    ]
    return aggregate(updates, [s.stop - s.start for s in parts])


__all__ = [
    "FedAvg",
    "FedSGD",
    "LossFn",
    "Params",
    "Protocol",
    "aggregate",
    "aggregated_update",
    "client_slices",
    "client_update",
    "cross_entropy",
    "loss_gradient",
    "protocol_from_dict",
]
