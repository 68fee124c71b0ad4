"""TAG: gradient matching on continuous token embeddings (Deng, Wang, Li, Wang, Shang, Liu, Rajasekaran, Ding,
"TAG: Gradient Attack on Transformer-based Language Models", Findings of EMNLP 2021).

Text is discrete, so TAG optimises what the model reads after its embedding lookup: dummy token embeddings
``x`` (B, L, D) (DLG's dummy data, Zhu et al. 2019, moved past the lookup) together with dummy labels (a softmax
over free logits; the paper needs no ground-truth label), so that the gradient they produce matches the observed
one in TAG's distance (the paper's Eq. 5)::

    D(g, g*) = ||g - g*||_2^2 + alpha * ||g - g*||_1      summed over the matched parameters

with ``alpha = 0.01`` and Adam (the TAG baseline of Balunović et al.'s LAMP code uses alpha 0.01 and lr 0.1 on
BERT-base; our default lr is 0.05, see :class:`TagSettings`). The paper weights the L1 term per layer (its Eq. 5,
larger nearer the input); we keep one alpha for every layer, as LAMP's re-implementation does. Each
position is finally decoded to the token whose embedding row is nearest (cosine similarity by default, as LAMP
decodes; ``decode="euclidean"`` for the Euclidean distance).

Choices this implementation makes (and why):

- *The matched parameters.* The dummy input enters after the lookup, so the replayed gradient of the token
  embedding matrix is zero; that entry is left out of the distance (a tied output head's gradient goes with it).
- *Initialisation.* Gaussian dummies whose per-entry standard deviation is the token embedding matrix's
  (``init_scale=None``); unit-variance noise (DLG) is 50x the size of a GPT-2-style embedding at init, and the
  residual stream of a pre-LayerNorm model never forgets it.
- *Language models.* For a causal LM trained with the next-token loss the "labels" are the tokens themselves,
  shifted. As TAG does with a classifier's labels, we optimise soft targets jointly (a softmax over free
  logits (B, L, V); position ``t``'s target row is token ``t``): the dummy embeddings cannot be the targets
  (an argmax is not differentiable). Under the mean next-token loss the last position's input reaches no
  scored output, so its embedding gets no gradient: the last token is read from its soft target alone.
- *The token-set leak* (Melis et al., S&P 2019; :func:`gradinv.attacks.token_leak.token_set`): the nonzero
  rows of an untied token embedding's gradient are the batch's tokens. With ``restrict_to_leaked`` (default)
  decoding, and a language model's soft targets, are restricted to them wherever the leak applies (not for a
  tied embedding). An LM's last position leaves no embedding gradient; an untied output head's gradient shows the
  batch's next-token targets (:func:`~gradinv.attacks.token_leak.target_token_set`), to which its soft target is
  restricted instead (free when the head is tied). LAMP's code uses the
  same leak (its ``use_embedding`` flag). ``extras["restricted"]`` says whether it applied. The leak lists
  *exactly* the batch's tokens, so with ``cover_leaked`` (default) decoding also uses each of them at least once:
  the positions' assignment to tokens of largest total closeness under that constraint (Hungarian algorithm,
  :func:`covering_tokens`), instead of each position's nearest token on its own, which lets several positions
  collapse onto one token (``extras["covered"]``); a target that is no input anywhere goes to a last position.

Threat model: honest-but-curious server, one client's FedSGD gradient of its mean loss, the number of sequences
``B`` and their length ``L`` known (no padding), the model's parameters and its token embedding matrix (a
:class:`~gradinv.models.transformer.TextModelSpec`). Classifier labels are optimised unless the threat model
gives them.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gradinv._settings import above, at_least, one_of
from gradinv.attacks.base import Attack, AttackOutput, Callback, register_attack
from gradinv.attacks.components.replay import sent_entries
from gradinv.attacks.dager import resolve_spec
from gradinv.errors import AttackError, GradinvError
from gradinv.fl.functional import bind_state, stateless_twin
from gradinv.types import Observation, TracePoint

#: what the client trains: ``language_model`` (next-token loss on its own tokens) or ``classifier`` (cross-entropy
#: against a label per sequence); ``auto`` decides from the model (:func:`text_task`)
TASKS = ("auto", "language_model", "classifier")
#: how a dummy embedding is decoded to a token: the nearest embedding row by cosine similarity or Euclidean distance
DECODINGS = ("cosine", "euclidean")


# -- the client's task ------------------------------------------------------------------------------------------


def text_task(model: nn.Module) -> str:
    """``"language_model"`` for a causal LM trained on its own next tokens (:class:`GPT2Tiny`, a Hugging Face
    GPT-2 in :class:`~gradinv.models.hf.HuggingFaceModel`), ``"classifier"`` for a sequence classifier
    (:class:`BertTiny`, a Hugging Face BERT classifier); any other model by the shape of its output on two token
    ids: (1, 2, V) logits are a language model's, (1, C) a classifier's. Raises :class:`AttackError` otherwise."""
    from gradinv.models.transformer import BertTiny, GPT2Tiny

    if isinstance(model, GPT2Tiny):
        return "language_model"
    if isinstance(model, BertTiny):
        return "classifier"
    kind = getattr(model, "kind", None)
    if kind == "gpt2":
        return "language_model"
    if kind == "bert":
        return "classifier"
    twin = stateless_twin(model, train_mode=False)
    device = next(iter(twin.parameters())).device
    try:
        with torch.no_grad():
            out = twin(torch.zeros(1, 2, dtype=torch.long, device=device))
    except (GradinvError, RuntimeError, TypeError, ValueError) as err:
        raise AttackError(f"{type(model).__name__} does not take token ids (B, L): {err}") from None
    if isinstance(out, Tensor) and out.dim() == 3:
        return "language_model"
    if isinstance(out, Tensor) and out.dim() == 2:
        return "classifier"
    raise AttackError(
        f"{type(model).__name__} returns {type(out).__name__} for token ids, not logits (1, 2, V) or (1, C): wrap a "
        "Hugging Face model in gradinv.models.hf.HuggingFaceModel"
    )


def resolve_task(model: nn.Module, task: str) -> str:
    """``task`` unless it is ``"auto"``, then :func:`text_task`."""
    return text_task(model) if task == "auto" else task


def soft_next_token_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """The mean next-token cross-entropy of a causal LM: ``logits[:, t]`` (B, L, V) against token ``t + 1``,
    given as ids (B, L) (exactly :func:`~gradinv.models.transformer.next_token_loss`) or as probabilities
    (B, L, V) over the vocabulary (soft targets; row ``t`` describes token ``t``, row 0 is not used)."""
    if not targets.is_floating_point():
        from gradinv.models.transformer import next_token_loss

        return next_token_loss(logits, targets)
    log_p = F.log_softmax(logits[:, :-1], dim=-1)
    return -(targets[:, 1:] * log_p).sum(-1).mean()


def classifier_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean cross-entropy against class ids (B,) or probabilities (B, C)."""
    if not targets.is_floating_point():
        return F.cross_entropy(logits, targets.long())
    return -(targets * F.log_softmax(logits, dim=-1)).sum(-1).mean()


