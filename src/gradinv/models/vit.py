"""Vision Transformer (Dosovitskiy et al., "An Image is Worth 16x16 Words", ICLR 2021), small, own pure-torch code.

The image is cut into non-overlapping ``p x p`` patches, each flattened in (channel, row, column) order and
embedded by one ``nn.Linear`` (``patch_embed``); a learnable class token is prepended, a learnable position
embedding ``pos_embed`` (1, N + 1, D) is added, and pre-LayerNorm encoder blocks (``x + attn(ln1(x))``,
``x + mlp(ln2(x))``, hand-written multi-head attention, GELU MLP) run before a final LayerNorm and the ``head`` on
the class token. Every operation is double-differentiable and ``torch.func``-friendly.

The linear patch embedding is the stride-``p`` convolution of the paper written on flattened patches: the same
function and weights (a Conv2d's ``weight.reshape(D, -1)``), but its gradient reads directly as
``sum_i delta_i p_i^T`` over the patches ``p_i``, the algebra APRIL inverts (Lu et al., CVPR 2022; see
:mod:`gradinv.attacks.april`). :class:`ViTSpec` and :func:`vit_spec` tell an attack where those parameters are.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gradinv.errors import ConfigError, ShapeError
from gradinv.models._registry import register_model

#: names (exact, or the last parts of a qualified name) a patch embedding and a position embedding go by in
#: common ViT code (timm, Hugging Face, lucidrains), for :func:`vit_spec` on a model that is not our :class:`ViT`
PATCH_EMBEDDING_NAMES = ("patch_embed.proj", "patch_embed", "patch_embedding", "patch_embeddings.projection")
POSITION_EMBEDDING_NAMES = ("pos_embed", "pos_embedding", "position_embedding", "position_embeddings")


def patchify(x: Tensor, patch_size: int) -> Tensor:
    """(B, C, H, W) images -> (B, N, C*p*p) patches, row-major over the patch grid, each flattened in (channel,
    row, column) order: the layout of a stride-``p`` Conv2d's ``weight.reshape(D, -1)``."""
    b, c, h, w = x.shape
    p = patch_size
    x = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // p) * (w // p), c * p * p)


