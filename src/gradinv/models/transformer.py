"""Small transformers on token ids, written from the papers: a GPT-2 language model and a BERT classifier.

- :class:`GPT2Tiny`: the decoder of GPT-2 (Radford, Wu, Child, Luan, Amodei & Sutskever, "Language Models are
  Unsupervised Multitask Learners", OpenAI report 2019): learned token and position embeddings, pre-LayerNorm
  blocks (LN -> causal multi-head self-attention -> residual; LN -> GELU MLP 4x -> residual), a final LayerNorm
  and a linear head over the vocabulary. The attention of Vaswani et al. (NeurIPS 2017), Eq. 1,
  ``softmax(Q K^T / sqrt(d_k)) V``, is written with matmuls and a boolean mask so that it is twice
  differentiable and works under ``torch.func.vmap`` (gradient matching needs both).
- :class:`BertTiny`: the encoder of BERT (Devlin, Chang, Lee & Toutanova, NAACL 2019): word + position +
  token-type (always type 0) embeddings, an embedding LayerNorm, post-LayerNorm encoder layers, a tanh pooler
  on position 0 and a linear classifier.

Both take token ids (B, L) or, as floating (B, L, D) tensors, the token embeddings themselves (the position
embeddings are still added inside), which is what optimisation attacks (TAG, LAMP) search over.

:func:`text_model_spec` tells the text attacks where a model's token embedding and first attention layer are,
and gives the first attention layer's per-token input ``z`` as a pure function of the parameters: the
observation's parameters suffice to evaluate it (DAGER, Petrov et al., NeurIPS 2024, tests token candidates
against the row space of that layer's gradient).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from gradinv.errors import ConfigError, ShapeError
from gradinv.models._options import check_options

LayerInputs = Callable[[Tensor, Tensor, Mapping[str, Tensor]], Tensor]


def _check_sizes(model: str, **sizes: int) -> None:
    for label, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{model} {label} must be a positive integer, got {value!r}")


def _check_dropout(model: str, dropout: float) -> None:
    if not 0.0 <= float(dropout) < 1.0:
        raise ConfigError(f"{model} dropout must be in [0, 1), got {dropout!r}")


class SelfAttention(nn.Module):
    """Multi-head self-attention with one fused input projection ``qkv`` (D -> 3D) and an output ``proj``.

    ``qkv``'s rows are the query, key and value projections in that order, heads contiguous within each.
    """

    def __init__(self, width: int, heads: int, *, causal: bool, dropout: float = 0.0) -> None:
        super().__init__()
        self.heads = heads
        self.causal = causal
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.attn_drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        b, length, width = x.shape
        head_dim = width // self.heads
        q, k, v = self.qkv(x).split(width, dim=-1)
        q, k, v = (t.reshape(b, length, self.heads, head_dim).transpose(1, 2) for t in (q, k, v))
        scores = q @ k.transpose(-2, -1) / math.sqrt(head_dim)  # (B, H, L, L)
        if self.causal:
            allowed = torch.ones(length, length, dtype=torch.bool, device=x.device).tril()
            scores = scores.masked_fill(~allowed, float("-inf"))  # the diagonal is always allowed
        weights = self.attn_drop(scores.softmax(dim=-1))
        out = (weights @ v).transpose(1, 2).reshape(b, length, width)
        return self.proj(out)


class FeedForward(nn.Module):
    """``proj(GELU(fc(x)))`` with a hidden width of 4x (GPT-2: the tanh approximation of GELU; BERT: exact)."""

    def __init__(self, width: int, *, approximate: str) -> None:
        super().__init__()
        self.fc = nn.Linear(width, 4 * width)
        self.proj = nn.Linear(4 * width, width)
        self.approximate = approximate

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(F.gelu(self.fc(x), approximate=self.approximate))


class GPT2Block(nn.Module):
    """Pre-LayerNorm block of GPT-2: ``x + attn(ln1(x))`` then ``x + mlp(ln2(x))``."""

    def __init__(self, width: int, heads: int, *, dropout: float) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(width, eps=1e-5)
        self.attn = SelfAttention(width, heads, causal=True, dropout=dropout)
        self.ln2 = nn.LayerNorm(width, eps=1e-5)
        self.mlp = FeedForward(width, approximate="tanh")
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop(self.attn(self.ln1(x)))
        return x + self.drop(self.mlp(self.ln2(x)))


class BertLayer(nn.Module):
    """Post-LayerNorm encoder layer of BERT: ``ln1(x + attn(x))`` then ``ln2(x + mlp(x))``."""

    def __init__(self, width: int, heads: int, *, dropout: float) -> None:
        super().__init__()
        self.attn = SelfAttention(width, heads, causal=False, dropout=dropout)
        self.ln1 = nn.LayerNorm(width, eps=1e-12)
        self.mlp = FeedForward(width, approximate="none")
        self.ln2 = nn.LayerNorm(width, eps=1e-12)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        x = self.ln1(x + self.drop(self.attn(x)))
        return self.ln2(x + self.drop(self.mlp(x)))


def _token_embeddings(model: nn.Module, x: Tensor, embedding: nn.Embedding, max_positions: int) -> Tensor:
    """``x``'s token embeddings (B, L, D): looked up for integer ids (B, L), taken as given for floats (B, L, D)."""
    name = type(model).__name__
    width = embedding.embedding_dim
    if x.is_floating_point():
        if x.dim() != 3 or x.shape[-1] != width:
            raise ShapeError(
                f"{name} takes token ids (B, L) or token embeddings (B, L, {width}), got a floating tensor of "
                f"shape {tuple(x.shape)}"
            )
        emb = x
    elif x.dtype in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        if x.dim() != 2:
            raise ShapeError(f"{name} takes token ids of shape (B, L), got shape {tuple(x.shape)}")
        emb = embedding(x.long())
    else:
        raise ShapeError(f"{name} takes integer token ids or floating token embeddings, got dtype {x.dtype}")
    if emb.shape[1] > max_positions:
        raise ShapeError(
            f"{name} takes sequences of at most {max_positions} tokens, got {emb.shape[1]}: shorten them or "
            f"build the model with n_positions={emb.shape[1]} or more"
        )
    return emb