# -- replaying the client ----------------------------------------------------------------------------------------


class TextReplay:
    """The client's FedSGD gradient on candidate token embeddings, by plain autograd on a stateless copy of the
    model (the observed model is never touched).

    ``names``: the update entries compared (every shared parameter but the token embedding, whose replayed
    gradient is zero when the lookup is skipped); ``target``: the observed update on them (masked, with
    ``mask``, to the entries a pruning defense sent). ``gradient(x, targets, create_graph=...)`` returns the
    replayed gradient on ``names``.
    """

    def __init__(self, observation: Observation, *, spec: Any, task: str) -> None:
        device = observation.device
        self.task = task
        self.twin = stateless_twin(observation.model, train_mode=observation.train_mode).to(device)
        self.params = {k: v.detach().to(device).clone().requires_grad_(True) for k, v in observation.parameters.items()}
        buffers = {k: v.detach().to(device).clone() for k, v in observation.buffers.items()}
        bind_state(self.twin, self.params, buffers)
        self.names = tuple(k for k in observation.update if k in self.params and k != spec.token_embedding)
        if not self.names:
            raise AttackError("the update holds no parameter besides the token embedding: nothing to match")
        mask = sent_entries(observation)
        self.mask = None if mask is None else {k: mask[k].to(device) for k in self.names}
        target = {k: observation.update[k].detach().to(device) for k in self.names}
        self.target = target if self.mask is None else {k: target[k] * self.mask[k] for k in self.names}
        self.loss = soft_next_token_loss if task == "language_model" else classifier_loss

    def gradient(self, x: Tensor, targets: Tensor, *, create_graph: bool) -> dict[str, Tensor]:
        """The gradient of the client's mean loss on embeddings ``x`` (B, L, D) and ``targets``."""
        out = self.twin(x)
        if not isinstance(out, Tensor):
            raise AttackError(f"the model returns {type(out).__name__}, not a logits tensor")
        loss = self.loss(out, targets)
        grads = torch.autograd.grad(
            loss, [self.params[k] for k in self.names], create_graph=create_graph, allow_unused=True
        )
        pairs = zip(self.names, grads, strict=True)
        update = {k: torch.zeros_like(self.params[k]) if g is None else g for k, g in pairs}
        if self.mask is not None:
            update = {k: update[k] * self.mask[k] for k in self.names}
        return update