def unpatchify(patches: Tensor, input_shape: Sequence[int], patch_size: int) -> Tensor:
    """Inverse of :func:`patchify`: (B, N, C*p*p) -> (B, C, H, W) for ``input_shape`` (C, H, W)."""
    c, h, w = (int(s) for s in input_shape)
    p = patch_size
    x = patches.reshape(patches.shape[0], h // p, w // p, c, p, p).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(patches.shape[0], c, h, w)


@dataclass(frozen=True)
class ViTSpec:
    """Where a vision transformer keeps what APRIL reads, by parameter name.

    ``patch_embedding``: the weight of the patch embedding, (D, C*p*p) after ``reshape(D, -1)`` in the layout of
    :func:`patchify` (an ``nn.Linear`` on those patches or a Conv2d with kernel = stride = ``patch_size``);
    ``patch_bias`` its bias or None; ``position_embedding``: the learnable position embedding, T x D rows after
    ``reshape(-1, D)``, added to the token embeddings before the first block, ``prefix_tokens`` rows (class
    token...) first and then one row per patch.
    """

    patch_embedding: str
    patch_bias: str | None
    position_embedding: str
    patch_size: int
    prefix_tokens: int
    width: int

    def num_patches(self, input_shape: Sequence[int]) -> int:
        """How many patches an image of ``input_shape`` (C, H, W) is cut into."""
        _, h, w = (int(s) for s in input_shape)
        return (h // self.patch_size) * (w // self.patch_size)


class Attention(nn.Module):
    """Multi-head self-attention, ``softmax(q k^T / sqrt(d)) v`` written out (double-differentiable)."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        weights = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(d // self.heads), dim=-1)
        return self.proj((weights @ v).transpose(1, 2).reshape(b, t, d))


class MLP(nn.Module):
    """The block's feed-forward part: ``proj(gelu(fc(x)))``, hidden width 4D."""

    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.fc = nn.Linear(width, hidden)
        self.proj = nn.Linear(hidden, width)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(F.gelu(self.fc(x)))


class Block(nn.Module):
    """Pre-LayerNorm encoder block (ViT, Eq. 2-3): ``x + attn(ln1(x))`` then ``x + mlp(ln2(x))``."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads)
        self.ln2 = nn.LayerNorm(width)
        self.mlp = MLP(width, 4 * width)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


def default_patch_size(image_size: int, width: int) -> int:
    """The smallest patch side of at least 4 pixels (or the whole image) that divides ``image_size`` and keeps
    the token count (patches + class token) within ``width``: 4 for 32x32 images and width 192 (64 patches).
    Within that count the patch tokens' gradients, which pass LayerNorms and so span at most ``width - 1``
    directions, can determine the patches (APRIL's rank condition, :mod:`gradinv.attacks.april`)."""
    for p in range(min(4, image_size), image_size + 1):
        if image_size % p == 0 and (image_size // p) ** 2 + 1 <= width:
            return p
    return image_size


class ViT(nn.Module):
    """A small Vision Transformer for square ``image_size`` images (Dosovitskiy et al. 2021).

    Parameters: ``patch_embed`` (nn.Linear C*p*p -> D on :func:`patchify`'s patches), ``cls_token`` (1, 1, D),
    ``pos_embed`` (1, N + 1, D), ``blocks.{i}.ln1``, ``blocks.{i}.attn.qkv`` (D -> 3D), ``blocks.{i}.attn.proj``,
    ``blocks.{i}.ln2``, ``blocks.{i}.mlp.fc`` (D -> 4D), ``blocks.{i}.mlp.proj``, ``ln_f``, ``head`` (D -> classes,
    on the class token). Initialised as timm's ViT: truncated normal (std 0.02) for the linear layers and the
    embeddings, zero biases, unit LayerNorms.
    """

    def __init__(
        self,
        *,
        image_size: int,
        patch_size: int,
        in_channels: int = 3,
        num_classes: int = 10,
        width: int = 192,
        depth: int = 4,
        heads: int = 3,
    ) -> None:
        super().__init__()
        for label, value in (("patch_size", patch_size), ("width", width), ("depth", depth), ("heads", heads)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"ViT option {label} must be a positive integer, got {value!r}")
        if in_channels < 1 or num_classes < 1:
            raise ConfigError(f"in_channels and num_classes must be positive, got {in_channels}, {num_classes}")
        if width % heads:
            raise ConfigError(
                f"ViT width {width} is not divisible by heads {heads}: use e.g. width={heads * max(1, width // heads)}"
            )
        if image_size % patch_size:
            divisors = [p for p in range(1, image_size + 1) if image_size % p == 0]
            raise ShapeError(
                f"a ViT with patch_size {patch_size} cannot cut {image_size}x{image_size} images into whole patches: "
                f"use --model-option patch_size=<one of {divisors}> or an image size that is a multiple of {patch_size}"
            )
        self.image_size, self.patch_size, self.in_channels = image_size, patch_size, in_channels
        self.num_patches = (image_size // patch_size) ** 2
        self.width = width
        self.patch_embed = nn.Linear(in_channels * patch_size * patch_size, width)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches + 1, width))
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(depth))
        self.ln_f = nn.LayerNorm(width)
        self.head = nn.Linear(width, num_classes)  # the last nn.Linear: the classifier label methods read
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        if tuple(x.shape[-3:]) != (self.in_channels, self.image_size, self.image_size):
            raise ShapeError(
                f"this ViT takes ({self.in_channels}, {self.image_size}, {self.image_size}) images, got shape "
                f"{tuple(x.shape)}: build it with the data's channels and image size"
            )
        tokens = self.patch_embed(patchify(x, self.patch_size))
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        z = torch.cat([cls, tokens], dim=1) + self.pos_embed
        for block in self.blocks:
            z = block(z)
        return self.head(self.ln_f(z[:, 0]))

    def vit_spec(self) -> ViTSpec:
        """Where APRIL finds this model's patch and position embeddings."""
        return ViTSpec(
            patch_embedding="patch_embed.weight",
            patch_bias="patch_embed.bias",
            position_embedding="pos_embed",
            patch_size=self.patch_size,
            prefix_tokens=1,
            width=self.width,
        )


def _named(names: Sequence[str], candidates: Sequence[str]) -> str | None:
    """The first of ``candidates`` that is one of ``names`` or ends with ``"." + name``."""
    for name in names:
        for candidate in candidates:
            if candidate == name or candidate.endswith("." + name):
                return candidate
    return None


def find_position_embedding(model: nn.Module) -> str | None:
    """The parameter name of ``model``'s learnable position embedding: our ViT's, or the first parameter called
    one of :data:`POSITION_EMBEDDING_NAMES` (``pos_embed``, ``position_embeddings``...; an ``nn.Embedding`` of that
    name gives its ``.weight``); None without one."""
    if callable(getattr(model, "vit_spec", None)):
        return model.vit_spec().position_embedding
    params = [n for n, _ in model.named_parameters()]
    found = _named(POSITION_EMBEDDING_NAMES, params)
    if found is None:
        found = _named([f"{n}.weight" for n in POSITION_EMBEDDING_NAMES], params)
    return found


def vit_spec(model: nn.Module, input_shape: Sequence[int]) -> ViTSpec:
    """Where APRIL reads ``model`` for ``input_shape`` (C, H, W) images, or a one-line :class:`ConfigError`.

    Our :class:`ViT` (and any module with a ``vit_spec()`` method) says so itself. Otherwise a small lookup: a
    Conv2d named one of :data:`PATCH_EMBEDDING_NAMES` with kernel = stride, no padding, dilation or groups (timm's
    ``patch_embed.proj``, Hugging Face's ``patch_embeddings.projection``), and a learnable position embedding
    (:func:`find_position_embedding`) with one row per patch after its prefix rows. A linear patch embedding of
    unknown patch layout is not guessed.
    """
    if callable(getattr(model, "vit_spec", None)):
        return model.vit_spec()
    modules = dict(model.named_modules())
    conv_name = _named(PATCH_EMBEDDING_NAMES, [n for n, m in modules.items() if isinstance(m, nn.Conv2d)])
    if conv_name is None:
        raise ConfigError(
            f"{type(model).__name__} has no patch embedding APRIL can read: neither gradinv's ViT nor a Conv2d "
            f"named {' / '.join(PATCH_EMBEDDING_NAMES)}"
        )
    conv = modules[conv_name]
    p = conv.kernel_size[0]
    if (
        conv.kernel_size != (p, p)
        or conv.stride != (p, p)
        or conv.padding not in ((0, 0), "valid")
        or conv.dilation != (1, 1)
        or conv.groups != 1
    ):
        raise ConfigError(
            f"'{conv_name}' is not a patch embedding (a square kernel equal to its stride, no padding, dilation or "
            f"groups): got kernel {conv.kernel_size}, stride {conv.stride}, padding {conv.padding}"
        )
    pos_name = find_position_embedding(model)
    if pos_name is None:
        raise ConfigError(
            f"{type(model).__name__} has no learnable position embedding (a parameter named "
            f"{' / '.join(POSITION_EMBEDDING_NAMES)}): APRIL reads the gradient of one"
        )
    pos = dict(model.named_parameters())[pos_name]
    width = conv.out_channels
    _, h, w = (int(s) for s in input_shape)
    patches = (h // p) * (w // p)
    rows = pos.numel() // width if pos.numel() % width == 0 else -1
    if pos.shape[-1] != width or rows < patches:
        raise ConfigError(
            f"the position embedding '{pos_name}' of shape {tuple(pos.shape)} does not have one row of width {width} "
            f"per patch ({patches} patches of {p}x{p} in a {h}x{w} image)"
        )
    return ViTSpec(
        patch_embedding=f"{conv_name}.weight",
        patch_bias=f"{conv_name}.bias" if conv.bias is not None else None,
        position_embedding=pos_name,
        patch_size=p,
        prefix_tokens=rows - patches,
        width=width,
    )


@register_model(
    "vit-tiny",
    summary="ViT (Dosovitskiy et al. 2021): patches, class token, learnable positions, 4 pre-LN blocks, width 192",
    sizes="sizes the patch size divides (any size with the automatic patch size; 4 pixels or more)",
)
def _build_vit_tiny(
    *,
    in_channels: int,
    num_classes: int,
    image_size: int,
    patch_size: int | None = None,
    width: int = 192,
    depth: int = 4,
    heads: int = 3,
) -> ViT:
    """``patch_size=None``: :func:`default_patch_size` (4 for 32x32 images: 64 patches + the class token)."""
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise ConfigError(f"ViT option width must be a positive integer, got {width!r}")
    patch = default_patch_size(image_size, width) if patch_size is None else patch_size
    return ViT(
        image_size=image_size,
        patch_size=patch,
        in_channels=in_channels,
        num_classes=num_classes,
        width=width,
        depth=depth,
        heads=heads,
    )


__all__ = [
    "PATCH_EMBEDDING_NAMES",
    "POSITION_EMBEDDING_NAMES",
    "ViT",
    "ViTSpec",
    "default_patch_size",
    "find_position_embedding",
    "patchify",
    "unpatchify",
    "vit_spec",
]
