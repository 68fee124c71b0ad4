"""A small language model prior for text attacks (LAMP, Balunović, Dimitrov, Jovanović & Vechev, NeurIPS 2022),
trained offline on the bundled text.

LAMP scores candidate reconstructions by their perplexity under an auxiliary language model (the paper: a GPT-2
trained on WikiText-103 with the attacked model's tokenizer). gradinv ships no weights and reaches no network,
so it ships the code that trains one: a :class:`~gradinv.models.transformer.GPT2Tiny` trained with the next-token
loss on the bundled English prose (:func:`gradinv.data.text.bundled_sentences`, tokenized by the bundled word
tokenizer of the attacked model's vocabulary size), on a fixed *training split* of the sentences. The *held-out
split* (:func:`is_held_out`: a hash of the sentence, so it does not depend on the sequence length or the order)
is what an honest evaluation attacks: sentences the prior never saw.

Training: the training sentences, each closed by ``<eos>``, are one token stream; every step takes
``batch_size`` windows of ``context`` tokens at random offsets (a seeded generator) and takes an AdamW step with
a linear warm-up and a cosine decay. The first call of :func:`bundled_language_model` trains and writes the
weights (safetensors) under :func:`language_model_cache_dir`, keyed by the training settings and a fingerprint
of the training stream; later calls load them. :func:`perplexity` and :func:`unigram_perplexity` measure it on
the held-out sentences (the record saved with the weights has both).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gradinv._atomic import atomic_path
from gradinv._settings import above, at_least
from gradinv.errors import ConfigError, DataError, ShapeError
from gradinv.models.transformer import GPT2Tiny

#: bumped when the architecture or the training code changes, so stale cached weights are never loaded
LANGUAGE_MODEL_VERSION = 1


@dataclass(frozen=True)
class LanguageModelTraining:
    """How the bundled prior is trained (every field is part of the cache key). ``width``, ``layers``,
    ``heads``: the GPT2Tiny; ``context``: tokens per training window (also its ``n_positions``); ``steps`` AdamW
    steps of ``batch_size`` windows at peak ``lr`` (``warmup`` steps of linear warm-up, then cosine decay to 0),
    ``weight_decay``; ``seed``: initial weights and windows; ``held_out``: the fraction of sentences kept out
    (:func:`is_held_out`)."""

    width: int = 64
    layers: int = 2
    heads: int = 2
    context: int = 32
    steps: int = 900
    batch_size: int = 16
    lr: float = 3e-3
    warmup: int = 50
    weight_decay: float = 0.01
    seed: int = 0
    held_out: float = 0.1

    def problems(self) -> list[str]:
        return [
            *at_least("width", self.width, 1),
            *at_least("layers", self.layers, 1),
            *at_least("heads", self.heads, 1),
            *([] if self.width % max(self.heads, 1) == 0 else [f"width {self.width} is not a multiple of heads"]),
            *at_least("context", self.context, 2),
            *at_least("steps", self.steps, 1),
            *at_least("batch_size", self.batch_size, 1),
            *above("lr", self.lr, 0),
            *at_least("warmup", self.warmup, 0),
            *at_least("weight_decay", self.weight_decay, 0),
            *([] if 0 < self.held_out < 1 else [f"held_out must lie in (0, 1), got {self.held_out!r}"]),
        ]

    def check(self) -> None:
        problems = self.problems()
        if problems:
            raise ConfigError(f"language model training: {'; '.join(problems)}")


def language_model_cache_dir() -> Path:
    """Where trained priors are kept: ``$GRADINV_CACHE/language_models`` or ``~/.cache/gradinv/language_models``."""
    root = os.environ.get("GRADINV_CACHE")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "gradinv"
    return base / "language_models"


def is_held_out(sentence: str, *, fraction: float = 0.1) -> bool:
    """Whether ``sentence`` belongs to the held-out split: the first 8 bytes of its SHA-256, read as a fraction of
    2^64, are below ``fraction`` (the same answer whatever the sequence length, order or Python run)."""
    if not 0 < fraction < 1:
        raise ConfigError(f"fraction must lie in (0, 1), got {fraction!r}")
    digest = hashlib.sha256(sentence.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64 < fraction


def split_sentences_held_out(sentences: Iterable[str], *, fraction: float = 0.1) -> tuple[list[str], list[str]]:
    """``(training, held_out)`` sentences by :func:`is_held_out`."""
    train: list[str] = []
    held: list[str] = []
    for s in sentences:
        (held if is_held_out(s, fraction=fraction) else train).append(s)
    return train, held


def token_stream(sentences: Iterable[str], tokenizer: Any) -> Tensor:
    """The sentences' token ids, each sentence closed by ``<eos>``, as one LongTensor."""
    eos = int(getattr(tokenizer, "eos_id", 3))
    ids: list[int] = []
    for s in sentences:
        ids.extend(int(i) for i in tokenizer.encode(s))
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.int64)