def tag_distance(candidate: Mapping[str, Tensor], target: Mapping[str, Tensor], *, alpha: float) -> Tensor:
    """TAG's distance (Deng et al. 2021, Eq. 5, one ``alpha`` for every layer): ``sum_k ||c_k - t_k||_2^2 +
    alpha * ||c_k - t_k||_1`` over the parameters ``k`` of ``target``."""
    total = 0.0
    for k, t in target.items():
        diff = candidate[k] - t
        total = total + diff.pow(2).sum() + alpha * diff.abs().sum()
    return total


def cosine_distance(candidate: Mapping[str, Tensor], target: Mapping[str, Tensor]) -> Tensor:
    """LAMP's cosine distance (Balunović et al. 2022, Sec. 4): ``1 - cos(c_k, t_k)`` per parameter, averaged over
    the parameters of ``target`` (a parameter whose observed gradient is zero is skipped)."""
    terms = []
    for k, t in target.items():
        t_norm = t.norm()
        if not float(t_norm) > 0:
            continue
        c = candidate[k]
        terms.append(1 - (c * t).sum() / (c.norm() * t_norm).clamp_min(1e-30))
    if not terms:
        raise AttackError("every matched gradient is zero: nothing to match")
    return torch.stack(terms).mean()


# -- the token embedding, the leak, decoding --------------------------------------------------------------------


def embedding_matrix(observation: Observation, spec: Any) -> Tensor:
    """The token embedding matrix (V, D) the server holds (detached, on the update's device)."""
    if spec.token_embedding not in observation.parameters:
        raise AttackError(f"the parameters have no token embedding {spec.token_embedding!r}: name it in the spec")
    return observation.parameters[spec.token_embedding].detach().to(observation.device)


def leaked_tokens(observation: Observation, spec: Any) -> tuple[Tensor | None, str]:
    """The batch's token set from the token-set leak (:func:`~gradinv.attacks.token_leak.token_set`), or None and
    the reason it does not apply (tied embedding, dense gradient, no embedding gradient shared)."""
    from gradinv.attacks.token_leak import token_set

    try:
        tokens = token_set(observation, spec=spec)
    except AttackError as err:
        return None, str(err)
    if tokens.numel() == 0:
        return None, "the token embedding's gradient is zero"
    return tokens.to(observation.device), "token-set leak"


def allowed_mask(vocab: int, tokens: Tensor | None, device: torch.device) -> Tensor | None:
    """A boolean (V,) mask of ``tokens`` (None: every token allowed)."""
    if tokens is None:
        return None
    mask = torch.zeros(vocab, dtype=torch.bool, device=device)
    mask[tokens] = True
    return mask


