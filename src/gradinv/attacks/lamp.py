"""LAMP: text from gradients with a language model prior (Balunović, Dimitrov, Jovanović, Vechev, "LAMP: Extracting
Text from Gradients with Language Model Priors", NeurIPS 2022).

LAMP keeps TAG's continuous search over token embeddings (:mod:`gradinv.attacks.tag`) and adds two things
(the paper's Sec. 4, Algorithm 1):

1. *Continuous steps* minimise the gradient distance plus an embedding-norm regulariser,
   ``L_rec(x) + alpha_reg * (mean_i ||x_i|| - n_E)^2``, with ``n_E`` the mean norm of the token embeddings: without
   it the embeddings grow steadily. ``L_rec`` is the cosine distance (``1 - cos`` per parameter, averaged;
   LAMP_cos, the paper's main variant) or TAG's ``L2^2 + 0.01 L1`` (LAMP_L1L2). Adam at lr 0.01, decayed x0.89
   at regular steps.
2. *Discrete steps*, every ``discrete_every`` continuous steps after a burn-in: for each sequence, candidate
   reorderings of its current embeddings (swap two tokens; move a token; move a span; move a prefix to the end;
   the identity is always a candidate) are scored by ``L_rec + alpha_lm * L_lm`` where ``L_lm`` is the mean
   next-token cross-entropy (log-perplexity) of the decoded tokens under an auxiliary language model; the best
   candidate is kept, so a discrete step never increases that score.

The start is the best of ``init_candidates`` Gaussian draws by ``L_rec``, then the best of as many random
reorderings of it, each embedding rescaled to norm ``n_E``. Decoding picks the nearest embedding row by cosine
similarity. Paper defaults (BERT-base, GPU): 2000 steps, a discrete step every 75 after 10% burn-in with 200
candidates per sequence, 500 initial candidates, lr decay x0.89 every 50 steps; LAMP_cos alpha_lm 0.2,
alpha_reg 1; LAMP_L1L2 alpha_lm 60, alpha_reg 25. Here, scaled to a CPU: 400 steps, a discrete step every 20 after
10% burn-in, 50 candidates, 50 initial candidates, x0.89 every 10 steps (the same total decay).

The prior: :func:`gradinv.models.language.bundled_language_model`, a GPT2Tiny trained on the training split of
the bundled text with the bundled word tokenizer of the attacked model's vocabulary size (so the attacked model
must use that tokenizer), or any model given as ``prior=`` (token ids (B, L) -> logits (B, L, V)).

What this implementation adds to the paper (as in :mod:`.tag`): a language model client (next-token loss) gets
jointly optimised soft next-token targets, and its last position (no embedding gradient) is read from its target
and kept in place by the reorderings; the token-set leak restricts decoding (and a language model's soft targets)
where it applies (``restrict_to_leaked``; LAMP's code's ``use_embedding`` option, off there by default). Measured on
held-out bundled sentences with nearest-token decoding (bench/results/text_attacks_nearest.md), the restriction
raised LAMP's ROUGE-1 in 6 of 8 cells (both models, untrained and trained, batch 1 and 4) and lowered it on the
untrained models at batch 1 (gpt2-tiny: 0.90 vs 1.00), so it stays on; decoding then covers every leaked token
(``cover_leaked``, as TAG's), and a language model's last position is read from the head's targets
(bench/results/text_attacks.md: ROUGE-1 at batch 1 0.92-0.98 where nearest decoding gave 0.29-0.90); ``n_E`` is
the mean norm of the leaked tokens' rows when the restriction applies (of all rows otherwise). Classifier labels:
the threat model's, else recovered by ``label_method`` (the paper assumes them known, recoverable from the
classifier's gradient), or optimised jointly (``label_method="optimise"``). After the search, ``token_rounds``
(default 60, stopping at a round without a change) rounds of greedy discrete steps run on the decoded token ids
themselves (:func:`token_search`: reorderings, exchanges between sequences, replacements by leaked tokens, each
scored by the exact gradient distance of the tokens' own embeddings plus ``token_lm_weight`` times the prior's
log-perplexity): on training sentences (not the held-out ones the bench scores), with the prior's weight at
alpha_lm, ROUGE-2 rose in all five cells tried (e.g. trained gpt2-tiny, batch 1: 0.20 to 0.48) and ROUGE-1 fell in
none. At batch 4 the prior then mixed sequences into fluent fragments, and the reconstructions had most tokens at
their right positions in the wrong sequences (one batch on untrained gpt2-tiny: 58% of the tokens right per position
across the batch, 25% after matching sequences). Hence the defaults ``token_lm_weight=0`` (the exact distance is
zero at the client's tokens without a defense) and half the exchanges between sequences at the same position
(``token_exchange_aligned=0.5``). ROUGE-1 at batch 4 on training sentences, 3 batches per cell (2 where marked), TAG
/ earlier default (alpha_lm, unaligned, 20 rounds) / ``token_lm_weight=0`` / both new defaults and 60 rounds:
untrained gpt2-tiny 0.47 / 0.49 (2) / 0.56 / 0.66 (20 rounds); trained gpt2-tiny 0.44 / 0.42 (2) / 0.38 / 0.47;
untrained bert-tiny 0.53 (2) / 0.45 (2) / 0.65 (2) / 0.76; trained bert-tiny 0.31 / - / 0.37 / 0.40. Exchanging runs
of up to 4 tokens as well (``token_exchange_span=4``) did not help (gpt2-tiny: 0.57 vs 0.66 untrained, 0.46 vs 0.47
trained), so single tokens stay the default. ``token_exchanges=False`` drops the exchanges (at batch 4 with the
earlier defaults: ROUGE-1 0.45 to 0.56 on untrained bert-tiny, 0.46 to 0.38 on trained gpt2-tiny). Each sequence's
random candidates come with the ``token_guided`` (default 16) neighbours whose first-order estimate of the distance's
change is lowest (HotFlip, Ebrahimi et al., ACL 2018, as GCG ranks token replacements, Zou et al. 2023): every
replacement by a leaked token, swap within the sequence and single-token exchange with another sequence, all ranked
from one double-backward pass at the current tokens (:func:`flip_estimates`, :func:`guided_candidates`). On training
sentences at batch 4, from the same continuous-phase result, ROUGE-1 without the token search / random candidates
only / with 16 guided ones: untrained gpt2-tiny 0.53 / 0.70 / 0.93 (ROUGE-2 0.46 to 0.90; 3 batches), trained
gpt2-tiny 0.41 / 0.41 / 0.43 (6 batches), trained bert-tiny 0.37 / 0.41 / 0.41 (3 batches); 32 or 64 guided ones were
no better (untrained gpt2-tiny 0.91 with 32) and cost up to twice the search time, and the prior's weight at alpha_lm
with 16 guided ones lowered ROUGE-1 (untrained gpt2-tiny 0.62, trained 0.34). On the held-out sentences
(bench/results/text_attacks.md, 6 batches per cell) LAMP's ROUGE-1 and token accuracy are above TAG's in all 8
cells (untrained gpt2-tiny: every batch exact at batch 1, ROUGE-1 0.78 vs 0.57 at batch 4; trained gpt2-tiny at batch
4: 0.45 vs 0.42), its ROUGE-2 in 7 (untrained bert-tiny at batch 4: 0.053 vs 0.058).

Threat model: honest-but-curious server, one client's FedSGD gradient of its mean loss, ``B`` and ``L`` known (no
padding), the model's parameters, an auxiliary language model over the model's vocabulary.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gradinv._settings import above, at_least, in_unit_interval, one_of
from gradinv.attacks.base import Attack, AttackOutput, Callback, register_attack
from gradinv.attacks.dager import resolve_spec
from gradinv.attacks.labels import LABEL_METHODS, label_declines, labels_for
from gradinv.attacks.tag import (
    DECODINGS,
    TASKS,
    TextReplay,
    TextSetup,
    TextState,
    adam_search,
    cosine_distance,
    resolve_task,
    resolve_task_safe,
    tag_distance,
    text_problems,
)
from gradinv.errors import AttackError, GradinvError
from gradinv.models.transformer import next_token_loss
from gradinv.types import Observation

OBJECTIVES = ("cosine", "tag")
#: the paper's weights (alpha_lm, alpha_reg) for each objective (LAMP_cos, LAMP_L1L2)
PAPER_WEIGHTS = {"cosine": (0.2, 1.0), "tag": (60.0, 25.0)}
#: the discrete transformations (the paper's Sec. 4.2), applied in turn to the candidates after the identity
TRANSFORMS = ("swap", "move_token", "move_span", "prefix_to_end")


@dataclass(frozen=True)
class LampSettings:
    """LAMP's settings (module docstring for the paper's values and how they were scaled).

    ``objective``: ``cosine`` (LAMP_cos) or ``tag`` (LAMP_L1L2, L1 weight ``alpha``); ``lm_weight`` / ``reg_weight``:
    alpha_lm and alpha_reg (None: the paper's for the objective); ``lr``, ``lr_decay`` every ``decay_every`` steps;
    ``discrete_every``, ``burn_in`` (fraction of the steps before the first discrete step), ``candidates`` per
    sequence and discrete step, ``init_candidates``; ``label_method``: where unknown classifier labels come from
    (``auto`` or a label method, or ``optimise`` them jointly); ``token_rounds``: rounds of discrete steps on the
    decoded token ids after the search (:func:`token_search`, an addition to the paper; 0: off);
    ``token_exchanges``: whether its candidates include tokens exchanged between sequences (batches above one),
    runs of up to ``token_exchange_span`` tokens, a share ``token_exchange_aligned`` of them at the same positions in
    both sequences; ``token_lm_weight``: alpha_lm of that search (None: ``lm_weight``'s; default 0: the exact
    gradient distance of token ids is zero at the client's tokens without a defense, so the search trusts it alone;
    module docstring for the measurements); ``token_guided``: how many more candidates per sequence come ranked by
    HotFlip's first-order estimate (:func:`guided_candidates`; 0: random candidates only); the rest as TAG's."""

    iterations: int = 400
    lr: float = 0.05
    lr_decay: float = 0.89
    decay_every: int = 10
    objective: str = "cosine"
    alpha: float = 0.01
    lm_weight: float | None = None
    reg_weight: float | None = None
    discrete_every: int = 20
    burn_in: float = 0.1
    candidates: int = 50
    init_candidates: int = 50
    decode: str = "cosine"
    restrict_to_leaked: bool = True
    cover_leaked: bool = True
    task: str = "auto"
    label_method: str = "auto"
    log_every: int = 50
    time_budget: float = 0.0
    token_rounds: int = 60
    token_exchanges: bool = True
    token_lm_weight: float | None = 0.0
    token_exchange_span: int = 1
    token_exchange_aligned: float = 0.5
    token_guided: int = 16

    def problems(self) -> list[str]:
        return [
            *at_least("iterations", self.iterations, 1),
            *at_least("token_rounds", self.token_rounds, 0),
            *at_least("token_exchange_span", self.token_exchange_span, 1),
            *at_least("token_guided", self.token_guided, 0),
            *in_unit_interval("token_exchange_aligned", self.token_exchange_aligned),
            *above("lr", self.lr, 0),
            *above("lr_decay", self.lr_decay, 0),
            *at_least("decay_every", self.decay_every, 1),
            *one_of("objective", self.objective, OBJECTIVES),
            *at_least("alpha", self.alpha, 0),
            *([] if self.lm_weight is None else at_least("lm_weight", self.lm_weight, 0)),
            *([] if self.reg_weight is None else at_least("reg_weight", self.reg_weight, 0)),
            *([] if self.token_lm_weight is None else at_least("token_lm_weight", self.token_lm_weight, 0)),
            *at_least("discrete_every", self.discrete_every, 1),
            *in_unit_interval("burn_in", self.burn_in),
            *at_least("candidates", self.candidates, 1),
            *at_least("init_candidates", self.init_candidates, 1),
            *one_of("decode", self.decode, DECODINGS),
            *one_of("task", self.task, TASKS),
            *one_of("label_method", self.label_method, ["auto", "optimise", *sorted(LABEL_METHODS)]),
            *at_least("log_every", self.log_every, 1),
            *at_least("time_budget", self.time_budget, 0),
        ]

    @property
    def weights(self) -> tuple[float, float]:
        """``(alpha_lm, alpha_reg)`` with the paper's values filled in."""
        lm, reg = PAPER_WEIGHTS[self.objective]
        return (lm if self.lm_weight is None else self.lm_weight, reg if self.reg_weight is None else self.reg_weight)

    @property
    def token_weight(self) -> float:
        """alpha_lm of the token-level search (``token_lm_weight``, None: the continuous phase's)."""
        return self.weights[0] if self.token_lm_weight is None else self.token_lm_weight


# -- the discrete transformations -------------------------------------------------------------------------------


def _randint(low: int, high: int, generator: torch.Generator) -> int:
    """A uniform integer in ``[low, high)`` (``low`` when the range is empty)."""
    return low if high <= low else int(torch.randint(low, high, (1,), generator=generator))


def reorder(n: int, kind: str, generator: torch.Generator) -> list[int]:
    """A random reordering of positions ``0..n-1`` of one of LAMP's kinds (the paper's Sec. 4.2): ``swap`` two
    positions, ``move_token`` (take one out, insert it elsewhere), ``move_span`` (take a contiguous span out, insert
    it elsewhere), ``prefix_to_end`` (rotate a prefix to the end). Returns the new order:
    ``new[i] = old[order[i]]``."""
    order = list(range(n))
    if n < 2:
        return order
    if kind == "swap":
        i, j = _randint(0, n, generator), _randint(0, n, generator)
        order[i], order[j] = order[j], order[i]
    elif kind == "move_token":
        i = _randint(0, n, generator)
        token = order.pop(i)
        order.insert(_randint(0, n, generator), token)
    elif kind == "move_span":
        b, e = sorted((_randint(0, n + 1, generator), _randint(0, n + 1, generator)))
        span, rest = order[b:e], order[:b] + order[e:]
        p = _randint(0, len(rest) + 1, generator)
        order = rest[:p] + span + rest[p:]
    elif kind == "prefix_to_end":
        i = _randint(1, n, generator)
        order = order[i:] + order[:i]
    else:
        raise AttackError(f"unknown reordering {kind!r}: use one of {', '.join(TRANSFORMS)}")
    return order


def permuted(state: TextState, row: int, order: list[int]) -> TextState:
    """A copy of ``state`` whose sequence ``row`` has its first ``len(order)`` positions reordered (embeddings and
    a language model's target logits move together; positions after them stay)."""
    index = torch.tensor(order, dtype=torch.long, device=state.x.device)
    n = len(order)
    out = state.detached()
    out.x[row, :n] = state.x.detach()[row, index]
    if state.target_logits is not None:
        out.target_logits[row, :n] = state.target_logits.detach()[row, index]
    return out


@dataclass(frozen=True)
class DiscreteResult:
    """What a discrete step did: the combined score before and after, and the sequences it changed."""

    before: float
    after: float
    changed: tuple[int, ...]


def discrete_step(
    state: TextState,
    *,
    score: Callable[[TextState], float],
    positions: int,
    candidates: int,
    generator: torch.Generator,
    score_many: Callable[[list[TextState]], list[float]] | None = None,
) -> tuple[TextState, DiscreteResult]:
    """LAMP's discrete step: for each sequence in turn, ``candidates`` reorderings of its first ``positions``
    positions (the first is the identity, then the kinds of :data:`TRANSFORMS` in turn) are scored by ``score``
    (the combined loss, lower is better; ``score_many`` scores a list at once, e.g. batched) and the best is kept.
    The returned state's score is never above the given one's (the identity is always a candidate)."""
    current = state.detached()
    before = best = score(current)
    changed = []
    identity = list(range(positions))
    for row in range(current.x.shape[0]):
        orders = [reorder(positions, TRANSFORMS[(k - 1) % len(TRANSFORMS)], generator) for k in range(1, candidates)]
        pool = [permuted(current, row, order) for order in orders if order != identity]
        if not pool:
            continue
        values = score_many(pool) if score_many is not None else [score(c) for c in pool]
        k = min(range(len(pool)), key=values.__getitem__)
        if values[k] < best:
            best, current = values[k], pool[k]
            changed.append(row)
    return current, DiscreteResult(before=before, after=best, changed=tuple(changed))


def token_candidates(
    ids: Tensor,
    row: int,
    *,
    count: int,
    positions: int,
    pool: Tensor | None,
    generator: torch.Generator,
    covered: int | None = None,
    exchange: bool = True,
    span: int = 1,
    aligned: float = 0.0,
) -> list[Tensor]:
    """Up to ``count`` distinct neighbours of the token ids ``ids`` (B, L) that change sequence ``row``: LAMP's
    reorderings (:data:`TRANSFORMS`) of its first ``positions`` tokens, and, in turn with them, a span of ``row``
    exchanged with a span as long of another sequence (batches of more than one; a single token, or with ``span``
    above 1, half the time 2 to ``span`` tokens; a share ``aligned`` at the same positions in both) and a token
    replaced by one of ``pool`` (the leaked token set, when known). With ``pool``, a neighbour must keep every token
    of ``pool`` somewhere in the first ``covered`` positions (default all) of the batch, as the leak says it does."""
    covered = ids.shape[1] if covered is None else covered
    exchanges = ("exchange",) if exchange and ids.shape[0] > 1 else ()
    kinds = [*TRANSFORMS, *exchanges, *(("replace",) if pool is not None else ())]
    out: list[Tensor] = []
    seen = {tuple(ids[row].tolist())}
    for k in range(4 * count):
        if len(out) >= count:
            break
        kind = kinds[k % len(kinds)]
        new = ids.clone()
        if kind == "exchange":
            other = _randint(0, ids.shape[0] - 1, generator)
            other += other >= row
            width = 1
            if min(span, positions) > 1 and _randint(0, 2, generator):
                width = _randint(2, min(span, positions) + 1, generator)
            i = _randint(0, positions - width + 1, generator)
            if aligned > 0 and float(torch.rand((), generator=generator)) < aligned:
                j = i
            else:
                j = _randint(0, positions - width + 1, generator)
            new[row, i : i + width], new[other, j : j + width] = ids[other, j : j + width], ids[row, i : i + width]
        elif kind == "replace":
            i = _randint(0, positions, generator)
            new[row, i] = pool[_randint(0, pool.numel(), generator)]
        else:
            order = torch.tensor(reorder(positions, kind, generator), dtype=torch.long, device=ids.device)
            new[row, :positions] = ids[row, order]
        if pool is not None and not bool(torch.isin(pool, new[:, :covered].reshape(-1)).all()):
            continue
        key = tuple(new[row].tolist())
        if kind == "exchange" or key not in seen:
            seen.add(key)
            out.append(new)
    return out


def flip_estimates(
    ids: Tensor,
    columns: Tensor,
    *,
    embedding: Tensor,
    distance: Callable[[Tensor, Tensor | None], Tensor],
    language_model: bool,
) -> Tensor:
    """HotFlip's first-order estimate (Ebrahimi et al., ACL 2018) of the change in ``distance`` when position
    ``(b, t)`` of the token ids ``ids`` (B, L) holds token ``columns[c]`` instead: (B, L, C).

    ``distance(x, targets)`` is differentiable in the embeddings ``x`` (B, L, D) and, for a language model, in its
    next-token targets given as probabilities (B, L, V) (one-hot at ``ids``; a classifier gets None and keeps its
    labels). The estimate is ``(E[v] - E[ids[b, t]]) . dd/dx[b, t]``, plus ``dd/dT[b, t, v] - dd/dT[b, t, ids[b, t]]``
    for a language model, whose token ``t`` is also the target of position ``t - 1``."""
    with torch.enable_grad():
        x = embedding[ids].detach().clone().requires_grad_(True)
        soft = None
        if language_model:
            soft = F.one_hot(ids, embedding.shape[0]).to(x.dtype).requires_grad_(True)
        value = distance(x, soft)
        grads = torch.autograd.grad(value, [x] if soft is None else [x, soft])
    gx = grads[0]
    est = gx @ embedding[columns].T - (gx * x.detach()).sum(-1, keepdim=True)
    if soft is not None:
        gt = grads[1]
        est = est + gt[..., columns] - gt.gather(-1, ids.unsqueeze(-1))
    return est.detach()


def guided_candidates(
    ids: Tensor,
    row: int,
    scores: Tensor,
    columns: Tensor,
    *,
    count: int,
    positions: int,
    pool: Tensor | None,
    covered: int | None = None,
    exchange: bool = True,
) -> list[Tensor]:
    """Up to ``count`` distinct neighbours of the token ids ``ids`` (B, L) that change sequence ``row``, the lowest
    first by a first-order estimate of the change in the score (HotFlip, Ebrahimi et al., ACL 2018; GCG, Zou et
    al. 2023): ``scores`` (B, L, C) estimates the change when position ``(b, t)`` holds token ``columns[c]``
    (``columns``: sorted token ids holding every token of ``ids`` and of ``pool``). The neighbourhoods: every token
    of ``row`` replaced by one of ``pool`` (of ``columns`` without a pool), two tokens of ``row`` swapped (the sum of
    both positions' estimates), and, with ``exchange``, a token of ``row`` exchanged with one of another sequence
    at any position. With ``pool``, a neighbour must keep every token of ``pool`` in the first ``covered``
    positions of the batch, as :func:`token_candidates`."""
    covered = ids.shape[1] if covered is None else covered
    col = torch.searchsorted(columns, ids)  # (B, L): each token's column
    n = positions
    own = scores[row, :n]  # (n, C)
    flat = [own.reshape(-1)]
    # swaps within ``row``: position i takes the token at j and j the one at i
    at = own.gather(1, col[row, :n].unsqueeze(0).expand(n, n))  # at[i, j]: estimate of i holding row's token j
    swap = at + at.T
    swap = swap.masked_fill(~torch.ones(n, n, dtype=torch.bool, device=ids.device).triu(1), float("inf"))
    flat.append(swap.reshape(-1))
    others = [o for o in range(ids.shape[0]) if o != row] if exchange else []
    for o in others:
        mine = own.gather(1, col[o, :n].unsqueeze(0).expand(n, n))  # row's i holding o's token j
        theirs = scores[o, :n].gather(1, col[row, :n].unsqueeze(0).expand(n, n))  # o's j holding row's token i
        flat.append((mine + theirs.T).reshape(-1))
    values = torch.cat(flat)
    if pool is not None:  # replacements by leaked tokens only
        leaked = torch.isin(columns, pool).unsqueeze(0).expand(n, -1).reshape(-1)
        values[: leaked.numel()] = values[: leaked.numel()].masked_fill(~leaked, float("inf"))
    order = torch.argsort(values, stable=True)
    out: list[Tensor] = []
    seen = {tuple(ids.reshape(-1).tolist())}
    size = [own.numel(), n * n, *[n * n for _ in others]]
    bounds = torch.tensor(size).cumsum(0).tolist()
    for k in order.tolist():
        if len(out) >= count or values[k] == float("inf"):
            break
        new = ids.clone()
        part = next(p for p, b in enumerate(bounds) if k < b)
        r = k - (bounds[part - 1] if part else 0)
        if part == 0:
            new[row, r // own.shape[1]] = columns[r % own.shape[1]]
        elif part == 1:
            i, j = divmod(r, n)
            new[row, i], new[row, j] = ids[row, j], ids[row, i]
        else:
            o = others[part - 2]
            i, j = divmod(r, n)
            new[row, i], new[o, j] = ids[o, j], ids[row, i]
        if pool is not None and not bool(torch.isin(pool, new[:, :covered].reshape(-1)).all()):
            continue
        key = tuple(new.reshape(-1).tolist())
        if key not in seen:
            seen.add(key)
            out.append(new)
    return out


def token_search(
    ids: Tensor,
    *,
    score_many: Callable[[list[Tensor]], list[float]],
    positions: int,
    candidates: int,
    rounds: int,
    pool: Tensor | None,
    generator: torch.Generator,
    covered: int | None = None,
    deadline: float | None = None,
    exchange: bool = True,
    span: int = 1,
    aligned: float = 0.0,
    guide: Callable[[Tensor], tuple[Tensor, Tensor]] | None = None,
    guided: int = 0,
) -> tuple[Tensor, dict[str, Any]]:
    """Discrete steps on the decoded token ids themselves (an addition to LAMP, whose discrete steps reorder
    continuous embeddings): each round, for every sequence in turn, ``candidates`` neighbours
    (:func:`token_candidates`), with ``guided`` more ranked by ``guide`` (ids -> first-order estimates and their
    columns, :func:`guided_candidates`) when given, are scored by ``score_many`` (the gradient distance of the
    tokens' own embeddings plus alpha_lm times the prior's log-perplexity) and the best replaces the current ids if
    it scores lower.
    Stops after ``rounds`` rounds, a round without a change, or at ``deadline`` (a ``time.perf_counter()`` value,
    checked before each round). Greedy: the returned ids never score higher."""
    current = ids.clone()
    best = score_many([current])[0]
    first, changes, ran = best, 0, 0
    estimates = None  # the guide's estimates at ``current``, recomputed after a change only
    for _ in range(rounds):
        if deadline is not None and time.perf_counter() >= deadline:
            break
        ran += 1
        changed = False
        for row in range(current.shape[0]):
            pool_ids = token_candidates(
                current,
                row,
                count=candidates,
                positions=positions,
                pool=pool,
                generator=generator,
                covered=covered,
                exchange=exchange,
                span=span,
                aligned=aligned,
            )
            if guide is not None and guided > 0:
                if estimates is None:
                    estimates = guide(current)
                pool_ids += guided_candidates(
                    current,
                    row,
                    *estimates,
                    count=guided,
                    positions=positions,
                    pool=pool,
                    covered=covered,
                    exchange=exchange,
                )
            if not pool_ids:
                continue
            values = score_many(pool_ids)
            k = min(range(len(values)), key=values.__getitem__)
            if values[k] < best:
                best, current, changed = values[k], pool_ids[k], True
                changes += 1
                estimates = None
        if not changed:
            break
    return current, {"token_rounds": ran, "token_changes": changes, "token_gain": first - best}


# -- the attack -------------------------------------------------------------------------------------------------


def prior_loss(prior: nn.Module, ids: Tensor) -> Tensor:
    """The mean next-token cross-entropy of ``ids`` (B, L) under the language model ``prior`` (its log-perplexity)."""
    logits = prior(ids)
    if not isinstance(logits, Tensor) or logits.dim() != 3:
        raise AttackError(f"the prior returns {type(logits).__name__}, not next-token logits (B, L, V)")
    return next_token_loss(logits, ids)


def prior_losses(prior: nn.Module, ids: Tensor) -> Tensor:
    """:func:`prior_loss` of each of K batches ``ids`` (K, B, L) in one forward pass: (K,)."""
    k, b, length = ids.shape
    flat = ids.reshape(k * b, length)
    logits = prior(flat)
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), flat[:, 1:].reshape(-1), reduction="none")
    return ce.reshape(k, -1).mean(-1)