class GPT2Tiny(nn.Module):
    """A small GPT-2 causal language model (Radford et al. 2019), logits (B, L, V).

    Parameters: ``wte`` (V x D), ``wpe`` (P x D), ``blocks.{i}.ln1``, ``blocks.{i}.attn.qkv`` (D -> 3D),
    ``blocks.{i}.attn.proj``, ``blocks.{i}.ln2``, ``blocks.{i}.mlp.fc``, ``blocks.{i}.mlp.proj``, ``ln_f`` and
    ``head`` (D -> V, no bias; the same tensor as ``wte.weight`` with ``tie_embeddings=True``, as in GPT-2).
    Initialisation of GPT-2 from the global RNG: weights N(0, 0.02), the residual projections N(0, 0.02 /
    sqrt(2 * layers)) (Radford et al. 2019, §2.3), biases 0, LayerNorms 1 and 0.
    """

    def __init__(
        self,
        vocab_size: int,
        *,
        n_positions: int = 64,
        width: int = 768,
        layers: int = 2,
        heads: int = 12,
        tie_embeddings: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        _check_sizes(
            "GPT2Tiny", vocab_size=vocab_size, n_positions=n_positions, width=width, layers=layers, heads=heads
        )
        if width % heads:
            raise ConfigError(f"GPT2Tiny width {width} is not a multiple of heads {heads}: pick e.g. heads=1")
        _check_dropout("GPT2Tiny", dropout)
        self.vocab_size, self.n_positions, self.width = vocab_size, n_positions, width
        self.wte = nn.Embedding(vocab_size, width)
        self.wpe = nn.Embedding(n_positions, width)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(GPT2Block(width, heads, dropout=dropout) for _ in range(layers))
        self.ln_f = nn.LayerNorm(width, eps=1e-5)
        self.head = nn.Linear(width, vocab_size, bias=False)
        self.tie_embeddings = bool(tie_embeddings)
        self._init_weights(layers)
        if self.tie_embeddings:
            self.head.weight = self.wte.weight

    def _init_weights(self, layers: int) -> None:
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        for block in self.blocks:
            for proj in (block.attn.proj, block.mlp.proj):
                nn.init.normal_(proj.weight, mean=0.0, std=0.02 / math.sqrt(2 * layers))

    def forward(self, x: Tensor) -> Tensor:
        """Logits (B, L, V) for token ids (B, L) or token embeddings (B, L, D)."""
        emb = _token_embeddings(self, x, self.wte, self.n_positions)
        positions = torch.arange(emb.shape[1], device=emb.device)
        h = self.drop(emb + self.wpe(positions))
        for block in self.blocks:
            h = block(h)
        return self.head(self.ln_f(h))


class BertTiny(nn.Module):
    """A small BERT encoder with a sequence classifier (Devlin et al. 2019), logits (B, C).

    Parameters: ``wte`` (V x D, word), ``wpe`` (P x D, position), ``wtt`` (2 x D, token type; type 0 is used),
    ``ln_emb``, ``blocks.{i}.attn.qkv`` (D -> 3D), ``blocks.{i}.attn.proj``, ``blocks.{i}.ln1``,
    ``blocks.{i}.mlp.fc``, ``blocks.{i}.mlp.proj``, ``blocks.{i}.ln2``, ``pooler`` (D -> D, tanh) and
    ``classifier`` (D -> C). Initialisation of BERT from the global RNG: weights N(0, 0.02), biases 0.
    Every position is attended (no padding mask).
    """

    def __init__(
        self,
        vocab_size: int,
        *,
        num_classes: int = 2,
        n_positions: int = 64,
        width: int = 128,
        layers: int = 2,
        heads: int = 2,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        _check_sizes(
            "BertTiny",
            vocab_size=vocab_size,
            num_classes=num_classes,
            n_positions=n_positions,
            width=width,
            layers=layers,
            heads=heads,
        )
        if width % heads:
            raise ConfigError(f"BertTiny width {width} is not a multiple of heads {heads}: pick e.g. heads=1")
        _check_dropout("BertTiny", dropout)
        self.vocab_size, self.n_positions, self.width = vocab_size, n_positions, width
        self.wte = nn.Embedding(vocab_size, width)
        self.wpe = nn.Embedding(n_positions, width)
        self.wtt = nn.Embedding(2, width)
        self.ln_emb = nn.LayerNorm(width, eps=1e-12)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(BertLayer(width, heads, dropout=dropout) for _ in range(layers))
        self.pooler = nn.Linear(width, width)
        self.classifier = nn.Linear(width, num_classes)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)

    def forward(self, x: Tensor) -> Tensor:
        """Logits (B, C) for token ids (B, L) or token embeddings (B, L, D)."""
        emb = _token_embeddings(self, x, self.wte, self.n_positions)
        positions = torch.arange(emb.shape[1], device=emb.device)
        h = self.drop(self.ln_emb(emb + self.wpe(positions) + self.wtt.weight[0]))
        for block in self.blocks:
            h = block(h)
        pooled = torch.tanh(self.pooler(h[:, 0]))
        return self.classifier(self.drop(pooled))


def next_token_loss(logits: Tensor, tokens: Tensor) -> Tensor:
    """Mean cross-entropy of a causal LM: ``logits[:, :-1]`` (B, L, V) against ``tokens[:, 1:]`` (B, L)."""
    if logits.dim() != 3 or tokens.dim() != 2 or logits.shape[:2] != tokens.shape:
        raise ShapeError(
            f"next_token_loss takes logits (B, L, V) and tokens (B, L), got {tuple(logits.shape)} and "
            f"{tuple(tokens.shape)}"
        )
    if tokens.shape[1] < 2:
        raise ShapeError(f"next_token_loss needs sequences of at least 2 tokens, got length {tokens.shape[1]}")
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1).long())


