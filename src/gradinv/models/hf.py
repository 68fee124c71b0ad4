"""Hugging Face ``transformers`` models behind gradinv's forward contract (optional dependency, imported lazily).

:class:`HuggingFaceModel` wraps a GPT2LMHeadModel, a BertForSequenceClassification or a
ViTForImageClassification so that ``model(x)`` returns a logits tensor: token ids (B, L) or token embeddings
(B, L, D) for the text models, pixel values (B, C, H, W) for ViT. The wrapper adopts the Hugging Face module's
children, so its parameter names are the Hugging Face ones (``transformer.h.0.attn.c_attn.weight``...), and
switches attention to the "eager" implementation (plain matmuls: twice differentiable, ``torch.func``
transforms apply), which computes the same function as the default one.

Build models from configs (:func:`hf_gpt2`, :func:`hf_bert`); nothing is downloaded.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from gradinv.errors import ConfigError, ShapeError
from gradinv.models.transformer import TextModelSpec, embedding_layer_norm_inputs

_INSTALL = "pip install gradinv[text] (or pip install transformers)"


def _transformers() -> Any:
    """The ``transformers`` module, or a one-line ConfigError saying how to install it."""
    try:
        import transformers
    except ImportError:
        raise ConfigError(f"Hugging Face models need the optional package transformers: {_INSTALL}") from None
    return transformers


def _kind(module: nn.Module) -> str | None:
    """``"gpt2"``, ``"bert"`` or ``"vit"`` for the supported Hugging Face classes, else None (never imports
    transformers for a module that does not come from it)."""
    if not type(module).__module__.startswith("transformers."):
        return None
    tf = _transformers()
    if isinstance(module, tf.GPT2LMHeadModel):
        return "gpt2"
    if isinstance(module, tf.BertForSequenceClassification):
        return "bert"
    if isinstance(module, tf.ViTForImageClassification):
        return "vit"
    return None


class HuggingFaceModel(nn.Module):
    """A Hugging Face GPT2LMHeadModel / BertForSequenceClassification / ViTForImageClassification with the forward
    contract of gradinv's models: ``forward(x)`` returns logits (GPT-2: (B, L, V); BERT, ViT: (B, C)).

    Text models take integer token ids (B, L) or floating token embeddings (B, L, D) (``inputs_embeds``: the
    position, and for BERT token-type 0, embeddings are added inside); ViT takes ``pixel_values`` (B, C, H, W).
    No attention mask is passed: every position is attended. ``eager_attention`` switches the module to the
    "eager" attention implementation (the module is changed in place). The module's dropout is kept: build it
    with zero dropout, or call ``.eval()``, for a deterministic client.
    """

    def __init__(self, module: nn.Module, *, eager_attention: bool = True) -> None:
        super().__init__()
        kind = _kind(module) if isinstance(module, nn.Module) else None
        if kind is None:
            raise ConfigError(
                f"HuggingFaceModel wraps transformers' GPT2LMHeadModel, BertForSequenceClassification or "
                f"ViTForImageClassification, got {type(module).__name__}"
            )
        if module._parameters or module._buffers:
            raise ConfigError(f"{type(module).__name__} keeps tensors outside its submodules: it cannot be wrapped")
        if eager_attention:
            if hasattr(module, "set_attn_implementation"):
                module.set_attn_implementation("eager")
            else:  # transformers < 4.48
                module.config._attn_implementation = "eager"
        # Its children become ours (same objects): parameter names and functional_call reach the module's forward.
        self.__dict__["_hf"] = module
        for name, child in module.named_children():
            self.add_module(name, child)
        self.kind = kind
        self.config = module.config
        self.train(module.training)

    @property
    def hf_module(self) -> nn.Module:
        """The wrapped Hugging Face module (its submodules are this wrapper's)."""
        return self._hf

    def train(self, mode: bool = True) -> HuggingFaceModel:
        super().train(mode)
        self._hf.training = mode
        return self

    def _max_positions(self) -> int:
        return int(self.config.n_positions if self.kind == "gpt2" else self.config.max_position_embeddings)

    def forward(self, x: Tensor) -> Tensor:
        """Logits for token ids / token embeddings (GPT-2, BERT) or pixel values (ViT)."""
        if self.kind == "vit":
            if not x.is_floating_point() or x.dim() != 4:
                raise ShapeError(f"a ViT takes images (B, C, H, W) of floats, got {x.dtype} {tuple(x.shape)}")
            return self._hf(pixel_values=x).logits
        width = int(self.config.hidden_size)
        if x.is_floating_point():
            if x.dim() != 3 or x.shape[-1] != width:
                raise ShapeError(
                    f"{type(self._hf).__name__} takes token ids (B, L) or token embeddings (B, L, {width}), got a "
                    f"floating tensor of shape {tuple(x.shape)}"
                )
            inputs: dict[str, Tensor] = {"inputs_embeds": x}
        elif x.dim() == 2 and not x.is_complex() and x.dtype != torch.bool:
            inputs = {"input_ids": x.long()}
        else:
            raise ShapeError(f"{type(self._hf).__name__} takes token ids (B, L), got {x.dtype} {tuple(x.shape)}")
        if x.shape[1] > self._max_positions():
            raise ShapeError(
                f"{type(self._hf).__name__} takes sequences of at most {self._max_positions()} tokens, got "
                f"{x.shape[1]}: shorten them"
            )
        if self.kind == "gpt2":
            return self._hf(**inputs, use_cache=False).logits
        return self._hf(**inputs).logits


def hf_text_model_spec(model: nn.Module) -> TextModelSpec | None:
    """The :class:`TextModelSpec` of a Hugging Face GPT2LMHeadModel / BertForSequenceClassification, bare or in a
    :class:`HuggingFaceModel` (same parameter names); None for any other model.

    GPT-2: ``c_attn`` of block 0 is a Conv1D with weight (in, out), hence ``transposed=True``; its input is
    ``ln_1(wte[t] + wpe[p])``. BERT: layer 0's query, key and value read ``LayerNorm(word[t] + pos[p] + type[0])``
    of the embeddings.
    """
    base = model.hf_module if isinstance(model, HuggingFaceModel) else model
    kind = _kind(base)
    config = getattr(base, "config", None)
    if kind == "gpt2":
        return TextModelSpec(
            token_embedding="transformer.wte.weight",
            position_embedding="transformer.wpe.weight",
            first_attention=("transformer.h.0.attn.c_attn.weight",),
            layer_inputs=embedding_layer_norm_inputs(
                token_embedding="transformer.wte.weight",
                position_embedding="transformer.wpe.weight",
                norm="transformer.h.0.ln_1",
                eps=float(config.layer_norm_epsilon),
            ),
            transposed=True,
            causal=True,
            vocab_size=int(config.vocab_size),
            max_positions=int(config.n_positions),
            width=int(config.n_embd),
        )
    if kind == "bert":
        position_type = getattr(config, "position_embedding_type", "absolute")
        if position_type != "absolute":
            raise ConfigError(
                f"BERT with position_embedding_type={position_type!r} has no TextModelSpec: build it with "
                "position_embedding_type='absolute'"
            )
        prefix = "bert.embeddings."
        attention = "bert.encoder.layer.0.attention.self."
        return TextModelSpec(
            token_embedding=prefix + "word_embeddings.weight",
            position_embedding=prefix + "position_embeddings.weight",
            first_attention=tuple(attention + p + ".weight" for p in ("query", "key", "value")),
            layer_inputs=embedding_layer_norm_inputs(
                token_embedding=prefix + "word_embeddings.weight",
                position_embedding=prefix + "position_embeddings.weight",
                type_embedding=prefix + "token_type_embeddings.weight",
                norm=prefix + "LayerNorm",
                eps=float(config.layer_norm_eps),
            ),
            transposed=False,
            causal=False,
            vocab_size=int(config.vocab_size),
            max_positions=int(config.max_position_embeddings),
            width=int(config.hidden_size),
        )
    return None


def hf_gpt2(
    vocab_size: int,
    *,
    n_positions: int = 64,
    width: int = 64,
    layers: int = 2,
    heads: int = 2,
    tie_embeddings: bool = True,
) -> HuggingFaceModel:
    """A randomly initialised Hugging Face GPT2LMHeadModel (no dropout, eager attention) from a config; its
    initialisation draws from torch's global RNG (seed it, or use ``build_text_model("hf-gpt2", ...)``)."""
    tf = _transformers()
    config = tf.GPT2Config(
        vocab_size=vocab_size,
        n_positions=n_positions,
        n_embd=width,
        n_layer=layers,
        n_head=heads,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=None,
        eos_token_id=None,
        tie_word_embeddings=tie_embeddings,
    )
    return HuggingFaceModel(tf.GPT2LMHeadModel(config))


def hf_bert(
    vocab_size: int,
    *,
    num_classes: int = 2,
    n_positions: int = 64,
    width: int = 128,
    layers: int = 2,
    heads: int = 2,
) -> HuggingFaceModel:
    """A randomly initialised Hugging Face BertForSequenceClassification (no dropout, eager attention, MLP 4x)
    from a config; its initialisation draws from torch's global RNG."""
    tf = _transformers()
    config = tf.BertConfig(
        vocab_size=vocab_size,
        hidden_size=width,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=4 * width,
        max_position_embeddings=n_positions,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=num_classes,
    )
    return HuggingFaceModel(tf.BertForSequenceClassification(config))


__all__ = ["HuggingFaceModel", "hf_bert", "hf_gpt2", "hf_text_model_spec"]