def check_prior(prior: nn.Module, *, vocab_size: int, length: int, device: torch.device) -> None:
    """Raise :class:`AttackError` unless ``prior`` scores ``length`` token ids of a ``vocab_size`` vocabulary."""
    try:
        with torch.no_grad():
            logits = prior(torch.zeros(1, length, dtype=torch.long, device=device))
    except GradinvError as err:
        raise AttackError(f"the language model prior cannot score {length} tokens: {err}") from None
    if not isinstance(logits, Tensor) or logits.dim() != 3 or logits.shape[-1] < vocab_size:
        shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise AttackError(
            f"the language model prior gives {shape} for (1, {length}) token ids; it must give next-token logits over "
            f"the model's {vocab_size} tokens"
        )


@register_attack
class Lamp(Attack):
    """LAMP (Balunović et al., NeurIPS 2022): TAG's continuous search with an embedding-norm regulariser,
    alternated with discrete reorderings scored by gradient distance plus a language model's perplexity.
    ``prior``: the auxiliary language model (default: the bundled GPT2Tiny of the model's vocabulary size,
    trained on first use); ``spec``: the model's :class:`~gradinv.models.transformer.TextModelSpec`."""

    name = "lamp"
    summary = "Text from gradients with a language model prior and discrete reorderings (Balunović et al., 2022)"
    table1 = {
        "initialisation": "best of Gaussian embeddings and their reorderings, rescaled to the embeddings' norm",
        "objective": "cosine gradient distance (or L2 + L1) + embedding-norm regulariser",
        "optimiser": "Adam lr 0.01 with step decay, alternated with discrete reorderings",
        "priors": "language model perplexity (auxiliary GPT-2), embedding norm",
    }
    Settings = LampSettings
    requires = ("num_samples", "input_shape")

    def __init__(
        self, settings: Any | None = None, *, prior: nn.Module | None = None, spec: Any = None, **overrides: Any
    ) -> None:
        super().__init__(settings, **overrides)
        self.prior = prior
        self.spec = spec

    def _unmet_assumptions(self, observation: Observation) -> list[str]:
        s = self.settings
        reasons = text_problems(observation, self.spec, s.task)
        if reasons:
            return reasons
        task = resolve_task_safe(observation.model, s.task)
        if task == "classifier" and s.label_method != "optimise" and observation.knowledge.labels is None:
            reasons += label_declines(observation, s.label_method)
        return reasons

    def _prior(self, vocab_size: int, progress: bool) -> nn.Module:
        if self.prior is not None:
            return self.prior
        from gradinv.models.language import bundled_language_model

        return bundled_language_model(vocab_size, progress=progress)

    def _reconstruct(
        self,
        observation: Observation,
        *,
        generator: torch.Generator,
        progress: bool,
        callback: Callback | None,
    ) -> AttackOutput:
        s = self.settings
        start = time.perf_counter()
        spec = resolve_spec(observation.model, self.spec)
        task = resolve_task(observation.model, s.task)
        label_source = None
        if task == "classifier" and observation.knowledge.labels is None and s.label_method != "optimise":
            labels, label_source = labels_for(observation, method=s.label_method)
            observation = observation.with_knowledge(labels=labels)
        setup = TextSetup.build(observation, spec=spec, task=task, restrict=s.restrict_to_leaked, cover=s.cover_leaked)
        replay = TextReplay(observation, spec=spec, task=task)
        lm_weight, reg_weight = s.weights
        device = setup.device
        token_weight = s.token_weight if s.token_rounds else 0.0
        prior = None
        if lm_weight > 0 or token_weight > 0:
            prior = self._prior(int(spec.vocab_size), progress)
            prior = prior.to(device).eval()
            check_prior(prior, vocab_size=int(spec.vocab_size), length=setup.length, device=device)

        def rec_distance(update: dict[str, Tensor]) -> Tensor:
            if s.objective == "cosine":
                return cosine_distance(update, replay.target)
            return tag_distance(update, replay.target, alpha=s.alpha)

        def distance(st: TextState, *, create_graph: bool) -> Tensor:
            return rec_distance(replay.gradient(st.x, setup.targets(st), create_graph=create_graph))

        # positions the reorderings move and the regulariser sees: a language model's last one stays (module doc)
        positions = setup.length - 1 if task == "language_model" else setup.length
        rows = setup.embedding if setup.allowed is None else setup.embedding[setup.allowed]
        norm = float(rows.norm(dim=-1).mean())

        def combined(st: TextState) -> float:
            """The discrete steps' score: gradient distance + alpha_lm * the prior's log-perplexity."""
            with torch.enable_grad():
                value = float(distance(st, create_graph=False).detach())
            if prior is not None:
                with torch.no_grad():
                    value += lm_weight * float(prior_loss(prior, setup.decode(st, metric=s.decode)))
            return value

        def with_prior(values: Tensor, ids: list[Tensor], weight: float) -> list[float]:
            """Gradient distances of candidates plus ``weight`` times the prior's log-perplexity of their token ids
            (all candidates in one forward pass)."""
            if prior is not None and weight > 0:
                with torch.no_grad():
                    values = values + weight * prior_losses(prior, torch.stack(ids))
            return [float(v) for v in values]

        def combined_many(states: list[TextState]) -> list[float]:
            """:func:`combined` of many candidates: the gradients one by one (``vmap`` over the candidates measured
            slower on a CPU for GPT2Tiny of width 128), the prior on all of them at once."""
            with torch.enable_grad():
                values = torch.stack([distance(st, create_graph=False).detach() for st in states])
            return with_prior(values, [setup.decode(st, metric=s.decode) for st in states], lm_weight)

        state = self._initial_state(setup, distance, norm=norm, positions=positions, generator=generator)

        def cost(st: TextState) -> Tensor:
            reg = (st.x[:, :positions].norm(dim=-1).mean() - norm).pow(2)
            return distance(st, create_graph=True) + reg_weight * reg

        burn_in = int(s.burn_in * s.iterations)
        record: dict[str, Any] = {
            "discrete_steps": 0,
            "discrete_changes": 0,
            "discrete_gain": 0.0,
            "discrete_trace": [],
        }

        def hook(it: int, st: TextState, _optimizer: torch.optim.Optimizer) -> None:
            if it < burn_in or it % s.discrete_every != 1 % s.discrete_every:
                return
            new, result = discrete_step(
                st,
                score=combined,
                score_many=combined_many,
                positions=positions,
                candidates=s.candidates,
                generator=generator,
            )
            with torch.no_grad():
                for t, u in zip(st.tensors(), new.tensors(), strict=True):
                    t.copy_(u)
            record["discrete_steps"] += 1
            record["discrete_changes"] += len(result.changed)
            record["discrete_gain"] += result.before - result.after
            record["discrete_trace"].append((it, result.before, result.after))

        best, trace, stopped, ran = adam_search(
            state,
            cost,
            lr=s.lr,
            iterations=s.iterations,
            log_every=s.log_every,
            time_budget=s.time_budget,
            start=start,
            decode=lambda st: setup.decode(st, metric=s.decode),
            callback=callback,
            progress=progress,
            desc="lamp",
            schedule=lambda it: s.lr_decay ** (it // s.decay_every),
            hook=hook,
        )
        ids = setup.decode(best.state, metric=s.decode)
        labels, source = setup.labels(best.state)
        if label_source is not None:
            source = label_source
        if s.token_rounds:

            def exact_many(candidates: list[Tensor]) -> list[float]:
                """The discrete score of token ids: the gradient distance of their own embeddings (next tokens or
                the labels as targets) plus alpha_lm * the prior's log-perplexity."""
                with torch.enable_grad():
                    values = torch.stack(
                        [
                            rec_distance(
                                replay.gradient(
                                    setup.embedding[c], c if task == "language_model" else labels, create_graph=False
                                )
                            ).detach()
                            for c in candidates
                        ]
                    )
                return with_prior(values, candidates, token_weight)

            pool = None if setup.allowed is None else torch.nonzero(setup.allowed).flatten()
            vocab = setup.embedding.shape[0]

            def soft_distance(x: Tensor, soft: Tensor | None) -> Tensor:
                """The distance with a language model's targets as probabilities (a classifier keeps its labels)."""
                return rec_distance(replay.gradient(x, labels if soft is None else soft, create_graph=True))

            def guide(c: Tensor) -> tuple[Tensor, Tensor]:
                """First-order estimates for :func:`guided_candidates` over the pool and the current tokens (every
                token without a pool)."""
                columns = (
                    torch.arange(vocab, device=device) if pool is None else torch.unique(torch.cat([pool, c.flatten()]))
                )
                est = flip_estimates(
                    c,
                    columns,
                    embedding=setup.embedding,
                    distance=soft_distance,
                    language_model=task == "language_model",
                )
                return est, columns

            ids, searched = token_search(
                ids,
                score_many=exact_many,
                positions=setup.length,
                candidates=s.candidates,
                rounds=s.token_rounds,
                pool=pool,
                generator=generator,
                covered=setup.length - 1 if task == "language_model" else setup.length,
                deadline=start + s.time_budget if s.time_budget else None,
                exchange=s.token_exchanges,
                span=s.token_exchange_span,
                aligned=s.token_exchange_aligned,
                guide=guide,
                guided=s.token_guided,
            )
            record.update(searched)
        extras = {
            **setup.extras(),
            **record,
            "stopped": stopped,
            "iterations_run": ran,
            "best_cost": best.cost,
            "embedding_norm": norm,
            "prior": None if prior is None else type(prior).__name__,
            "final_score": combined(best.state),
        }
        return AttackOutput(inputs=ids, labels=labels, label_source=source, trace=tuple(trace), extras=extras)

    def _initial_state(
        self,
        setup: TextSetup,
        distance: Callable[..., Tensor],
        *,
        norm: float,
        positions: int,
        generator: torch.Generator,
    ) -> TextState:
        """The best of ``init_candidates`` unit Gaussian draws by gradient distance, then the best of as many random
        reorderings of it (all sequences at once), every embedding rescaled to norm ``norm`` (LAMP's start)."""
        s = self.settings
        base = setup.initial_state(scale=1.0, generator=generator)

        def value(st: TextState) -> float:
            with torch.enable_grad():
                return float(distance(st, create_graph=False).detach())

        best, best_value = base, value(base)
        for _ in range(s.init_candidates - 1):
            draw = base.detached()
            draw.x = torch.randn(base.x.shape, generator=generator).to(base.x.device)
            v = value(draw)
            if v < best_value:
                best, best_value = draw, v
        for _ in range(s.init_candidates):
            shuffled = best
            for row in range(best.x.shape[0]):
                order = torch.randperm(positions, generator=generator).tolist()
                shuffled = permuted(shuffled, row, order)
            v = value(shuffled)
            if v < best_value:
                best, best_value = shuffled, v
        state = best.detached()
        state.x = state.x / state.x.norm(dim=-1, keepdim=True).clamp_min(1e-12) * norm
        return state


__all__ = [
    "OBJECTIVES",
    "PAPER_WEIGHTS",
    "TRANSFORMS",
    "DiscreteResult",
    "Lamp",
    "LampSettings",
    "check_prior",
    "discrete_step",
    "flip_estimates",
    "guided_candidates",
    "permuted",
    "prior_loss",
    "prior_losses",
    "reorder",
    "token_candidates",
    "token_search",
]