@dataclass(frozen=True, eq=False)
class TextModelSpec:
    """Where a text model keeps what text attacks read, by parameter name.

    - ``token_embedding``: the V x D token embedding matrix; ``position_embedding``: the P x D one (or None).
    - ``first_attention``: the first attention layer's input projection weights. Their gradient is
      ``sum_i delta_i z_i^T`` over the batch's token rows ``i``, with ``z_i`` the layer's input for that token
      (``layer_inputs``): in the (out, in) layout of ``nn.Linear`` its ROW space lies in span{z_i}; with
      ``transposed=True`` (Hugging Face GPT-2's Conv1D, (in, out)) its COLUMN space does.
    - ``layer_inputs(token_ids (N,), positions (N,), params) -> (N, D)``: ``z`` for each token at its position,
      computed only from ``params`` (a dict keyed by parameter name, e.g. ``observation.parameters``).
      Exact when the model has no dropout (or is in eval mode) and every sequence starts at position 0.
    - ``causal``: a left-to-right model (a token's ``z`` feeds only its own and later positions).
    """

    token_embedding: str
    position_embedding: str | None
    first_attention: tuple[str, ...]
    layer_inputs: LayerInputs
    transposed: bool
    causal: bool
    vocab_size: int
    max_positions: int
    width: int


def _param(params: Mapping[str, Tensor], name: str) -> Tensor:
    try:
        return params[name]
    except KeyError:
        raise ConfigError(
            f"the parameters have no {name!r}: pass the model's full named_parameters() (e.g. "
            "observation.parameters) to layer_inputs"
        ) from None


