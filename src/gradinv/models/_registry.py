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
    min_size: int = 4


#: name -> builder, called as ``builder(in_channels=..., num_classes=..., image_size=..., **options)``.
MODELS: dict[str, Builder] = {}
#: name -> summary and accepted image sizes, for ``list_models`` and error messages.
MODEL_INFO: dict[str, ModelInfo] = {}


#: The smallest image side any model is built for: below it a convolution's window is mostly padding (and
#: the data loaders make nothing smaller).
MIN_MODEL_IMAGE_SIZE = 4


def register_model(
    name: str, *, summary: str, sizes: str = "4 pixels or more", min_size: int = MIN_MODEL_IMAGE_SIZE
) -> Callable[[Builder], Builder]:
    """Register a builder under ``name``; a new architecture is a new file using this decorator.

    ``summary`` is the one line that ``list_models`` shows; ``sizes`` says which square image sizes
    the architecture takes, for error messages; ``min_size`` is the smallest side it is built for
    (checked before building, so that too small an image is refused in one line).
    """

    def decorate(builder: Builder) -> Builder:
        if name in MODELS:
            raise ValueError(f"model name {name!r} is registered twice")
        MODELS[name] = builder
        MODEL_INFO[name] = ModelInfo(name=name, summary=summary, sizes=sizes, min_size=max(1, int(min_size)))
        return builder

    return decorate