def token_scores(x: Tensor, embedding: Tensor, *, metric: str) -> Tensor:
    """(..., V): how close each embedding ``x`` (..., D) is to every row of ``embedding`` (V, D), larger is closer:
    the cosine similarity, or minus the Euclidean distance."""
    if metric == "cosine":
        return F.normalize(x, dim=-1) @ F.normalize(embedding, dim=-1).T
    if metric == "euclidean":
        return -torch.cdist(x.reshape(-1, x.shape[-1]), embedding).reshape(*x.shape[:-1], embedding.shape[0])
    raise AttackError(f"unknown decoding {metric!r}: use one of {', '.join(DECODINGS)}")


def nearest_tokens(x: Tensor, embedding: Tensor, *, metric: str = "cosine", allowed: Tensor | None = None) -> Tensor:
    """The token id of the embedding row nearest to each ``x`` (..., D) by ``metric``, among the ``allowed`` ones
    (a boolean (V,) mask; None: all)."""
    scores = token_scores(x, embedding, metric=metric)
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    return scores.argmax(-1)


def cover_assignment(scores: Tensor, *, free: Tensor | None = None) -> Tensor:
    """For ``scores`` (P, n) of P positions against n <= P tokens (larger is closer): the assignment with the
    largest total score in which every token is used at least once (Hungarian algorithm, Kuhn 1955, on the n token
    columns and P - n free columns). A position in a free column scores ``free`` (P,) (default: its best of the n
    tokens). Returns each position's token index, -1 where it took a free column."""
    from scipy.optimize import linear_sum_assignment

    positions, n = scores.shape
    free = scores.max(-1).values if free is None else free
    gain = torch.cat([scores, free.unsqueeze(1).expand(positions, positions - n)], dim=1)
    rows, cols = linear_sum_assignment(gain.detach().to(torch.float64).cpu().numpy(), maximize=True)
    index = torch.full((positions,), -1, dtype=torch.long)
    must = cols < n
    index[torch.as_tensor(rows[must])] = torch.as_tensor(cols[must])
    return index.to(scores.device)


def covering_tokens(x: Tensor, embedding: Tensor, *, metric: str = "cosine", allowed: Tensor) -> Tensor:
    """Token ids (...) for embeddings ``x`` (..., D) such that every ``allowed`` token is used at least once (the
    token-set leak lists exactly the batch's tokens, so a decoding that leaves one out is wrong somewhere): the
    decoding of largest total closeness (:func:`token_scores`) under that constraint (:func:`cover_assignment`).
    Falls back to :func:`nearest_tokens` when there are fewer positions than allowed tokens."""
    tokens = allowed.nonzero().flatten()
    flat = x.reshape(-1, x.shape[-1])
    if tokens.numel() == 0 or tokens.numel() > flat.shape[0]:
        return nearest_tokens(x, embedding, metric=metric, allowed=allowed)
    scores = token_scores(flat, embedding[tokens], metric=metric)
    index = cover_assignment(scores)
    index = torch.where(index < 0, scores.argmax(-1), index)
    return tokens[index].reshape(x.shape[:-1])


def target_mask(
    length: int, vocab: int, allowed: Tensor | None, device: torch.device, *, targets: Tensor | None = None
) -> Tensor | None:
    """A language model's soft-target mask (L, V): positions ``1..L-2`` restricted to ``allowed`` (the leaked
    tokens); the last position, whose token leaves no embedding gradient, restricted to ``targets`` (a boolean
    (V,) mask of the tokens an untied head's gradient shows as targets, :func:`last_token_targets`) or free; None
    when nothing is restricted."""
    if allowed is None:
        return None
    mask = allowed.expand(length, vocab).clone()
    mask[-1] = True if targets is None else targets
    return mask


