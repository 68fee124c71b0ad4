"""Image data for experiments: built-in sources that load offline, and the user's own images.

>>> ds = load_dataset("digits", image_size=32, channels=3)
>>> images, labels = sample_batch(ds, batch_size=4, seed=0)
"""

from __future__ import annotations

from pathlib import Path

from gradinv.data.builtin import (
    PHOTO_CROPS_PER_PHOTO,
    PHOTO_NAMES,
    _raw_digits,
    available_photos,
    load_digits,
    load_photo_crops,
    load_photos,
    load_synthetic,
    synthetic_size,
)
from gradinv.data.dataset import (
    ImageDataset,
    Normalization,
    channel_stats,
    check_images_fit,
    image_bytes,
    sample_batch,
)
from gradinv.data.folder import IMAGE_EXTENSIONS, load_folder, load_npz
from gradinv.data.text import (
    BPETokenizer,
    TextDataset,
    TextTokenizer,
    WordTokenizer,
    load_text,
    load_tokenizer,
    split_sentences,
)
from gradinv.data.transforms import center_crop_resize, to_channels
from gradinv.errors import ConfigError, DataError

__all__ = [
    "BPETokenizer",
    "TextDataset",
    "TextTokenizer",
    "WordTokenizer",
    "load_text",
    "load_tokenizer",
    "split_sentences",
    "BUILTIN_SOURCES",
    "IMAGE_EXTENSIONS",
    "MAX_IMAGE_SIZE",
    "MIN_IMAGE_SIZE",
    "PATH_SOURCES_HELP",
    "PHOTO_NAMES",
    "ImageDataset",
    "Normalization",
    "available_photos",
    "center_crop_resize",
    "channel_stats",
    "check_images_fit",
    "list_data_sources",
    "load_dataset",
    "load_digits",
    "load_folder",
    "load_npz",
    "load_photo_crops",
    "load_photos",
    "load_synthetic",
    "sample_batch",
    "synthetic_size",
    "to_channels",
]

MIN_IMAGE_SIZE = 4
MAX_IMAGE_SIZE = 1024

#: Built-in data source names and one-line summaries.
BUILTIN_SOURCES: dict[str, str] = {
    "digits": "scikit-learn handwritten digits: 1,797 grey 8x8 images upscaled, 10 classes (0-9)",
    "photos": f"scikit-image bundled photos: {len(PHOTO_NAMES)} RGB photos, one class each",
    "photo-crops": f"random crops of those photos, {PHOTO_CROPS_PER_PHOTO} per photo (class = photo): a natural-image "
    "training set",
    "synthetic:K": "random RGB images with random labels over K classes (default 100): many-class label tests",
}

#: How to name a source that is not built in.
PATH_SOURCES_HELP = (
    "or a path: a folder of images (class sub-folders or flat; "
    f"{', '.join(IMAGE_EXTENSIONS)}), or an .npz file with 'images' and 'labels' arrays"
)


def list_data_sources() -> list[tuple[str, str]]:
    """The built-in data sources as ``(name, summary)`` pairs (any folder or ``.npz`` path also works)."""
    return list(BUILTIN_SOURCES.items())


def _synthetic_classes(source: str) -> int:
    _, _, count = source.strip().partition(":")
    if not count:
        return 100
    try:
        return int(count)
    except ValueError:
        raise ConfigError(
            f"synthetic data is named 'synthetic:K' with K the number of classes, got {source!r}"
        ) from None


def _check_conversion(source: str, count: int, have: int, want: int | None, image_size: int) -> None:
    """Refuse a channel conversion whose peak (the loaded images, the converted copy and, for luma, one
    channel of temporary) does not fit in memory."""
    if want is None or want == have:
        return
    check_images_fit(
        source,
        count=count,
        channels=have,
        image_size=image_size,
        extra_bytes=image_bytes(count, want + (1 if want < have else 0), image_size),
        detail=f", then a {want}-channel copy",
        fix="lower --image-size",
    )


def load_dataset(source: str | Path, *, image_size: int = 32, channels: int | None = None) -> ImageDataset:
    """Load ``"digits"``, ``"photos"``, a folder of images or an ``.npz`` file as square images.

    ``channels`` (1 or 3) converts the images: grey images become 3 channels when the model wants 3, colour
    images become grey (luma) when it wants 1. Mean/std are computed from the loaded images. A ``str``
    matching a built-in name loads that source; pass ``Path("digits")`` or ``"./digits"`` for a folder
    named like one.
    """
    if isinstance(image_size, bool) or not isinstance(image_size, int):
        raise ConfigError(f"image size must be an integer, got {image_size!r}")
    if not MIN_IMAGE_SIZE <= image_size <= MAX_IMAGE_SIZE:
        raise ConfigError(f"image size {image_size} is out of range: use {MIN_IMAGE_SIZE} to {MAX_IMAGE_SIZE} pixels")
    if channels is not None and (isinstance(channels, bool) or channels not in (1, 3)):
        raise ConfigError(f"channels must be 1 (grey), 3 (RGB) or None (keep), got {channels!r}")

    if isinstance(source, str) and source.strip().lower().split(":")[0] == "synthetic":
        dataset = load_synthetic(num_classes=_synthetic_classes(source), image_size=image_size)
    elif isinstance(source, str) and source.strip().lower() in BUILTIN_SOURCES:
        key = source.strip().lower()
        if key == "digits":  # the whole peak, checked before anything is allocated
            _check_conversion("data source 'digits'", len(_raw_digits()[1]), 1, channels, image_size)
        elif key == "photos":
            _check_conversion("data source 'photos'", len(PHOTO_NAMES), 3, channels, image_size)
        else:
            _check_conversion(
                "data source 'photo-crops'", len(PHOTO_NAMES) * PHOTO_CROPS_PER_PHOTO, 3, channels, image_size
            )
        loaders = {"digits": load_digits, "photos": load_photos, "photo-crops": load_photo_crops}
        dataset = loaders[key](image_size=image_size)
    elif isinstance(source, (str, Path)):
        path = Path(source).expanduser()
        if not path.exists():
            raise DataError(
                f"data source '{source}' does not exist: pass a folder of images, an .npz file, "
                f"{' or '.join(repr(k) for k in BUILTIN_SOURCES)}"
            )
        if path.is_dir():
            dataset = load_folder(path, image_size=image_size)
        elif path.suffix.lower() == ".npz":
            dataset = load_npz(path, image_size=image_size)
        else:
            raise DataError(
                f"data source '{source}' is a file but not an .npz archive: pass a folder of images, an .npz "
                f"file with 'images' and 'labels' arrays, {' or '.join(repr(k) for k in BUILTIN_SOURCES)}"
            )
    else:
        raise ConfigError(f"data source must be a name or a path, got {type(source).__name__}")

    if channels is None or channels == dataset.channels:
        return dataset
    _check_conversion(f"data source '{source}'", len(dataset), dataset.channels, channels, image_size)
    return ImageDataset.from_tensors(
        dataset.name,
        to_channels(dataset.images, channels).clamp_(0.0, 1.0),
        dataset.labels,
        class_names=dataset.class_names,
        num_classes=dataset.num_classes,
    )
