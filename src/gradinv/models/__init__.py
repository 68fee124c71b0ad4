"""Model zoo of the gradient inversion literature, all written from scratch.

Use :func:`build_model` to get a seeded, size-checked model by name; :func:`list_models` shows the
names. A new architecture is a new file in this package whose builder uses :func:`register_model`
and is imported below.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from gradinv.errors import ConfigError, GradinvError, ShapeError
from gradinv.models._options import check_options
from gradinv.models._registry import MIN_MODEL_IMAGE_SIZE, MODEL_INFO, MODELS, ModelInfo, register_model

# Importing a model file registers its builders.
from gradinv.models.cnn6 import CNN6
from gradinv.models.convnet import ConvNet
from gradinv.models.generator import DigitsGenerator, GeneratorTraining, digits_generator, digits_split
from gradinv.models.lenet import LeNet
from gradinv.models.mlp import MLP
from gradinv.models.resnet import BasicBlock, ResNet, resnet18, resnet20, resnet32
from gradinv.models.training import train_model
from gradinv.models.transformer import (
    LANGUAGE_MODELS,
    TEXT_MODELS,
    BertTiny,
    GPT2Tiny,
    TextModelSpec,
    build_text_model,
    list_text_models,
    next_token_loss,
    text_model_spec,
)
from gradinv.models.vit import ViT, ViTSpec, vit_spec

__all__ = [
    "CNN6",
    "LANGUAGE_MODELS",
    "TEXT_MODELS",
    "BertTiny",
    "GPT2Tiny",
    "TextModelSpec",
    "ViT",
    "ViTSpec",
    "vit_spec",
    "build_text_model",
    "list_text_models",
    "next_token_loss",
    "text_model_spec",
    "MIN_MODEL_IMAGE_SIZE",
    "MLP",
    "MODELS",
    "MODEL_INFO",
    "BasicBlock",
    "ConvNet",
    "DigitsGenerator",
    "GeneratorTraining",
    "LeNet",
    "ModelInfo",
    "ResNet",
    "build_model",
    "check_image_size",
    "check_options",
    "classifier_layer",
    "digits_generator",
    "digits_split",
    "list_models",
    "register_model",
    "resnet18",
    "resnet20",
    "resnet32",
    "train_model",
]

_STANDARD_ARGS = ("in_channels", "num_classes", "image_size")


def list_models() -> list[tuple[str, str]]:
    """Return ``(name, summary)`` for every registered model, sorted by name."""
    return [(name, MODEL_INFO[name].summary) for name in sorted(MODELS)]


def _check_positive_int(label: str, value: object, error: type[Exception]) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise error(f"{label} must be a positive integer, got {value!r}")
    return value


def _check_options(name: str, builder: object, options: dict[str, object]) -> None:
    params = inspect.signature(builder).parameters  # type: ignore[arg-type]
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    accepted = [p for p in params if p not in _STANDARD_ARGS]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        known = ", ".join(accepted) if accepted else "none"
        raise ConfigError(f"model {name!r} has no option {', '.join(map(repr, unknown))}; its options: {known}")


def check_image_size(name: str, image_size: int) -> None:
    """Raise a one-line :class:`ShapeError` unless the registered model ``name`` is built for ``image_size``
    px square images: a positive integer of at least the model's ``min_size`` (the builder and a dummy
    forward pass check the rest, e.g. LeNet's multiples of 4)."""
    if name not in MODELS:
        raise ConfigError(f"unknown model {name!r}; known models: {', '.join(sorted(MODELS))}")
    info = MODEL_INFO[name]
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ShapeError(f"image_size must be a positive integer, got {image_size!r}; {name} takes {info.sizes}")
    if image_size < info.min_size:
        raise ShapeError(
            f"model {name!r} cannot take {image_size}x{image_size} images (it takes {info.sizes}): use "
            f"--image-size {info.min_size} or more"
        )


def build_model(
    name: str,
    *,
    num_classes: int,
    in_channels: int = 3,
    image_size: int = 32,
    seed: int = 0,
    **options: object,
) -> nn.Module:
    """Build the registered model ``name`` for square ``image_size`` images, in train mode.

    Weights are drawn from a CPU RNG seeded with ``seed`` inside :func:`torch.random.fork_rng`, so
    the same seed always gives the same weights and the global RNG state is left as it was. A dummy
    forward pass (batch 2, eval mode, no grad) checks that the image size fits.

    Raises:
        ConfigError: unknown name, an option of the wrong name or type, fewer than 2 classes (cross-entropy
            over one class is 0: nothing to train or attack) or a non-positive channel count.
        ShapeError: the architecture cannot take ``image_size`` (the message says which sizes work).
    """
    if name not in MODELS:
        raise ConfigError(f"unknown model {name!r}; known models: {', '.join(sorted(MODELS))}")
    builder = MODELS[name]
    sizes = MODEL_INFO[name].sizes
    _check_positive_int("num_classes", num_classes, ConfigError)
    if num_classes < 2:
        raise ConfigError(
            f"model {name!r} needs at least 2 classes, got {num_classes} (e.g. data with one class, such as a flat "
            "folder or a single class sub-folder): with one class cross-entropy is 0 and every update is zero; "
            "put the images in one sub-folder per class (at least two) or pass --num-classes 2 or more"
        )
    _check_positive_int("in_channels", in_channels, ConfigError)
    check_image_size(name, image_size)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"seed must be an integer, got {seed!r}")
    _check_options(name, builder, options)
    options = check_options(name, builder, options)

    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(seed)
        try:
            model = builder(in_channels=in_channels, num_classes=num_classes, image_size=image_size, **options)
        except GradinvError:
            raise
        except (TypeError, ValueError) as err:  # an option of the wrong kind (e.g. channels=abc)
            raise ConfigError(f"model {name!r} cannot take the options {options}: {err}") from err

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.zeros(2, in_channels, image_size, image_size))
    except RuntimeError as err:
        raise ShapeError(f"model {name!r} cannot take {image_size}x{image_size} images ({sizes} work): {err}") from err
    finally:
        model.train(was_training)
    if tuple(out.shape) != (2, num_classes):
        raise ShapeError(
            f"model {name!r} gives outputs of shape {tuple(out.shape)} for a batch of 2, expected (2, {num_classes})"
        )
    return model


def classifier_layer(model: nn.Module) -> tuple[str, nn.Linear]:
    """Return the qualified name and module of the last ``nn.Linear`` in ``model`` (by module type).

    Label-recovery (iDLG, Zhao et al. 2020) and analytic attacks read the gradient of this layer.
    """
    found: tuple[str, nn.Linear] | None = None
    for module_name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            found = (module_name, module)
    if found is None:
        raise ConfigError(f"{type(model).__name__} has no nn.Linear layer to use as the classifier")
    return found