def last_token_targets(observation: Observation, spec: Any, allowed: Tensor) -> tuple[Tensor | None, Tensor | None]:
    """What the token-set leak says about a language model's last position: the tokens an untied output head's
    gradient shows as next-token targets (:func:`~gradinv.attacks.token_leak.target_token_set`, a boolean (V,)
    mask; the last token is one of them), and those of them that are no input anywhere (``allowed``), which only a
    last position can hold (token ids; None unless there are at most B of them, more means the head's reading is
    off). ``(None, None)`` when the head cannot be read (tied to the embedding, no head in the update)."""
    from gradinv.attacks.token_leak import target_token_set

    try:
        found = target_token_set(observation, spec=spec)
    except AttackError:
        return None, None
    if found.numel() == 0:
        return None, None
    mask = allowed_mask(allowed.numel(), found.to(allowed.device), allowed.device)
    only_last = (mask & ~allowed).nonzero().flatten()
    fits = 0 < only_last.numel() <= int(observation.knowledge.num_samples)
    return mask, only_last if fits else None


def soft_targets(logits: Tensor, mask: Tensor | None) -> Tensor:
    """``softmax(logits)`` over the vocabulary, zero outside ``mask`` (broadcast (L, V); None: no mask)."""
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf"))
    return logits.softmax(-1)


def decode_language_model(
    x: Tensor,
    target_logits: Tensor,
    embedding: Tensor,
    *,
    metric: str,
    allowed: Tensor | None,
    mask: Tensor | None,
    cover: bool = False,
    only_last: Tensor | None = None,
) -> Tensor:
    """Token ids (B, L) of an LM candidate: positions ``0..L-2`` from their embeddings (nearest allowed row; with
    ``cover``, every allowed token used at least once, :func:`covering_tokens`), the last position from its soft
    target (its embedding gets no gradient under the next-token loss, so the leak does not list it; with ``cover``,
    each token of ``only_last`` at some last position, :func:`cover_assignment`)."""
    ids = nearest_tokens(x, embedding, metric=metric, allowed=allowed)
    if cover and allowed is not None:
        ids[:, :-1] = covering_tokens(x[:, :-1], embedding, metric=metric, allowed=allowed)
    last = target_logits[:, -1]
    if mask is not None:
        last = last.masked_fill(~mask[-1], float("-inf"))
    ids[:, -1] = last.argmax(-1)
    if cover and only_last is not None and only_last.numel() <= last.shape[0]:
        scores = last.log_softmax(-1)
        index = cover_assignment(scores[:, only_last], free=scores.max(-1).values)
        chosen = index >= 0
        ids[chosen, -1] = only_last[index[chosen]]
    return ids


def default_init_scale(embedding: Tensor) -> float:
    """The per-entry standard deviation of the token embedding matrix (the scale of real inputs)."""
    return float(embedding.std()) or 1.0


# -- the attack -------------------------------------------------------------------------------------------------


def text_problems(observation: Observation, spec_override: Any, task: str) -> list[str]:
    """The assumptions TAG and LAMP share that ``observation`` breaks (knowledge of B and L is given)."""
    try:
        spec = resolve_spec(observation.model, spec_override)
    except AttackError as err:
        return [str(err)]
    reasons = []
    shape = tuple(observation.knowledge.input_shape)
    if len(shape) != 1:
        reasons.append(f"text attacks read token sequences: input_shape must be (L,), got {shape}")
    elif shape[0] > int(spec.max_positions):
        reasons.append(f"sequence length {shape[0]} exceeds the model's {spec.max_positions} positions")
    elif shape[0] < 2 and resolve_task_safe(observation.model, task) == "language_model":
        reasons.append("a next-token loss needs sequences of at least 2 tokens")
    if observation.update_kind != "gradient":
        reasons.append("this attack replays one FedSGD gradient (FedAvg's local steps are not replayed)")
    if observation.clients != 1:
        reasons.append("this attack reads one client's update (secure aggregation of several is not supported)")
    if spec.token_embedding not in observation.parameters:
        reasons.append(f"the parameters have no token embedding {spec.token_embedding!r}")
    return reasons


