"""The model registry: a name maps to a builder, filled by :func:`register_model` in each model file."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

Builder = Callable[..., nn.Module]


@dataclass(frozen=True)
class ModelInfo:
    """What the registry knows about one architecture besides its builder."""

    name: str
    summary: str
    sizes: str


#: name -> builder, called as ``builder(in_channels=..., num_classes=..., image_size=..., **options)``.
MODELS: dict[str, Builder] = {}
#: name -> summary and accepted image sizes, for ``list_models`` and error messages.
MODEL_INFO: dict[str, ModelInfo] = {}


def register_model(
    name: str, *, summary: str, sizes: str = "any size of at least 1 pixel"
) -> Callable[[Builder], Builder]:
    """Register a builder under ``name``; a new architecture is a new file using this decorator.

    ``summary`` is the one line that ``list_models`` shows; ``sizes`` says which square image sizes
    the architecture takes, for error messages.
    """

    def decorate(builder: Builder) -> Builder:
        if name in MODELS:
            raise ValueError(f"model name {name!r} is registered twice")
        MODELS[name] = builder
        MODEL_INFO[name] = ModelInfo(name=name, summary=summary, sizes=sizes)
        return builder

    return decorate
