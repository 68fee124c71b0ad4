"""Replaying the client's computation on candidate data: the heart of every iteration-based attack."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor

from gradinv.attacks.components.objectives import Objective
from gradinv.attacks.components.priors import BatchNormPrior, WeightedPriors, combine_priors
from gradinv.fl.functional import bind_state, stateless_twin
from gradinv.fl.protocols import FedSGD, aggregated_update, cross_entropy, loss_gradient
from gradinv.types import Observation


def sent_entries(observation: Observation) -> dict[str, Tensor] | None:
    """Masks of the update entries a sparsifying defense (``prune``, ``soteria``) left, or None when the client
    ran no such defense. The server sees the zeros, so an adaptive attack matches only the entries that were
    sent (Balunovic et al. 2022 break Soteria this way)."""
    if not any(getattr(d, "sparsifies", False) for d in observation.defenses):
        return None
    return {k: (v != 0).to(v.dtype) for k, v in observation.update.items()}


def matching_cost(
    observation: Observation,
    *,
    objective: Objective,
    weights: Mapping[str, float] | None = None,
    prior: Callable[[Tensor], Tensor] | None = None,
    adaptive: bool = True,
    autograd: bool = False,
) -> Callable[[Tensor, Tensor], Tensor]:
    """``cost(x, y)``: distance between the update that candidate data ``(x, y)`` would produce under the
    observed protocol and the observed update (per-parameter ``weights``), plus ``prior(x)``.

    ``adaptive``: where the observation says the client pruned its update (``prune``, ``soteria``), compare
    only the entries it sent, as a server that knows the protocol would.

    The function is pure (``torch.func``-friendly): ``vmap`` it over restarts, or differentiate it with
    autograd. ``autograd=True`` replays the client with ``torch.autograd.grad`` (one candidate, outside
    ``vmap``; cheaper there, see :func:`gradinv.fl.protocols.loss_gradient`). ``y`` holds class indices or soft
    labels (probabilities).

    A BatchNorm prior (:class:`~.priors.BatchNormPrior`) in the client's mode on a one-client FedSGD replay is
    evaluated from the BatchNorm inputs of the replay's own forward pass (the same tensors its separate forward
    pass would compute), which saves a forward and a backward pass per iteration.
    """
    twin = stateless_twin(observation.model, train_mode=observation.train_mode)
    fused, prior = _fused_batchnorm(observation, prior)
    seen: dict[str, tuple[Tensor, Tensor]] = {}
    for name in sorted({layer for _, p in fused for layer in p.layers}):
        twin.get_submodule(name).register_forward_pre_hook(_recorder(name, seen))
    params = {k: v.detach() for k, v in observation.parameters.items()}
    if autograd:
        params = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    buffers = {k: v.detach().clone() for k, v in observation.buffers.items()}
    if autograd:
        bind_state(twin, params, buffers)
    target = {k: v.detach() for k, v in observation.update.items()}
    protocol = observation.protocol
    distance = objective(target, weights=weights)
    mask = sent_entries(observation) if adaptive else None

    def cost(x: Tensor, y: Tensor) -> Tensor:
        if fused:
            seen.clear()
            update, stats = loss_gradient(
                twin, params, buffers, x, y, loss_fn=cross_entropy, autograd=autograd, aux=lambda: dict(seen)
            )
        else:
            update = aggregated_update(
                protocol,
                twin,
                params,
                buffers,
                x,
                y,
                clients=observation.clients,
                loss_fn=cross_entropy,
                autograd=autograd,
            )
        if mask is not None:
            update = {k: update[k] * mask[k] for k in update}
        value = distance(update)
        for weight, bn in fused:
            value = value + weight * bn.from_statistics(stats)
        if prior is not None:
            value = value + prior(x)
        return value

    return cost


def _fused_batchnorm(
    observation: Observation, prior: Callable[[Tensor], Tensor] | None
) -> tuple[list[tuple[float, BatchNormPrior]], Callable[[Tensor], Tensor] | None]:
    """The weighted BatchNorm priors of ``prior`` that the replay can evaluate from its own forward pass (a
    one-client FedSGD replay in the prior's mode) and the rest of ``prior``."""
    if prior is None or not isinstance(observation.protocol, FedSGD) or observation.clients != 1:
        return [], prior
    parts = prior.parts if isinstance(prior, WeightedPriors) else ((1.0, prior),)
    fusable = [isinstance(p, BatchNormPrior) and p.train_mode == observation.train_mode for _, p in parts]
    fused = [part for part, ok in zip(parts, fusable, strict=True) if ok]
    rest = [part for part, ok in zip(parts, fusable, strict=True) if not ok]
    return fused, (combine_priors(*rest) if fused else prior)


def _recorder(name: str, seen: dict[str, tuple[Tensor, Tensor]]) -> Callable[..., None]:
    """A forward pre-hook keeping the per-channel mean and biased variance of a layer's input (its first call)."""

    def hook(_module: torch.nn.Module, args: tuple) -> None:
        if name not in seen:
            a = args[0]
            dims = [0, *range(2, a.dim())]
            seen[name] = (a.mean(dims), a.var(dims, unbiased=False))

    return hook


def box_bounds(observation: Observation, shape: tuple[int, ...]) -> tuple[Tensor, Tensor] | None:
    """Per-channel bounds of valid normalised inputs (images in [0, 1]), or None if the normalisation is unknown."""
    norm = observation.knowledge.normalization
    if norm is None:
        return None
    channels = shape[-3] if len(shape) >= 3 else 1
    mean = torch.as_tensor(norm.mean, dtype=torch.float32, device=observation.device).reshape(channels, 1, 1)
    std = torch.as_tensor(norm.std, dtype=torch.float32, device=observation.device).reshape(channels, 1, 1)
    return (0 - mean) / std, (1 - mean) / std