def resolve_task_safe(model: nn.Module, task: str) -> str | None:
    """:func:`resolve_task`, or None when the model's task cannot be told (the other checks report why)."""
    try:
        return resolve_task(model, task)
    except AttackError:
        return None


def initial_embeddings(
    batch: int, length: int, width: int, *, scale: float, generator: torch.Generator, device: torch.device
) -> Tensor:
    """Gaussian dummy embeddings (B, L, D) of per-entry standard deviation ``scale``, drawn on the CPU from
    ``generator`` (the same numbers on every device)."""
    return (torch.randn(batch, length, width, generator=generator) * scale).to(device)


@dataclass(frozen=True)
class TagSettings:
    """TAG's settings. ``iterations``: Adam steps (LAMP's TAG baseline runs 2500 on BERT-base; 500 here, for the
    small models a CPU attacks); ``lr``: 0.05, no decay (that baseline's is 0.1, for BERT-base's embeddings of
    per-entry std ~0.05; on GPT2Tiny of width 32-64, whose embeddings start at std 0.02, 0.05 did as well as 0.1 at
    batch 1 and better at batch 2, and 0.3 diverged); ``alpha``: weight of the L1 term
    (0.01); ``init_scale``: standard deviation of the initial dummy entries (None: the token embedding matrix's);
    ``decode``: nearest row by ``cosine`` or ``euclidean``; ``restrict_to_leaked``: decode (and, for a language
    model, target) only the tokens the token-set leak shows, where it applies; ``cover_leaked``: and decode every
    leaked token at least once (:func:`covering_tokens`); ``task``: ``auto``,
    ``language_model`` or ``classifier``; ``log_every``: trace interval; ``time_budget``: seconds (0: none)."""

    iterations: int = 500
    lr: float = 0.05
    alpha: float = 0.01
    init_scale: float | None = None
    decode: str = "cosine"
    restrict_to_leaked: bool = True
    cover_leaked: bool = True
    task: str = "auto"
    log_every: int = 50
    time_budget: float = 0.0

    def problems(self) -> list[str]:
        return [
            *at_least("iterations", self.iterations, 1),
            *above("lr", self.lr, 0),
            *at_least("alpha", self.alpha, 0),
            *([] if self.init_scale is None else above("init_scale", self.init_scale, 0)),
            *one_of("decode", self.decode, DECODINGS),
            *one_of("task", self.task, TASKS),
            *at_least("log_every", self.log_every, 1),
            *at_least("time_budget", self.time_budget, 0),
        ]


@dataclass
class TextState:
    """One candidate of a continuous text attack: embeddings (B, L, D) and, when optimised, label logits (B, C)
    or a language model's target logits (B, L, V)."""

    x: Tensor
    label_logits: Tensor | None = None
    target_logits: Tensor | None = None

    def tensors(self) -> list[Tensor]:
        return [t for t in (self.x, self.label_logits, self.target_logits) if t is not None]

    def detached(self) -> TextState:
        """A copy of detached clones (what the search keeps as its best, what reorderings change)."""
        parts = (self.x, self.label_logits, self.target_logits)
        return TextState(*(None if t is None else t.detach().clone() for t in parts))