def _windows(stream: Tensor, context: int) -> Tensor:
    """Consecutive non-overlapping windows (N, context) of ``stream`` (the tail shorter than a window dropped)."""
    n = stream.numel() // context
    return stream[: n * context].reshape(n, context)


def train_language_model(
    data: Sequence[str] | Tensor | Any,
    *,
    tokenizer: Any = None,
    vocab_size: int | None = None,
    width: int = 64,
    layers: int = 2,
    heads: int = 2,
    context: int = 32,
    steps: int = 900,
    batch_size: int = 16,
    lr: float = 3e-3,
    warmup: int = 50,
    weight_decay: float = 0.01,
    seed: int = 0,
    progress: bool = False,
) -> tuple[GPT2Tiny, dict[str, float]]:
    """Train a :class:`GPT2Tiny` language model with the next-token loss; returns it (eval mode, gradients off)
    and a record (final training loss, seconds).

    ``data``: sentences (with ``tokenizer``), a :class:`~gradinv.data.text.TextDataset` (its rows, each closed by
    ``<eos>``; its tokenizer) or a 1-D token stream (LongTensor). ``vocab_size``: the model's vocabulary (default:
    the tokenizer's, or the largest id + 1). Windows of ``context`` tokens are drawn at random
    offsets from a generator seeded with ``seed``, which also draws the initial weights (the global RNG is left as
    it was): the same arguments give the same weights.
    """
    training = LanguageModelTraining(
        width=width,
        layers=layers,
        heads=heads,
        context=context,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        warmup=warmup,
        weight_decay=weight_decay,
        seed=seed,
    )
    training.check()
    if isinstance(getattr(data, "tokens", None), Tensor) and hasattr(data, "tokenizer"):  # a TextDataset
        tokenizer = tokenizer or data.tokenizer
        rows = data.tokens
        eos = torch.full((rows.shape[0], 1), int(getattr(tokenizer, "eos_id", 3)), dtype=torch.int64)
        data = torch.cat([rows, eos], dim=1).reshape(-1)
    if isinstance(data, Tensor):
        if data.dim() != 1 or data.is_floating_point():
            raise ShapeError(f"a token stream is a 1-D tensor of token ids, got {data.dtype} {tuple(data.shape)}")
        stream = data.long()
    else:
        if tokenizer is None:
            raise ConfigError("train_language_model needs a tokenizer to encode sentences (or pass a token stream)")
        stream = token_stream(data, tokenizer)
    if stream.numel() < context + 1:
        raise DataError(f"the training text has {stream.numel()} tokens, fewer than one window of {context + 1}")
    vocab = vocab_size or int(getattr(tokenizer, "vocab_size", 0)) or int(stream.max()) + 1
    if int(stream.max()) >= vocab:
        raise ConfigError(f"token id {int(stream.max())} does not fit vocab_size={vocab}")
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPT2Tiny(vocab, n_positions=context, width=width, layers=layers, heads=heads)
    generator = torch.Generator().manual_seed(seed)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=lr
    )

    def factor(i: int) -> float:
        if warmup and i < warmup:
            return (i + 1) / warmup
        span = max(1, steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(i - warmup, span) / span))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    offsets = torch.arange(context)
    model.train()
    loss_value = float("nan")
    for step in range(steps):
        starts = torch.randint(0, stream.numel() - context + 1, (batch_size,), generator=generator)
        batch = stream[starts[:, None] + offsets]
        logits = model(batch)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, vocab), batch[:, 1:].reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        loss_value = float(loss.detach())
        if progress and (step % 100 == 0 or step == steps - 1):
            print(f"language model step {step}: loss {loss_value:.3f}", flush=True)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, {"train_loss": loss_value, "seconds": time.perf_counter() - start}


@torch.no_grad()
def perplexity(model: nn.Module, tokens: Tensor, *, batch_size: int = 64) -> float:
    """``exp`` of the mean next-token cross-entropy of ``model`` (ids (B, L) -> logits (B, L, V)) over the rows
    of ``tokens`` (N, L): every position but the first is predicted from the ones before it."""
    if tokens.dim() != 2 or tokens.shape[1] < 2:
        raise ShapeError(f"perplexity takes token rows (N, L) with L >= 2, got {tuple(tokens.shape)}")
    total, count = 0.0, 0
    for i in range(0, tokens.shape[0], batch_size):
        rows = tokens[i : i + batch_size]
        logits = model(rows)
        ce = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), rows[:, 1:].reshape(-1), reduction="sum")
        total += float(ce)
        count += rows[:, 1:].numel()
    return math.exp(total / count)