def _check_tokens(token_ids: Tensor, positions: Tensor) -> None:
    if token_ids.dim() != 1 or token_ids.shape != positions.shape:
        raise ShapeError(
            f"layer_inputs takes token_ids (N,) and positions (N,), got {tuple(token_ids.shape)} and "
            f"{tuple(positions.shape)}"
        )


def embedding_layer_norm_inputs(
    *,
    token_embedding: str,
    position_embedding: str,
    norm: str,
    eps: float,
    type_embedding: str | None = None,
) -> LayerInputs:
    """``layer_inputs`` of a model whose first attention reads ``LN(wte[t] + wpe[p] (+ wtt[0]))``: GPT-2's
    ``ln_1`` of block 0, BERT's embedding LayerNorm. ``norm`` names the LayerNorm (``norm + ".weight"``/``".bias"``)."""

    def layer_inputs(token_ids: Tensor, positions: Tensor, params: Mapping[str, Tensor]) -> Tensor:
        _check_tokens(token_ids, positions)
        h = _param(params, token_embedding)[token_ids.long()] + _param(params, position_embedding)[positions.long()]
        if type_embedding is not None:
            h = h + _param(params, type_embedding)[0]
        weight, bias = _param(params, norm + ".weight"), _param(params, norm + ".bias")
        return F.layer_norm(h, (h.shape[-1],), weight, bias, eps)

    return layer_inputs


def text_model_spec(model: nn.Module) -> TextModelSpec:
    """The :class:`TextModelSpec` of ``model``: :class:`GPT2Tiny`, :class:`BertTiny`, or a Hugging Face
    GPT2LMHeadModel / BertForSequenceClassification (bare or in :class:`gradinv.models.hf.HuggingFaceModel`).

    Raises:
        ConfigError: any other model.
    """
    if isinstance(model, GPT2Tiny):
        return TextModelSpec(
            token_embedding="wte.weight",
            position_embedding="wpe.weight",
            first_attention=("blocks.0.attn.qkv.weight",),
            layer_inputs=embedding_layer_norm_inputs(
                token_embedding="wte.weight",
                position_embedding="wpe.weight",
                norm="blocks.0.ln1",
                eps=model.blocks[0].ln1.eps,
            ),
            transposed=False,
            causal=True,
            vocab_size=model.vocab_size,
            max_positions=model.n_positions,
            width=model.width,
        )
    if isinstance(model, BertTiny):
        return TextModelSpec(
            token_embedding="wte.weight",
            position_embedding="wpe.weight",
            first_attention=("blocks.0.attn.qkv.weight",),
            layer_inputs=embedding_layer_norm_inputs(
                token_embedding="wte.weight",
                position_embedding="wpe.weight",
                type_embedding="wtt.weight",
                norm="ln_emb",
                eps=model.ln_emb.eps,
            ),
            transposed=False,
            causal=False,
            vocab_size=model.vocab_size,
            max_positions=model.n_positions,
            width=model.width,
        )
    from gradinv.models import hf  # no import cycle: hf imports this module at its top, not the reverse

    spec = hf.hf_text_model_spec(model)
    if spec is not None:
        return spec
    raise ConfigError(
        f"{type(model).__name__} has no TextModelSpec: text attacks need GPT2Tiny, BertTiny or a Hugging Face "
        "GPT2LMHeadModel / BertForSequenceClassification; give a TextModelSpec for other models"
    )


# ---------------------------------------------------------------------------------------------------- registry

TextBuilder = Callable[..., nn.Module]


def _gpt2_tiny(
    *,
    vocab_size: int,
    num_classes: int,
    n_positions: int = 64,
    width: int = 768,
    layers: int = 2,
    heads: int = 12,
    tie_embeddings: bool = False,
    dropout: float = 0.0,
) -> GPT2Tiny:
    return GPT2Tiny(
        vocab_size,
        n_positions=n_positions,
        width=width,
        layers=layers,
        heads=heads,
        tie_embeddings=tie_embeddings,
        dropout=dropout,
    )


def _bert_tiny(
    *,
    vocab_size: int,
    num_classes: int,
    n_positions: int = 64,
    width: int = 128,
    layers: int = 2,
    heads: int = 2,
    dropout: float = 0.0,
) -> BertTiny:
    return BertTiny(
        vocab_size,
        num_classes=num_classes,
        n_positions=n_positions,
        width=width,
        layers=layers,
        heads=heads,
        dropout=dropout,
    )


