"""The token-set leak of embedding gradients (Melis, Song, De Cristofaro, Shmatikov, "Exploiting Unintended Feature
Leakage in Collaborative Learning", IEEE S&P 2019; used to seed TAG, LAMP and DAGER's follow-ups).

The token embedding is a lookup: its gradient's row ``v`` is the sum of the gradients reaching the input at the
positions that hold token ``v``, and exactly zero for every token the batch does not contain. The nonzero rows
are therefore the batch's token set (bag of words, without counts or order). Likewise the rows of a learned
position embedding that carry gradient are the positions in use: the sequence length.

Valid when the token embedding is *not tied* to the output head: a tied head's gradient
``Σ (softmax - onehot) hᵀ`` touches every row. :func:`token_set` detects tying (the same parameter under two
names) and a gradient whose every row is nonzero (tying, noise, weight decay) and refuses: the leak does not apply.
Two blind spots: a token that only ever sits where no loss reaches it leaves a zero row (under the mean
next-token loss of a causal model, the last position of each sequence), and a defense that perturbs every entry
removes the zero pattern.

:func:`span_token_sets` is the alternative that survives tying: DAGER's layer-1 span test (Petrov et al.,
NeurIPS 2024), which gives the candidate tokens *per position* from the first attention layer's gradient.

Threat model: honest-but-curious server, one client's update (FedSGD gradient or FedAvg weight delta, plain SGD
without weight decay), the parameter names of the model's embeddings (a
:class:`~gradinv.models.transformer.TextModelSpec`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from gradinv.attacks.dager import (
    attention_gradient,
    first_layer_distances,
    input_rank,
    layer1_candidates,
    resolve_spec,
    span_basis,
)
from gradinv.errors import AttackError, ConfigError
from gradinv.types import Observation

#: rows whose norm is at most this fraction of the largest row norm count as zero
DEFAULT_THRESHOLD = 1e-6


def embedding_is_tied(model: nn.Module, name: str) -> bool:
    """Whether the parameter ``name`` (e.g. ``"wte.weight"``) is shared with another module (a tied output head)."""
    try:
        param = model.get_parameter(name)
    except AttributeError:
        return False
    return any(p is param and n != name for n, p in model.named_parameters(remove_duplicate=False))


def nonzero_rows(gradient: Tensor, *, threshold: float = DEFAULT_THRESHOLD) -> Tensor:
    """Indices of the rows of ``gradient`` whose L2 norm exceeds ``threshold`` times the largest row norm
    (a relative threshold: exact zeros are the signal, float noise far below the largest row is not)."""
    if not 0 <= threshold < 1:
        raise ConfigError(f"threshold must be in [0, 1), got {threshold!r}")
    norms = gradient.detach().to(torch.float64).reshape(gradient.shape[0], -1).norm(dim=1)
    top = float(norms.max()) if norms.numel() else 0.0
    if top == 0.0:
        return torch.zeros(0, dtype=torch.long, device=gradient.device)
    return torch.nonzero(norms > threshold * top)[:, 0]


def _embedding_update(observation: Observation, name: str | None, what: str) -> Tensor:
    if name is None:
        raise AttackError(f"the model has no learned {what} embedding: nothing to read")
    if name not in observation.update:
        raise AttackError(f"the update has no entry {name!r} (the {what} embedding): it was not shared")
    return observation.update[name]


def token_set(observation: Observation, *, spec: Any = None, threshold: float = DEFAULT_THRESHOLD) -> Tensor:
    """The sorted token ids (LongTensor) that occur in the client's batch: the nonzero rows of the token
    embedding's update (Melis et al. 2019). ``spec``: the model's ``TextModelSpec`` (default:
    ``text_model_spec(observation.model)``); ``threshold``: relative row-norm cutoff (:func:`nonzero_rows`).

    Raises :class:`AttackError` when the leak does not apply: the embedding is tied to the output head, or every
    row is nonzero (use :func:`span_token_sets` instead)."""
    spec = resolve_spec(observation.model, spec)
    name = spec.token_embedding
    if embedding_is_tied(observation.model, name):
        raise AttackError(
            f"the token embedding {name!r} is tied to the output head, whose gradient touches every row: the "
            "token-set leak does not apply (use span_token_sets, the per-position span test)"
        )
    grad = _embedding_update(observation, name, "token")
    rows = nonzero_rows(grad, threshold=threshold)
    if rows.numel() == grad.shape[0]:
        raise AttackError(
            f"every row of the {name!r} update is nonzero (a tied head, noise or weight decay): the token-set leak "
            "does not apply (use span_token_sets, the per-position span test)"
        )
    return rows


def target_token_set(observation: Observation, *, spec: Any = None, head: str | None = None) -> Tensor:
    """The sorted token ids that are next-token *targets* somewhere in the batch, from the gradient of an untied
    linear output head (no bias, as GPT-2's) under the mean next-token cross-entropy: the blind spot of
    :func:`token_set` (a token only at the last position is an input nowhere the loss reaches, but it is the
    target of position L-2). ``head``: the head's module name (default: found as DAGER finds it).

    Row ``v`` of the head's gradient is ``(1/N) sum_i (p_iv - [t_i = v]) h_i`` over the N scored positions. A
    token no position targets has only the first term, the softmax-weighted mean hidden state, which varies
    little from token to token when the predictions spread over the vocabulary; a target row adds ``-h_i`` for each
    position it ends. Each row minus the coordinate-wise median row, in norm, sorted: the targets are the rows
    before the largest ratio between consecutive norms among the ``B·(L-1) + 1`` largest (at most that many
    targets). A label-style rule in the spirit of iDLG's sign rule (Zhao et al. 2020), for heads without a bias; a
    confident wrong prediction can pass as a target (a trained model), and a target predicted with certainty
    leaves no trace.

    Raises :class:`AttackError` when there is no untied head in the update, or B and L are unknown."""
    from gradinv.attacks.dager import output_head

    spec = resolve_spec(observation.model, spec)
    found = output_head(observation, spec, head)
    if found is None:
        raise AttackError("no output layer (V, d) in the update: the targets cannot be read from a head")
    _, key, tied = found
    if tied:
        raise AttackError("the output head is tied to the token embedding: its rows mix input and target gradients")
    k = observation.knowledge
    if k.num_samples is None or not k.input_shape:
        raise AttackError("the targets' count bound needs B and L: give num_samples and input_shape")
    most = int(k.num_samples) * max(1, int(k.input_shape[0]) - 1)
    g = observation.update[key].detach().to(torch.float64)
    norms = (g - g.median(dim=0).values).norm(dim=1)
    order = torch.argsort(norms, descending=True, stable=True)
    top = norms[order[: most + 1]].clamp_min(1e-300)
    if top.numel() < 2:
        return order[: top.numel()].sort().values
    cut = int(torch.argmax(top[:-1] / top[1:])) + 1
    return order[:cut].sort().values


def position_set(observation: Observation, *, spec: Any = None, threshold: float = DEFAULT_THRESHOLD) -> Tensor:
    """The positions that carried gradient: the nonzero rows of a learned position embedding's update.

    Under a causal model's mean next-token loss the last position of every sequence carries none, so the set is
    ``0..L-2``; see :func:`sequence_length`."""
    spec = resolve_spec(observation.model, spec)
    grad = _embedding_update(observation, getattr(spec, "position_embedding", None), "position")
    return nonzero_rows(grad, threshold=threshold)


def sequence_length(
    observation: Observation,
    *,
    spec: Any = None,
    threshold: float = DEFAULT_THRESHOLD,
    unscored_last: bool | None = None,
) -> int:
    """The batch's (padded) sequence length from :func:`position_set`: the last used position plus one, plus one
    more when the last position leaves no gradient (``unscored_last``; default: the model is causal, as under
    the next-token loss). Raises :class:`AttackError` when no position carried gradient."""
    spec = resolve_spec(observation.model, spec)
    used = position_set(observation, spec=spec, threshold=threshold)
    if used.numel() == 0:
        raise AttackError("no position embedding row carried gradient: the length cannot be read")
    extra = bool(spec.causal) if unscored_last is None else bool(unscored_last)
    return int(used.max()) + 1 + int(extra)


def span_token_sets(
    observation: Observation,
    *,
    spec: Any = None,
    threshold: float = 1e-5,
    rank_tol: float | None = None,
    length: int | None = None,
    max_candidates: int = 1000,
) -> list[Tensor]:
    """Per position, the token ids whose first-layer input lies in the span of the first attention layer's
    gradient (DAGER's layer-1 test; works with tied embeddings). ``threshold``: relative distance to the span
    (DAGER's τ₁); ``length``: positions to test (default: the knowledge's input shape, else every position of the
    model, trailing empty positions dropped). Tokens closest first, at most ``max_candidates`` per position.

    At initialisation (LayerNorm biases zero) the layer-1 input is a scaled sum of a token part and a position part,
    so a batch token seen at one position can also pass at another once the span is large; DAGER's second layer
    removes those. Raises :class:`AttackError` when the span fills the space (``B·L >= width``)."""
    spec = resolve_spec(observation.model, spec)
    grad = attention_gradient(
        observation.update, spec.first_attention, transposed=bool(getattr(spec, "transposed", False))
    )
    dtype = observation.update[spec.first_attention[0]].dtype
    shape = observation.knowledge.input_shape
    rows = observation.knowledge.num_samples * shape[0] if observation.knowledge.num_samples and shape else None
    span = span_basis(grad, rank_tol=rank_tol, source_dtype=dtype, max_rank=rows)
    if span.rank == 0:
        return []
    params = {k: v.detach().to(span.basis.device) for k, v in observation.parameters.items()}
    space = input_rank(spec, params, rank_tol=rank_tol, source_dtype=dtype)
    if span.rank >= space:
        raise AttackError(
            f"the first attention gradient has full rank {span.rank} (the inputs fill {space} dimensions): every "
            "token is in its span (B·L >= width), the span test cannot separate tokens"
        )
    trim = length is None and not shape
    n = int(length if length is not None else shape[0] if shape else spec.max_positions)
    dist = first_layer_distances(spec, params, span, range(n))
    found = layer1_candidates(dist, threshold=threshold, max_candidates=max_candidates, fallback=0)
    sets = list(found.tokens)
    while trim and sets and sets[-1].numel() == 0:
        sets.pop()
    return sets


__all__ = [
    "DEFAULT_THRESHOLD",
    "embedding_is_tied",
    "nonzero_rows",
    "position_set",
    "sequence_length",
    "span_token_sets",
    "target_token_set",
    "token_set",
]