@register_attack
class Tag(Attack):
    """TAG (Deng et al., Findings of EMNLP 2021): dummy token embeddings and labels optimised with Adam to match
    the gradient in ``||.||_2^2 + alpha ||.||_1``, decoded to the nearest tokens. ``spec``: the model's
    :class:`~gradinv.models.transformer.TextModelSpec` (default: ``text_model_spec(observation.model)``)."""

    name = "tag"
    summary = "Text from gradients: dummy embeddings matched in L2 + L1, nearest tokens (Deng et al., EMNLP 2021)"
    table1 = {
        "initialisation": "Gaussian token embeddings (and label / next-token logits)",
        "objective": "squared L2 + 0.01 L1 gradient distance",
        "optimiser": "Adam, lr 0.05 (0.1 in LAMP's re-run on BERT-base)",
        "priors": "-",
    }
    Settings = TagSettings
    requires = ("num_samples", "input_shape")

    def __init__(self, settings: Any | None = None, *, spec: Any = None, **overrides: Any) -> None:
        super().__init__(settings, **overrides)
        self.spec = spec

    def _unmet_assumptions(self, observation: Observation) -> list[str]:
        return text_problems(observation, self.spec, self.settings.task)

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
        setup = TextSetup.build(observation, spec=spec, task=task, restrict=s.restrict_to_leaked, cover=s.cover_leaked)
        replay = TextReplay(observation, spec=spec, task=task)
        scale = s.init_scale if s.init_scale is not None else default_init_scale(setup.embedding)
        state = setup.initial_state(scale=scale, generator=generator)

        def cost(st: TextState) -> Tensor:
            return tag_distance(
                replay.gradient(st.x, setup.targets(st), create_graph=True), replay.target, alpha=s.alpha
            )

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
            desc="tag",
        )
        ids = setup.decode(best.state, metric=s.decode)
        labels, label_source = setup.labels(best.state)
        extras = {**setup.extras(), "stopped": stopped, "iterations_run": ran, "best_cost": best.cost}
        return AttackOutput(inputs=ids, labels=labels, label_source=label_source, trace=tuple(trace), extras=extras)


# -- what TAG and LAMP share: the set-up and the Adam loop ----------------------------------------------------


@dataclass(frozen=True, eq=False)
class TextSetup:
    """What a continuous text attack derives from the observation before it starts: the task, the batch's shape,
    the token embedding matrix, the leaked token set (when it applies) and the known labels."""

    task: str
    batch: int
    length: int
    embedding: Tensor
    allowed: Tensor | None
    mask: Tensor | None
    restricted_reason: str
    known_labels: Tensor | None
    num_classes: int | None
    device: torch.device
    cover: bool = False
    only_last: Tensor | None = None

    @classmethod
    def build(cls, observation: Observation, *, spec: Any, task: str, restrict: bool, cover: bool = False) -> TextSetup:
        device = observation.device
        batch, length = int(observation.knowledge.num_samples), int(observation.knowledge.input_shape[0])
        embedding = embedding_matrix(observation, spec)
        vocab = embedding.shape[0]
        tokens, reason = leaked_tokens(observation, spec) if restrict else (None, "restrict_to_leaked=False")
        allowed = allowed_mask(vocab, tokens, device)
        mask, only_last = None, None
        if task == "language_model":
            targets, only_last = (None, None) if allowed is None else last_token_targets(observation, spec, allowed)
            mask = target_mask(length, vocab, allowed, device, targets=targets)
        known = observation.knowledge.labels
        known = None if known is None or task == "language_model" else known.to(device).long()
        num_classes = None
        if task == "classifier":
            twin = stateless_twin(observation.model, train_mode=False)
            with torch.no_grad():
                out = twin(torch.zeros(1, length, dtype=torch.long, device=device))
            num_classes = int(out.shape[-1])
        return cls(task, batch, length, embedding, allowed, mask, reason, known, num_classes, device, cover, only_last)

    def initial_state(self, *, scale: float, generator: torch.Generator) -> TextState:
        x = initial_embeddings(
            self.batch, self.length, self.embedding.shape[1], scale=scale, generator=generator, device=self.device
        )
        state = TextState(x=x)
        if self.task == "classifier" and self.known_labels is None:
            state.label_logits = torch.randn(self.batch, self.num_classes, generator=generator).to(self.device)
        if self.task == "language_model":
            vocab = self.embedding.shape[0]
            state.target_logits = torch.randn(self.batch, self.length, vocab, generator=generator).to(self.device)
        return state

    def targets(self, state: TextState) -> Tensor:
        """What the replay's loss compares the outputs with: soft next tokens, soft labels or the known labels."""
        if self.task == "language_model":
            return soft_targets(state.target_logits, self.mask)
        if self.known_labels is not None:
            return self.known_labels
        return state.label_logits.softmax(-1)

    def decode(self, state: TextState, *, metric: str) -> Tensor:
        """Token ids (B, L) of a candidate."""
        with torch.no_grad():
            if self.task == "language_model":
                return decode_language_model(
                    state.x,
                    state.target_logits,
                    self.embedding,
                    metric=metric,
                    allowed=self.allowed,
                    mask=self.mask,
                    cover=self.cover,
                    only_last=self.only_last,
                )
            if self.cover and self.allowed is not None:
                return covering_tokens(state.x, self.embedding, metric=metric, allowed=self.allowed)
            return nearest_tokens(state.x, self.embedding, metric=metric, allowed=self.allowed)

    def labels(self, state: TextState) -> tuple[Tensor | None, str | None]:
        if self.task == "language_model":
            return None, None
        if self.known_labels is not None:
            return self.known_labels.clone(), "knowledge"
        return state.label_logits.detach().argmax(-1), "optimised"

    def extras(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "restricted": self.allowed is not None,
            "restriction": self.restricted_reason,
            "leaked_tokens": None if self.allowed is None else int(self.allowed.sum()),
            "covered": self.cover and self.allowed is not None,
            "last_restricted": self.mask is not None and not bool(self.mask[-1].all()),
        }