def unigram_perplexity(train: Tensor, tokens: Tensor, *, vocab_size: int) -> float:
    """The perplexity of an add-one-smoothed unigram model fitted to the token stream ``train`` on the rows of
    ``tokens`` (N, L), scored on the same positions as :func:`perplexity` (all but each row's first)."""
    counts = torch.bincount(train.reshape(-1), minlength=vocab_size).double() + 1.0
    log_p = (counts / counts.sum()).log()
    targets = tokens[:, 1:].reshape(-1)
    return math.exp(-float(log_p[targets].mean()))


def _cache_key(vocab_size: int, training: LanguageModelTraining, stream: Tensor) -> str:
    fingerprint = hashlib.sha256(stream.numpy().tobytes()).hexdigest()
    spec = {
        "version": LANGUAGE_MODEL_VERSION,
        "vocab_size": vocab_size,
        **dataclasses.asdict(training),
        "data": fingerprint,
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def bundled_split(vocab_size: int, *, held_out: float = 0.1) -> tuple[Any, Tensor, Tensor]:
    """The bundled word tokenizer of ``vocab_size`` tokens and the token streams of the training and held-out
    sentences (:func:`is_held_out`)."""
    from gradinv.data.text import bundled_sentences, bundled_tokenizer

    tokenizer = bundled_tokenizer(vocab_size, "word")
    train, held = split_sentences_held_out((s for s, _ in bundled_sentences()), fraction=held_out)
    return tokenizer, token_stream(train, tokenizer), token_stream(held, tokenizer)


def bundled_language_model(
    vocab_size: int = 5000,
    *,
    training: LanguageModelTraining | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = False,
) -> GPT2Tiny:
    """The GPT2Tiny prior over the bundled word tokenizer's vocabulary (``vocab_size`` rows: the attacked model's;
    the tokenizer may have fewer tokens when the corpus has fewer distinct words), trained on the training split
    of the bundled sentences on first use and cached.

    The weights are stored as safetensors under ``cache_dir`` (default :func:`language_model_cache_dir`) in a file
    named by a hash of the settings and of the training stream, with a record of the training (loss, seconds, and
    the held-out perplexity against a unigram baseline) in its metadata (:func:`language_model_record`). Returns
    the model in eval mode with gradients off.
    """
    from safetensors.torch import load_file, save_file

    t = training or LanguageModelTraining()
    t.check()
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 8:
        raise ConfigError(f"vocab_size must be an integer of at least 8, got {vocab_size!r}")
    tokenizer, train_stream, held_stream = bundled_split(vocab_size, held_out=t.held_out)
    path = _cache_path(vocab_size, t, train_stream, cache_dir)
    model = GPT2Tiny(vocab_size, n_positions=t.context, width=t.width, layers=t.layers, heads=t.heads)
    if path.is_file():
        model.load_state_dict(load_file(path))
    else:
        fields = {k: v for k, v in dataclasses.asdict(t).items() if k != "held_out"}
        trained, record = train_language_model(
            train_stream, tokenizer=tokenizer, vocab_size=vocab_size, progress=progress, **fields
        )
        held = _windows(held_stream, t.context)
        if held.shape[0]:
            record["held_out_perplexity"] = perplexity(trained, held)
            record["unigram_perplexity"] = unigram_perplexity(train_stream, held, vocab_size=vocab_size)
        state = {k: v.contiguous() for k, v in trained.state_dict().items()}
        meta = {"training": json.dumps(dataclasses.asdict(t)), "record": json.dumps(record)}
        with atomic_path(path) as tmp:
            save_file(state, str(tmp), metadata=meta)
        model.load_state_dict(state)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _cache_path(
    vocab_size: int, training: LanguageModelTraining, stream: Tensor, cache_dir: str | os.PathLike[str] | None
) -> Path:
    folder = Path(cache_dir).expanduser() if cache_dir is not None else language_model_cache_dir()
    return folder / f"bundled-gpt2tiny-v{vocab_size}-{_cache_key(vocab_size, training, stream)}.safetensors"


def language_model_record(
    vocab_size: int = 5000,
    *,
    training: LanguageModelTraining | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> dict[str, Any] | None:
    """The training record saved with a cached bundled prior (train loss, seconds, held-out and unigram
    perplexities), or None when it has not been trained yet."""
    from safetensors import safe_open

    t = training or LanguageModelTraining()
    _, train_stream, _ = bundled_split(vocab_size, held_out=t.held_out)
    path = _cache_path(vocab_size, t, train_stream, cache_dir)
    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    return json.loads(meta.get("record", "{}"))


__all__ = [
    "LANGUAGE_MODEL_VERSION",
    "LanguageModelTraining",
    "bundled_language_model",
    "bundled_split",
    "is_held_out",
    "language_model_cache_dir",
    "language_model_record",
    "perplexity",
    "split_sentences_held_out",
    "token_stream",
    "train_language_model",
    "unigram_perplexity",
]
