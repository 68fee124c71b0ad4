"""DAGER: exact gradient inversion for transformer language models (Petrov, Dimitrov, Baader, Müller, Vechev,
"DAGER: Exact Gradient Inversion for Large Language Models", NeurIPS 2024).

The gradient of an attention layer's input projection ``W`` (queries, keys and values read the same input) is
``G = Σ_i δ_i z_iᵀ`` over the batch's token rows, so its row space is ``span{z_i}``, of rank at most ``B·L``. When
that is below the width ``d`` the span is a proper subspace and membership is a sharp test (the paper's span
check):

1. *Layer 1*. The first layer's input ``z(v, p)`` (``LN(wte[v] + wpe[p])`` for GPT-2) is a function of one token and
   its position only. Every token ``v`` is tested at every position ``p`` (batched over the vocabulary): the
   relative distance ``‖z - P z‖ / ‖z‖`` to the span (``P`` the projector on the top right singular vectors of
   ``G``) is ~1e-7 for the batch's tokens at ``p`` and O(1) for the others. The candidates ``C_p`` are the tokens
   under ``τ₁``.
2. *Layer 2, decoders* (causal attention; the paper's greedy decoder search). The second layer's input at
   position ``p`` depends on the whole prefix ``t_0..t_p``. Starting from ``C_0``, every kept prefix is extended by
   every token of ``C_p``; the extension is kept when the second layer's input at ``p`` (the model run on the
   prefix, stopped at that layer) lies within ``τ₂`` of the second layer's span. Sequences sharing a prefix are one
   branch until they part, so a position costs about ``B·|C_p|`` forward passes of ``p + 1`` tokens.

Encoders (bidirectional attention): the second layer's input at every position depends on the whole sequence, so
the paper searches combinations of the layer-1 candidates. We search them exhaustively (one candidate per position,
kept when the second-layer inputs at every position lie in the span), capped by ``max_combinations``: exact for
batch 1 and small batches, refused beyond (the paper's heuristics for large encoder batches are not implemented).

Our departures from the paper, each measured in ``tests/test_dager.py``:

- *The last position under next-token loss*. With the mean next-token cross-entropy the last position's output is
  never scored and no other position attends to it, so its ``δ`` is zero: the last token leaves no trace in any
  attention span (the authors' decoder check also stops one position early for this task). We read it from the
  output layer: with the prefixes of length ``L-1`` known, its weight gradient is
  ``N·G_head = Σ_u m_u K_u - Σ_u c_u h_uᵀ``, where ``K_u`` (known) collects prefix ``u``'s scored positions and its
  last scored position's softmax, ``h_u`` is the head's input there, ``m_u`` the number of sequences sharing the
  prefix and ``c_u`` the counts of their last tokens. Projecting out ``span{h_u}`` gives ``m_u / N`` by least
  squares (``Σ m_u = B`` fixes ``N``); then ``c = -(N·G_head - Σ m_u K_u) H⁺``, integers. With a head tied to the
  token embedding the rows of the prefixes' tokens also hold their input gradients: they are left out of the fit,
  and a last token among them is a guess (``last_tokens_guessed``).
- *The rank*. The authors cut singular values at NumPy's ``matrix_rank`` default (``max(shape)·eps``); near
  ``B·L ≈ d`` that drops true directions (GPT2Tiny, width 768, 705 rows: signal down to 2.4e-4·σ_max, float32
  noise from 1.8e-8·σ_max, cutoff 2.7e-4), so by default we cut at the largest drop (:func:`numerical_rank`).
- *The vocabulary scanned*. When the token embedding is untied, the tokens whose embedding row received no
  gradient are absent (the token-set leak, :mod:`gradinv.attacks.token_leak`): only the others are tested
  (``use_token_set``); the result is the same, the scan much shorter.

At initialisation (LayerNorm bias zero) ``z(v, p)`` is a scaled sum of a token part and a position part, so once
``B > 1`` a batch token seen at one position also passes the layer-1 test at other positions (the span holds the
swaps); the layer-2 filter removes those extensions, so recovery stays exact with more candidates (and more time).

Output: ``B`` sequences (``knowledge.num_samples``) in lexicographic order of their token ids (the batch's order
is not recoverable). When more sequences pass, the ``B`` closest to the spans are returned; when fewer (the spans
see duplicates once, unless the head step counts them), the found ones are repeated in turn
(``sequences_found`` says how many were found). ``extras`` report the ranks, candidates per position and every
position where a threshold had to be relaxed (the output is approximate there).

Threat model: honest-but-curious server, FedSGD (one gradient of the batch's mean loss; the paper also attacks
FedAvg, not implemented here), one client (no secure aggregation), the number of sequences ``B`` and their length
``L`` known (equal-length sequences, no padding), the model described by a
:class:`~gradinv.models.transformer.TextModelSpec` and evaluated without dropout. Exactness needs the spans to be
smaller than the space the layers' inputs fill (``B·L < d``, or ``< d - 1`` with a zero LayerNorm bias); otherwise
every token passes and the run reports ``rank_saturated=True`` (its output is then a guess, from a search cut to
``B`` candidates per position).
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from gradinv._settings import above, at_least, one_of
from gradinv.attacks.base import Attack, AttackOutput, Callback, register_attack
from gradinv.errors import AttackError, ConfigError, GradinvError
from gradinv.fl.functional import stateless_twin
from gradinv.types import Observation

LAST_TOKEN = ("auto", "span", "head")


# -- the model's description ----------------------------------------------------------------------------------


def resolve_spec(model: nn.Module, spec: Any = None) -> Any:
    """``spec`` when given, else :func:`gradinv.models.transformer.text_model_spec` of ``model`` (imported here,
    so that the attacks layer loads without the text models). Raises :class:`AttackError` when the model has none.
    """
    if spec is not None:
        return spec
    try:
        from gradinv.models.transformer import text_model_spec
    except ImportError as err:
        raise AttackError(
            f"no TextModelSpec for {type(model).__name__}: gradinv.models.transformer is not available ({err}); "
            "pass spec= explicitly"
        ) from None
    try:
        return text_model_spec(model)
    except GradinvError as err:
        raise AttackError(
            f"{type(model).__name__} is not a described text model ({err}); pass spec= (a TextModelSpec)"
        ) from None


def second_attention_names(spec: Any, override: str | None = None) -> tuple[str, ...]:
    """Names of the second attention layer's input-projection weights: ``override`` (comma-separated), the spec's
    ``second_attention`` field when it has one, else the first layer's names with the first ``.0.`` path component
    turned into ``.1.`` (``blocks.0.attn.qkv.weight`` -> ``blocks.1.attn.qkv.weight``; HF ``h.0`` -> ``h.1``)."""
    if override:
        return tuple(n.strip() for n in override.split(",") if n.strip())
    named = getattr(spec, "second_attention", None)
    if named:
        return (named,) if isinstance(named, str) else tuple(named)
    return tuple(re.sub(r"(^|\.)0\.", r"\g<1>1.", name, count=1) for name in spec.first_attention)


# -- span algebra ------------------------------------------------------------------------------------------


def attention_gradient(update: Mapping[str, Tensor], names: Sequence[str], *, transposed: bool = False) -> Tensor:
    """The named input-projection gradients stacked as one (rows, d) float64 matrix whose row space is
    ``span{z_i}`` (``transposed``: stored as (in, out), e.g. Hugging Face's ``Conv1D``)."""
    missing = [n for n in names if n not in update]
    if missing:
        raise AttackError(f"the update has no entry {missing[0]!r}: name the attention weights in the spec")
    parts = [update[n].detach().to(torch.float64) for n in names]
    parts = [p.T if transposed else p for p in parts]
    return torch.cat([p.reshape(-1, p.shape[-1]) for p in parts], dim=0)


@dataclass(frozen=True, eq=False)
class Span:
    """An orthonormal basis (d, r) of a gradient's row space, its rank, the singular values, the tolerance used,
    and when the SVD gave it, an orthonormal basis (d, d - r) of the complement."""

    basis: Tensor
    rank: int
    singular_values: Tensor
    tolerance: float
    complement: Tensor | None = None

    @property
    def width(self) -> int:
        return int(self.basis.shape[0])

    def distance(self, vectors: Tensor) -> Tensor:
        """:func:`span_distance` of each row of ``vectors``; through the complement when it is the smaller basis
        (``‖Nᵀ v̂‖`` also avoids the cancellation of ``1 - ‖Bᵀ v̂‖²``)."""
        if self.complement is None or self.complement.shape[1] >= self.basis.shape[1]:
            return span_distance(vectors, self.basis)
        v = vectors.to(torch.float64)
        v = v / v.norm(dim=-1, keepdim=True).clamp_min(1e-300)
        return (v @ self.complement.to(device=v.device)).norm(dim=-1)


#: a drop of this factor between consecutive singular values marks the end of a gradient's numerical rank
RANK_GAP = 100.0


def numerical_rank(
    singular_values: Tensor,
    *,
    shape: tuple[int, int],
    rank_tol: float | None = None,
    source_dtype: torch.dtype = torch.float32,
    max_rank: int | None = None,
) -> tuple[int, float]:
    """The rank of a matrix from its singular values (descending) and the relative cutoff used.

    ``rank_tol``: singular values above ``rank_tol·σ_max`` count (the authors pass NumPy's ``matrix_rank``
    default, ``max(shape)·eps``). ``None`` (ours): the largest drop between consecutive singular values, when it
    is at least :data:`RANK_GAP` and the rank is at most ``max_rank`` (the batch's ``B·L`` rows); without such a
    drop, NumPy's default. Measured on GPT2Tiny (width 768) with ``B·L = 705``: the signal ends at 2.4e-4·σ_max
    and float32 noise starts at 1.8e-8·σ_max; NumPy's cutoff (2.7e-4 for 2304 rows) drops true directions there.
    """
    s = singular_values
    floor = max(shape) * torch.finfo(source_dtype).eps
    if s.numel() == 0 or not s[0] > 0:
        return 0, floor if rank_tol is None else rank_tol
    r = s / s[0]
    if rank_tol is not None:
        return int((r > rank_tol).sum()), float(rank_tol)
    limit = r.numel() if max_rank is None else max(1, min(r.numel(), int(max_rank)))
    if r.numel() > 1:
        drops = r[:-1] / r[1:].clamp_min(torch.finfo(torch.float64).tiny)
        drops = drops[: min(limit, r.numel() - 1)]
        k = int(torch.argmax(drops)) + 1
        if drops[k - 1] >= RANK_GAP:
            return k, float(r[k])
    return min(limit, int((r > floor).sum())), floor


def span_basis(
    gradient: Tensor,
    *,
    rank_tol: float | None = None,
    source_dtype: torch.dtype = torch.float32,
    max_rank: int | None = None,
) -> Span:
    """The row space of ``gradient`` (rows, d) by SVD in float64, its rank by :func:`numerical_rank`
    (``source_dtype``: the update's own precision, for NumPy's cutoff)."""
    g = gradient.to(torch.float64)
    _, s, vh = torch.linalg.svd(g, full_matrices=False)
    rank, tol = numerical_rank(s, shape=tuple(g.shape), rank_tol=rank_tol, source_dtype=source_dtype, max_rank=max_rank)
    complement = vh[rank:].T.contiguous() if vh.shape[0] == g.shape[1] else None
    return Span(basis=vh[:rank].T.contiguous(), rank=rank, singular_values=s, tolerance=tol, complement=complement)


def span_distance(vectors: Tensor, basis: Tensor) -> Tensor:
    """Relative distance ``‖v - P v‖ / ‖v‖`` of each row of ``vectors`` (..., d) to the span of ``basis`` (d, r)
    (orthonormal columns), in float64: ``sqrt(1 - ‖Bᵀ v̂‖²)``."""
    v = vectors.to(torch.float64)
    v = v / v.norm(dim=-1, keepdim=True).clamp_min(1e-300)
    if basis.shape[1] == 0:
        return torch.ones(v.shape[:-1], dtype=torch.float64, device=v.device)
    c = v @ basis.to(device=v.device, dtype=torch.float64)
    return (1.0 - c.pow(2).sum(-1)).clamp_min(0.0).sqrt()


def input_rank(
    spec: Any, params: Mapping[str, Tensor], *, rank_tol: float | None = None, source_dtype: torch.dtype = torch.float32
) -> int:
    """The dimension of the space the first layer's inputs fill: the rank of ``z(v, p)`` over (up to ``2·d``)
    tokens at positions 0 and 1. A span of that rank holds every token: the test is saturated. It is below the
    width when the LayerNorm bias is zero (centering confines the inputs to ``d - 1`` dimensions)."""
    width, vocab = int(spec.width), int(spec.vocab_size)
    device = next(iter(params.values())).device
    ids = torch.arange(min(vocab, 2 * width), device=device)
    positions = range(min(2, int(spec.max_positions)))
    with torch.no_grad():
        z = torch.cat([spec.layer_inputs(ids, torch.full_like(ids, p), params) for p in positions])
    z = z.to(torch.float64)
    z = z / z.norm(dim=1, keepdim=True).clamp_min(1e-300)
    s = torch.linalg.svdvals(z)
    return numerical_rank(s, shape=tuple(z.shape), rank_tol=rank_tol, source_dtype=source_dtype)[0]


@dataclass(frozen=True, eq=False)
class PositionCandidates:
    """Layer-1 candidates at each position: token ids sorted by distance, their distances, and the positions
    where no token passed ``τ₁`` (``relaxed``: the closest tokens were taken instead) or more than
    ``max_candidates`` passed (``truncated``)."""

    tokens: list[Tensor]
    distances: list[Tensor]
    empty: tuple[int, ...]
    truncated: tuple[int, ...]


def first_layer_distances(
    spec: Any,
    params: Mapping[str, Tensor],
    span: Span | Tensor,
    positions: Sequence[int],
    *,
    tokens: Tensor | None = None,
    chunk: int = 8192,
) -> Tensor:
    """(len(positions), len(tokens)): the relative distance of each token's layer-1 input at each position to the
    span (a :class:`Span` or an orthonormal basis (d, r)); ``tokens`` default to the whole vocabulary. Batched
    over the tokens in chunks; computed once when the model has no position embedding."""
    basis = span.basis if isinstance(span, Span) else span
    distance = span.distance if isinstance(span, Span) else (lambda z: span_distance(z, basis))
    device = basis.device
    ids = torch.arange(int(spec.vocab_size), device=device) if tokens is None else tokens.to(device)
    out = torch.empty(len(positions), ids.numel(), dtype=torch.float64, device=device)
    shared = getattr(spec, "position_embedding", None) is None
    with torch.no_grad():
        for k, p in enumerate(positions):
            if shared and k > 0:
                out[k] = out[0]
                continue
            for start in range(0, ids.numel(), chunk):
                part = ids[start : start + chunk]
                z = spec.layer_inputs(part, torch.full_like(part, int(p)), params)
                out[k, start : start + chunk] = distance(z)
    return out


def gap_cut(sorted_distances: Tensor, most: int, *, ratio: float = 2.0) -> int | None:
    """How many of the closest candidates to keep when none passes the threshold (a noisy update): those before
    the largest difference between consecutive distances among the ``most + 1`` closest (``sorted_distances``
    ascending), 1 to ``most``; None when that gap is no clear separation (the first distance after it less than
    ``ratio`` times the last before it: no signal, e.g. a position that receives no gradient).

    Under noise the true inputs' relative span distances rise above the threshold but stay small, while a wrong
    input's stays near ``sqrt(1 - rank / width)`` (a random direction): the largest difference separates them,
    where a fixed count would add wrong candidates or drop true ones. Differences, not ratios, pick the gap: the
    true distances spread over orders of magnitude among themselves but not in absolute size."""
    k = min(int(most), int(sorted_distances.numel()))
    if k < 1:
        return 0
    if sorted_distances.numel() <= k:
        return k
    d = sorted_distances[: k + 1].to(torch.float64)
    cut = int(torch.argmax(d[1:] - d[:-1])) + 1
    return cut if float(d[cut]) >= ratio * float(d[cut - 1]) else None


def layer1_candidates(
    distances: Tensor,
    *,
    threshold: float,
    max_candidates: int,
    fallback: int,
    tokens: Tensor | None = None,
    gap_most: int = 0,
) -> PositionCandidates:
    """Tokens under ``threshold`` per position (rows of ``distances``; columns are ``tokens``, default the token
    ids 0..V-1), closest first, at most ``max_candidates``. A position with none is listed in ``empty`` and gets
    its closest tokens up to a clear gap among the ``gap_most + 1`` closest (:func:`gap_cut`; a noisy update), else
    its ``fallback`` closest (no signal). DAGER passes ``gap_most = B·L``: under noise a batch token seen at another
    position lies as close to the span as the position's own (the position embedding moves it little), so the
    layer-1 test keeps the batch's tokens and the second layer's test sorts them out."""
    found, dists, empty, truncated = [], [], [], []
    for p in range(distances.shape[0]):
        d = distances[p]
        order = torch.argsort(d, stable=True)
        n = int((d < threshold).sum())
        if n == 0:
            empty.append(p)
            cut = gap_cut(d[order[: gap_most + 1]], gap_most) if gap_most > 0 else None
            n = min(fallback, d.numel()) if cut is None else cut
        if n > max_candidates:
            truncated.append(p)
            n = max_candidates
        found.append(order[:n] if tokens is None else tokens.to(order.device)[order[:n]])
        dists.append(d[order[:n]])
    return PositionCandidates(found, dists, tuple(empty), tuple(truncated))


# -- the second layer's inputs ----------------------------------------------------------------------------------


class _Stop(Exception):
    def __init__(self, value: Tensor) -> None:
        super().__init__("layer reached")
        self.value = value


def module_input(
    twin: nn.Module, params: Mapping[str, Tensor], buffers: Mapping[str, Tensor], module_name: str
) -> Callable[[Tensor], Tensor]:
    """``f(ids)``: the input (B, L, d) of ``twin``'s submodule ``module_name`` on token ids (B, L); the forward pass
    stops there. ``twin`` is a stateless copy; the hook lives for one call."""
    module = twin.get_submodule(module_name)
    state = {**params, **buffers}

    def grab(_m: nn.Module, args: tuple) -> None:
        raise _Stop(args[0])

    def f(ids: Tensor) -> Tensor:
        handle = module.register_forward_pre_hook(grab)
        try:
            with torch.no_grad():
                functional_call(twin, state, (ids,))
        except _Stop as stop:
            return stop.value
        finally:
            handle.remove()
        raise AttackError(f"the forward pass never reached {module_name!r}")

    return f


def _chunked(f: Callable[[Tensor], Tensor], ids: Tensor, rows: int) -> Tensor:
    return torch.cat([f(ids[i : i + rows]) for i in range(0, ids.shape[0], rows)]) if ids.shape[0] else ids


# -- the last token from the output head (our addition) --------------------------------------------------------


def last_tokens_from_head(
    twin: nn.Module,
    params: Mapping[str, Tensor],
    buffers: Mapping[str, Tensor],
    head_module: str,
    head_gradient: Tensor,
    prefixes: Tensor,
    batch: int,
    *,
    exclude: Tensor | None = None,
) -> tuple[list[tuple[int, int, int]], dict[str, Any]]:
    """The last tokens of the sequences whose first ``L-1`` tokens are ``prefixes`` (U, L-1), from the gradient
    (V, d) of the output layer ``head_module``'s weight under the mean next-token cross-entropy (module docstring).

    ``exclude``: token ids whose rows also hold other gradients (a head tied to the token embedding: the rows of
    the prefixes' tokens carry their input gradients). They are left out of the fit; a last token among them
    cannot be read and is the excluded token of largest estimated count (a guess, counted in the diagnostics).

    Returns ``(prefix index, token, count)`` triples and diagnostics (the estimated multiplicities ``m_u``, the
    normaliser ``N``, the relative residual of the fit on the rows used, the number of guessed last tokens)."""
    module = twin.get_submodule(head_module)
    seen: list[Tensor] = []
    handle = module.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    try:
        with torch.no_grad():
            logits = functional_call(twin, {**params, **buffers}, (prefixes,))
    finally:
        handle.remove()
    if not isinstance(logits, Tensor) or logits.dim() != 3 or not seen:
        raise AttackError("the model's output is not next-token logits (B, L, V): the head step cannot run")
    h = seen[-1].to(torch.float64)  # (U, L-1, d)
    p = torch.softmax(logits.to(torch.float64), dim=-1)  # (U, L-1, V)
    u, n_pos, vocab = p.shape
    w = p.clone()  # K_u = Σ_i w_{u,i}ᵀ h_{u,i}: scored positions with known labels and the last one's softmax
    if n_pos > 1:
        rows = torch.arange(u, device=w.device).repeat_interleave(n_pos - 1)
        cols = torch.arange(n_pos - 1, device=w.device).repeat(u)
        w[rows, cols, prefixes[:, 1:].reshape(-1).to(w.device)] -= 1.0
    g = head_gradient.to(torch.float64)
    used = torch.ones(vocab, dtype=torch.bool, device=w.device)
    if exclude is not None and exclude.numel():
        used[exclude.to(w.device)] = False
    w_used, g_used = w * used, g * used[:, None]
    h_last = h[:, -1]  # (U, d)
    h_pinv = torch.linalg.pinv(h_last)  # (d, U)
    hp = h - (h @ h_pinv) @ h_last  # h_{u,i} P⊥, P⊥ = I - H⁺H
    # least squares Σ_u a_u K_u P⊥ = G P⊥ on the rows used, through Gram matrices (no (U, V, d) tensor)
    gram = (torch.einsum("uiv,wjv->uiwj", w_used, w_used) * torch.einsum("uid,wjd->uiwj", hp, hp)).sum((1, 3))
    rhs = (w_used * torch.einsum("vd,uid->uiv", g_used, hp)).sum((1, 2))
    a = torch.linalg.lstsq(gram, rhs[:, None]).solution[:, 0]
    if not float(a.sum()) > 0:
        raise AttackError("the head's gradient does not fit the recovered prefixes (no positive multiplicities)")
    n = batch / float(a.sum())
    m = a * n
    # M = N G - Σ m_u K_u = -C H  ->  C = -M H⁺
    resid = n * g - torch.einsum("u,uiv,uid->vd", m, w, h)
    c = -(resid @ h_pinv)  # (V, U)
    fit = float(((resid + c @ h_last) * used[:, None]).norm() / (n * g_used).norm().clamp_min(1e-300))
    counts = torch.round(c).clamp_min(0).to(torch.int64) * used[:, None]
    found = [(int(k), int(v), int(counts[v, k])) for v, k in counts.nonzero().tolist()]
    guessed = 0
    if not bool(used.all()):
        missing = torch.round(m).clamp_min(0).to(torch.int64) - counts.sum(0)
        hidden = torch.nonzero(~used)[:, 0]
        for k in torch.nonzero(missing > 0)[:, 0].tolist():
            v = int(hidden[torch.argmax(c[hidden, k])])
            found.append((k, v, int(missing[k])))
            guessed += int(missing[k])
    found.sort(key=lambda t: (-float(c[t[1], t[0]]), t[0], t[1]))
    return found, {
        "multiplicities": [round(float(x), 4) for x in m],
        "normaliser": n,
        "head_fit_residual": fit,
        "last_tokens_guessed": guessed,
    }


def output_head(observation: Observation, spec: Any, override: str | None = None) -> tuple[str, str, bool] | None:
    """The output layer: ``(module name, update entry of its weight, tied)`` for the last non-embedding module
    whose weight is (V, d) and has an update entry (``tied``: its weight is the token embedding), or None.
    ``override``: the module's name."""
    model = observation.model
    vocab, width = int(spec.vocab_size), int(spec.width)
    try:
        embedding = model.get_parameter(spec.token_embedding)
    except AttributeError:
        embedding = None
    found = None
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if (override is not None and name != override) or isinstance(module, nn.Embedding):
            continue
        if not isinstance(weight, Tensor) or tuple(weight.shape) != (vocab, width):
            continue
        tied = embedding is not None and weight is embedding
        key = spec.token_embedding if tied else f"{name}.weight"
        if key in observation.update:
            found = (name, key, tied)
    if override is not None and found is None:
        raise ConfigError(f"dager head={override!r}: no module of that name maps width {width} to {vocab} logits")
    return found


# -- the attack ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DagerSettings:
    """``span_threshold`` τ₁ and ``prefix_threshold`` τ₂: relative distances to the first and second layer's spans
    (defaults 1e-5 and 1e-3, the authors' code's ``l1_span_thresh`` and ``l2_span_thresh``). ``rank_tol``: relative
    singular-value cutoff of the spans (the authors use NumPy's ``matrix_rank`` default ``max(shape)·eps``;
    None: the largest drop in the singular values, :func:`numerical_rank`). ``max_candidates``:
    the most layer-1 tokens kept per position (closest first); ``max_prefixes``: the most prefixes kept between
    positions (closest first); ``max_combinations``: the encoder search's cap. ``last_token``: ``"span"`` (the
    paper: every position from the spans), ``"head"`` (the last position from the output head, our addition for
    next-token loss) or ``"auto"`` (the head when the last position has no layer-1 candidate and the model has an
    output layer). ``second_attention``: the second layer's projection weights (comma-separated names); ``head``: the
    output layer's module name; both when the defaults do not find them.
    ``use_token_set``: test only the tokens whose embedding row received gradient (the token-set leak, Melis et al.
    2019: exact zero rows are absent tokens), when the embedding is untied; off, or when it does not apply, the
    whole vocabulary (the paper). ``chunk``: rows per batched evaluation."""

    span_threshold: float = 1e-5
    prefix_threshold: float = 1e-3
    rank_tol: float | None = None
    max_candidates: int = 1000
    max_prefixes: int = 2000
    max_combinations: int = 100000
    last_token: str = "auto"
    second_attention: str | None = None
    head: str | None = None
    use_token_set: bool = True
    chunk: int = 4096

    def problems(self) -> list[str]:
        return [
            *above("span_threshold", self.span_threshold, 0),
            *above("prefix_threshold", self.prefix_threshold, 0),
            *([] if self.rank_tol is None else above("rank_tol", self.rank_tol, 0)),
            *at_least("max_candidates", self.max_candidates, 1),
            *at_least("max_prefixes", self.max_prefixes, 1),
            *at_least("max_combinations", self.max_combinations, 1),
            *one_of("last_token", self.last_token, LAST_TOKEN),
            *at_least("chunk", self.chunk, 1),
        ]


@register_attack
class Dager(Attack):
    """DAGER (Petrov et al., NeurIPS 2024): token ids (B, L) from the low-rank spans of the first two attention
    layers' gradients; exact when ``B·L`` is below the width. ``spec``: the model's
    :class:`~gradinv.models.transformer.TextModelSpec` (default: ``text_model_spec(observation.model)``)."""

    name = "dager"
    summary = "Exact text recovery from the low-rank spans of attention gradients (Petrov et al., NeurIPS 2024)"
    table1 = {
        "initialisation": "-",
        "objective": "distance of token inputs to the span of the attention gradients (layers 1 and 2)",
        "optimiser": "exhaustive test over the vocabulary, greedy prefix search (decoders)",
        "priors": "-",
    }
    Settings = DagerSettings
    requires = ("num_samples", "input_shape")
    modality = "text"

    def __init__(self, settings: Any | None = None, *, spec: Any = None, **overrides: Any) -> None:
        super().__init__(settings, **overrides)
        self.spec = spec

    def _unmet_assumptions(self, observation: Observation) -> list[str]:
        reasons = []
        try:
            spec = resolve_spec(observation.model, self.spec)
        except AttackError as err:
            return [str(err)]
        shape = tuple(observation.knowledge.input_shape)
        if len(shape) != 1:
            reasons.append(f"DAGER reads token sequences: input_shape must be (L,), got {shape}")
        elif shape[0] > int(spec.max_positions):
            reasons.append(f"sequence length {shape[0]} exceeds the model's {spec.max_positions} positions")
        if observation.update_kind != "gradient":
            reasons.append("DAGER here reads a FedSGD gradient (the paper's FedAvg variant is not implemented)")
        if observation.clients != 1:
            reasons.append("DAGER here reads one client's update (secure aggregation of several is not supported)")
        missing = [n for n in spec.first_attention if n not in observation.update]
        if missing:
            reasons.append(f"the update has no first-attention gradient {missing[0]!r}")
        second = second_attention_names(spec, self.settings.second_attention)
        if int(observation.knowledge.num_samples) > 1 and not all(n in observation.update for n in second):
            reasons.append(
                "batch > 1 needs a second attention layer to put tokens into sequences; the update has no "
                f"{second[0]!r} (name it with second_attention=)"
            )
        if observation.train_mode and any(
            isinstance(m, nn.Dropout) and m.p > 0 for m in observation.model.modules()
        ):  # fmt: skip
            reasons.append("the client ran with dropout (train mode): the layers' inputs are random, the spans too")
        return reasons

    def _reconstruct(
        self,
        observation: Observation,
        *,
        generator: torch.Generator,
        progress: bool,
        callback: Callback | None,
    ) -> AttackOutput:
        s = self.settings
        spec = resolve_spec(observation.model, self.spec)
        batch, length = int(observation.knowledge.num_samples), int(observation.knowledge.input_shape[0])
        device = observation.device
        params = {k: v.detach().to(device) for k, v in observation.parameters.items()}
        buffers = {k: v.detach().to(device) for k, v in observation.buffers.items()}
        dtype = next(iter(observation.update.values())).dtype
        transposed = bool(getattr(spec, "transposed", False))
        extras: dict[str, Any] = {}

        g1 = attention_gradient(observation.update, spec.first_attention, transposed=transposed)
        if not float(g1.abs().max()) > 0:
            raise AttackError("the first attention layer's gradient is zero: nothing to read (is L >= 2?)")
        span1 = span_basis(g1, rank_tol=s.rank_tol, source_dtype=dtype, max_rank=batch * length)
        names2 = second_attention_names(spec, s.second_attention)
        span2 = None
        if all(n in observation.update for n in names2):
            g2 = attention_gradient(observation.update, names2, transposed=transposed)
            if float(g2.abs().max()) > 0:
                span2 = span_basis(g2, rank_tol=s.rank_tol, source_dtype=dtype, max_rank=batch * length)
        space = input_rank(spec, params, rank_tol=s.rank_tol, source_dtype=dtype)
        extras.update(
            rank_layer1=span1.rank,
            rank_layer2=None if span2 is None else span2.rank,
            width=span1.width,
            input_rank=space,
            rank_saturated=span1.rank >= space or (span2 is not None and span2.rank >= space),
            prefix_filter=span2 is not None,
        )

        max_candidates, max_prefixes = s.max_candidates, s.max_prefixes
        if extras["rank_saturated"]:  # every token passes: keep the search small, the output is a guess
            max_candidates, max_prefixes = min(max_candidates, batch), min(max_prefixes, batch)
        scan = _scanned_tokens(observation, spec) if s.use_token_set else None
        extras["tokens_scanned"] = int(spec.vocab_size) if scan is None else int(scan.numel())
        dist1 = first_layer_distances(spec, params, span1, range(length), tokens=scan, chunk=s.chunk)
        cands = layer1_candidates(
            dist1,
            threshold=s.span_threshold,
            max_candidates=max_candidates,
            fallback=batch,
            tokens=scan,
            gap_most=batch * length if spec.causal else batch,  # the encoder's exhaustive search: at most B
        )
        extras["candidates_per_position"] = [int(t.numel()) for t in cands.tokens]
        extras["truncated_positions"] = list(cands.truncated)

        head = output_head(observation, spec, s.head) if spec.causal else None
        use_head = spec.causal and length >= 2 and head is not None
        if s.last_token == "span" or (s.last_token == "auto" and (length - 1) not in cands.empty):
            use_head = False
        if s.last_token == "head" and not use_head:
            raise AttackError(
                "last_token='head' needs a causal model, L >= 2 and an output layer (V, d) whose weight's gradient "
                "is in the update (name it with head=)"
            )
        extras["last_token_source"] = "head" if use_head else "span"
        span_positions = length - 1 if use_head else length
        extras["relaxed_positions"] = [p for p in cands.empty if p < span_positions]

        twin = stateless_twin(observation.model, train_mode=observation.train_mode)
        layer2 = None
        if span2 is not None:
            layer2 = module_input(twin, params, buffers, names2[0].rpartition(".")[0])

        if spec.causal:
            prefixes, scores = self._decode(cands, span_positions, layer2, span2, batch, max_prefixes, extras)
        else:
            prefixes, scores = self._encode(cands, length, layer2, span2, batch, extras)

        found = None
        if use_head:
            module_name, key, tied = head
            extras["head_tied"] = tied
            try:
                found, diag = last_tokens_from_head(
                    twin, params, buffers, module_name, observation.update[key], prefixes, batch,
                    exclude=torch.unique(prefixes) if tied else None,
                )  # fmt: skip
                extras.update(diag)
            except AttackError as err:  # a noisy head gradient: read the last position from the spans instead
                if s.last_token == "head":
                    raise
                extras["last_token_source"] = "span"
                extras["head_failed"] = str(err)
                extras["relaxed_positions"] = list(cands.empty)
                prefixes, scores = self._decode(cands, length, layer2, span2, batch, max_prefixes, extras)
        if found is not None:
            rows = []
            for k, token, count in found:
                full = torch.cat([prefixes[k], prefixes.new_tensor([token])])
                rows += [full] * count
            sequences = torch.stack(rows) if rows else prefixes.new_zeros(0, length)
        else:
            order = torch.argsort(scores, stable=True)
            sequences = prefixes[order]

        extras["sequences_found"] = int(sequences.shape[0])
        inputs = _lexsort(_to_batch(sequences, batch, length))
        return AttackOutput(inputs=inputs, labels=None, label_source=None, extras=extras)

    def _decode(
        self,
        cands: PositionCandidates,
        positions: int,
        layer2: Callable[[Tensor], Tensor] | None,
        span2: Span | None,
        batch: int,
        max_prefixes: int,
        extras: dict[str, Any],
    ) -> tuple[Tensor, Tensor]:
        """The greedy decoder search: extend every kept prefix by every candidate of the next position and keep
        the extensions whose second-layer input at that position lies in the second layer's span. A prefix none of
        whose extensions passes keeps its closest one; when no extension at all passes but a clear gap separates
        the closest (:func:`gap_cut`, at most B: a position ends at most B true prefixes; a noisy update), the
        extensions before the gap, so true branches survive and wrong prefixes die. Every sequence has length L;
        such a position is listed in ``prefix_relaxed_positions`` and the output there is approximate."""
        s = self.settings
        prefixes = cands.tokens[0][:, None]
        scores = torch.zeros(prefixes.shape[0], dtype=torch.float64, device=prefixes.device)
        relaxed, capped = [], []
        for p in range(positions):
            parents, width = prefixes.shape[0], 1
            if p > 0:
                nxt = cands.tokens[p]
                width = nxt.numel()
                prefixes = torch.cat([prefixes.repeat_interleave(width, 0), nxt.repeat(parents)[:, None]], dim=1)
                scores = scores.repeat_interleave(width)
            if layer2 is None or span2 is None:
                d = torch.zeros(prefixes.shape[0], dtype=torch.float64, device=prefixes.device)
            else:
                z2 = _chunked(lambda ids: layer2(ids)[:, -1], prefixes, max(1, s.chunk // (p + 1)))
                d = span2.distance(z2)
            scores = torch.maximum(scores, d)
            keep = d < s.prefix_threshold
            order = torch.argsort(d, stable=True)
            cut = None if bool(keep.any()) else gap_cut(d[order[: batch + 1]], batch)
            if cut is not None:  # nothing passes, but a clear gap (a noisy update): the closest up to it
                relaxed.append(p)
                keep[order[:cut]] = True
            elif p == 0 and not bool(keep.any()):  # no first token passes: the closest ones
                relaxed.append(p)
                keep[order[:batch]] = True
            elif p > 0:
                grid, dist = keep.view(parents, width), d.view(parents, width)
                stuck = ~grid.any(dim=1)
                if bool(stuck.any()):
                    relaxed.append(p)
                    grid[stuck, dist[stuck].argmin(dim=1)] = True
            prefixes, scores = prefixes[keep], scores[keep]
            if prefixes.shape[0] > max_prefixes:
                capped.append(p)
                order = torch.argsort(scores, stable=True)[:max_prefixes]
                prefixes, scores = prefixes[order], scores[order]
        extras["prefix_relaxed_positions"] = relaxed
        extras["prefix_capped_positions"] = capped
        return prefixes, scores

    def _encode(
        self,
        cands: PositionCandidates,
        length: int,
        layer2: Callable[[Tensor], Tensor] | None,
        span2: Span | None,
        batch: int,
        extras: dict[str, Any],
    ) -> tuple[Tensor, Tensor]:
        """Encoders: every combination of one layer-1 candidate per position, kept when its second-layer inputs
        at every position lie in the second layer's span (exhaustive, capped by ``max_combinations``)."""
        s = self.settings
        total = 1
        for t in cands.tokens:
            total *= int(t.numel())
        if total > s.max_combinations:
            raise AttackError(
                f"the encoder search has {total} combinations of layer-1 candidates, above max_combinations="
                f"{s.max_combinations}: raise it, or use a smaller batch (the paper's heuristics are not implemented)"
            )
        device = cands.tokens[0].device
        combos = torch.tensor(list(itertools.product(*[t.tolist() for t in cands.tokens])), device=device)
        combos = combos.to(torch.long).reshape(total, length)
        if layer2 is None or span2 is None:
            extras["prefix_relaxed_positions"] = []
            return combos, torch.zeros(total, dtype=torch.float64, device=combos.device)
        z2 = _chunked(layer2, combos, max(1, s.chunk // length))
        scores = span2.distance(z2).amax(dim=1)
        keep = scores < s.prefix_threshold
        extras["prefix_relaxed_positions"] = [] if bool(keep.any()) else list(range(length))
        if not bool(keep.any()):
            keep = torch.zeros_like(keep)
            keep[torch.argsort(scores, stable=True)[:batch]] = True
        return combos[keep], scores[keep]


def _scanned_tokens(observation: Observation, spec: Any) -> Tensor | None:
    """The tokens whose embedding row received gradient (the token-set leak, exact zeros only), or None when the
    leak does not apply (tied embedding, every row nonzero, no zero row to exploit): then the whole vocabulary."""
    from gradinv.attacks.token_leak import token_set  # token_leak builds on this module

    try:
        found = token_set(observation, spec=spec, threshold=0.0)
    except AttackError:
        return None
    return found if found.numel() else None


def _to_batch(sequences: Tensor, batch: int, length: int) -> Tensor:
    """Exactly ``batch`` rows: the first ``batch`` of ``sequences`` (best first) when more were found; when fewer,
    the found ones repeated in turn (duplicates in the batch look like one sequence to the spans)."""
    if sequences.shape[0] == 0:
        return sequences.new_zeros(batch, length)
    if sequences.shape[0] >= batch:
        return sequences[:batch].clone()
    reps = -(-batch // sequences.shape[0])
    return sequences.repeat(reps, 1)[:batch].clone()


def _lexsort(rows: Tensor) -> Tensor:
    """Rows in lexicographic order of their token ids (a deterministic order; the batch's order is not
    recoverable)."""
    order = list(range(rows.shape[0]))
    keys = rows.tolist()
    order.sort(key=lambda i: keys[i])
    return rows[order]


__all__ = [
    "Dager",
    "DagerSettings",
    "PositionCandidates",
    "Span",
    "attention_gradient",
    "first_layer_distances",
    "gap_cut",
    "input_rank",
    "last_tokens_from_head",
    "layer1_candidates",
    "module_input",
    "numerical_rank",
    "output_head",
    "resolve_spec",
    "second_attention_names",
    "span_basis",
    "span_distance",
]