@dataclass
class Best:
    """The lowest cost seen and the candidate that had it."""

    cost: float
    state: TextState
    iteration: int


def adam_search(
    state: TextState,
    cost: Callable[[TextState], Tensor],
    *,
    lr: float,
    iterations: int,
    log_every: int,
    time_budget: float,
    start: float,
    decode: Callable[[TextState], Tensor],
    callback: Callback | None,
    progress: bool,
    desc: str,
    schedule: Callable[[int], float] | None = None,
    hook: Callable[[int, TextState, torch.optim.Optimizer], None] | None = None,
) -> tuple[Best, list[TracePoint], str, int]:
    """Adam on every tensor of ``state`` at ``lr`` (times ``schedule(iteration)``), minimising ``cost``; keeps the
    candidate with the lowest cost seen (evaluated before each step). ``hook(iteration, state, optimizer)`` runs
    after each step (LAMP's discrete steps). Returns the best, the trace, why it stopped and the steps run."""
    for t in state.tensors():
        t.requires_grad_(True)
    optimizer = torch.optim.Adam(state.tensors(), lr=lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule) if schedule is not None else None
    best = Best(math.inf, state.detached(), -1)
    trace: list[TracePoint] = []
    stopped, it = "iterations", -1
    for it in range(iterations):
        optimizer.zero_grad(set_to_none=True)
        value = cost(state)
        if not torch.isfinite(value):
            stopped = "diverged"
            break
        grads = torch.autograd.grad(value, state.tensors())
        for t, g in zip(state.tensors(), grads, strict=True):
            t.grad = g
        v = float(value.detach())
        if v < best.cost:
            best = Best(v, state.detached(), it)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        if hook is not None:
            hook(it, state, optimizer)
        elapsed = time.perf_counter() - start
        last = it == iterations - 1
        if time_budget and elapsed >= time_budget:
            stopped, last = "time_budget", True
        if it % log_every == 0 or last:
            trace.append(TracePoint(iteration=it, seconds=elapsed, cost=best.cost))
            if callback is not None:
                callback(it, elapsed, decode(best.state))
            if progress:
                print(f"{desc} {it}: cost {v:.4g} (best {best.cost:.4g})", flush=True)
        if last:
            break
    if best.iteration < 0:  # diverged at once: keep the start
        best = Best(math.inf, state.detached(), 0)
    return best, trace, stopped, it + 1


__all__ = [
    "DECODINGS",
    "TASKS",
    "Tag",
    "TagSettings",
    "TextReplay",
    "TextSetup",
    "TextState",
    "adam_search",
    "classifier_loss",
    "cosine_distance",
    "decode_language_model",
    "leaked_tokens",
    "cover_assignment",
    "covering_tokens",
    "nearest_tokens",
    "resolve_task",
    "soft_next_token_loss",
    "tag_distance",
    "text_problems",
    "text_task",
    "token_scores",
]