def _hf_gpt2(
    *,
    vocab_size: int,
    num_classes: int,
    n_positions: int = 64,
    width: int = 64,
    layers: int = 2,
    heads: int = 2,
    tie_embeddings: bool = True,
) -> nn.Module:
    from gradinv.models import hf

    return hf.hf_gpt2(
        vocab_size, n_positions=n_positions, width=width, layers=layers, heads=heads, tie_embeddings=tie_embeddings
    )


def _hf_bert(
    *,
    vocab_size: int,
    num_classes: int,
    n_positions: int = 64,
    width: int = 128,
    layers: int = 2,
    heads: int = 2,
) -> nn.Module:
    from gradinv.models import hf

    return hf.hf_bert(
        vocab_size, num_classes=num_classes, n_positions=n_positions, width=width, layers=layers, heads=heads
    )


#: name -> builder, called as ``builder(vocab_size=..., num_classes=..., **options)`` (num_classes unused by LMs)
TEXT_MODELS: dict[str, TextBuilder] = {
    "gpt2-tiny": _gpt2_tiny,
    "bert-tiny": _bert_tiny,
    "hf-gpt2": _hf_gpt2,
    "hf-bert": _hf_bert,
}
#: name -> one-line summary, for listings and error messages
TEXT_MODEL_SUMMARIES: dict[str, str] = {
    "gpt2-tiny": "GPT-2 causal LM (Radford et al. 2019), pre-LN, D=768, 2 layers, 12 heads, 64 positions",
    "bert-tiny": "BERT classifier (Devlin et al. 2019), post-LN, D=128, 2 layers, 2 heads, tanh pooler",
    "hf-gpt2": "Hugging Face GPT2LMHeadModel from a config (needs transformers), D=64, 2 layers",
    "hf-bert": "Hugging Face BertForSequenceClassification from a config (needs transformers), D=128, 2 layers",
}
#: the models whose output is (B, L, V) next-token logits (loss :func:`next_token_loss`); the others give (B, C)
LANGUAGE_MODELS = frozenset({"gpt2-tiny", "hf-gpt2"})


def list_text_models() -> list[tuple[str, str]]:
    """``(name, summary)`` of every text model :func:`build_text_model` builds, sorted by name."""
    return [(name, TEXT_MODEL_SUMMARIES[name]) for name in sorted(TEXT_MODELS)]


def build_text_model(name: str, *, vocab_size: int, num_classes: int = 2, seed: int = 0, **options: Any) -> nn.Module:
    """Build the text model ``name`` (one of :data:`TEXT_MODELS`) in train mode, with weights drawn from a CPU
    RNG seeded with ``seed`` inside :func:`torch.random.fork_rng` (same seed, same weights; the global RNG is
    left as it was). A dummy forward pass on 2 sequences of 2 tokens checks the output shape.

    Raises:
        ConfigError: unknown name or option, an option of the wrong type, vocab_size < 2, num_classes < 2.
    """
    if name not in TEXT_MODELS:
        raise ConfigError(f"unknown text model {name!r}; known text models: {', '.join(sorted(TEXT_MODELS))}")
    for label, value, low in (("vocab_size", vocab_size, 2), ("num_classes", num_classes, 2)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ConfigError(f"text model {name!r} needs an integer {label} of at least {low}, got {value!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"seed must be an integer, got {seed!r}")
    builder = TEXT_MODELS[name]
    accepted = [p for p in inspect.signature(builder).parameters if p not in ("vocab_size", "num_classes")]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ConfigError(
            f"text model {name!r} has no option {', '.join(map(repr, unknown))}; its options: {', '.join(accepted)}"
        )
    options = check_options(name, builder, options)
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(seed)
        model = builder(vocab_size=vocab_size, num_classes=num_classes, **options)
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.zeros(2, 2, dtype=torch.long))
    finally:
        model.train()
    expected = (2, 2, vocab_size) if name in LANGUAGE_MODELS else (2, num_classes)
    if tuple(out.shape) != expected:
        raise ShapeError(f"text model {name!r} gives outputs of shape {tuple(out.shape)}, expected {expected}")
    return model


__all__ = [
    "LANGUAGE_MODELS",
    "TEXT_MODELS",
    "TEXT_MODEL_SUMMARIES",
    "BertTiny",
    "GPT2Tiny",
    "LayerInputs",
    "TextModelSpec",
    "build_text_model",
    "embedding_layer_norm_inputs",
    "list_text_models",
    "next_token_loss",
    "text_model_spec",
]
