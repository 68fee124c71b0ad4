"""Built-in data sources that ship with installed packages and load offline.

* ``digits``: scikit-learn's 1,797 handwritten digits (8x8 grey, 10 classes), upscaled.
* ``photos``: a few of scikit-image's bundled photos, one class per photo.
* ``photo-crops``: random crops of those photos, many per class: a natural-image training set.
"""

from __future__ import annotations

import functools
import importlib.util
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from gradinv.data.dataset import ImageDataset, check_images_fit
from gradinv.data.transforms import center_crop_resize, to_channels
from gradinv.errors import ConfigError, DataError

#: The photos of the ``photos`` source, in label order. All were checked to load from scikit-image's own
#: files without a download (``camera`` is grey and is converted to RGB).
PHOTO_NAMES: tuple[str, ...] = (
    "astronaut",
    "camera",
    "chelsea",
    "coffee",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "rocket",
    "stereo_motorcycle",
)


@functools.lru_cache(maxsize=1)
def _raw_digits() -> tuple[np.ndarray, np.ndarray]:
    """Digit images (N,8,8) in 0..16 and targets (N,), read-only."""
    spec = importlib.util.find_spec("sklearn")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    csv = Path(locations[0]) / "datasets" / "data" / "digits.csv.gz" if locations else None
    if csv is not None and csv.is_file():
        # Reading the bundled file directly avoids importing scikit-learn (~2 s).
        table = np.loadtxt(csv, delimiter=",")
        images, targets = table[:, :64].reshape(-1, 8, 8), table[:, 64].astype(np.int64)
    else:
        try:
            from sklearn.datasets import load_digits
        except ImportError as exc:  # pragma: no cover - scikit-learn is a dependency
            raise DataError(
                "the 'digits' data source needs scikit-learn: install it with `pip install scikit-learn`"
            ) from exc
        bunch = load_digits()
        images, targets = np.asarray(bunch.images), np.asarray(bunch.target, dtype=np.int64)
    images.flags.writeable = False
    targets.flags.writeable = False
    return images, targets


def load_digits(*, image_size: int = 32) -> ImageDataset:
    """scikit-learn's handwritten digits as 1-channel ``image_size`` px images in [0, 1], labels 0..9."""
    raw, targets = _raw_digits()
    check_images_fit(
        "data source 'digits'", count=len(targets), channels=1, image_size=image_size, fix="lower --image-size"
    )
    images = torch.from_numpy(np.array(raw, dtype=np.float32) / 16.0).unsqueeze(1)
    images = center_crop_resize(images, image_size).clamp_(0.0, 1.0)
    labels = torch.from_numpy(np.array(targets))
    return ImageDataset.from_tensors("digits", images, labels, class_names=tuple(str(i) for i in range(10)))


@functools.cache
def _raw_photo(name: str) -> np.ndarray:
    """Decode one scikit-image photo as a read-only (H,W,3) uint8 array (cached in-process)."""
    import skimage.data

    loader = getattr(skimage.data, name, None)
    if loader is None or not callable(loader):
        raise DataError(f"scikit-image has no photo named '{name}': choose from {', '.join(PHOTO_NAMES)}")
    img = loader()
    if isinstance(img, tuple):  # stereo_motorcycle -> (left, right, disparity)
        img = img[0]
    img = np.asarray(img)
    if img.dtype == bool:
        img = img.astype(np.uint8) * 255
    elif img.dtype != np.uint8:
        img = np.clip(img * (255.0 if img.max() <= 1.0 else 1.0), 0, 255).round().astype(np.uint8)
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    elif img.ndim == 3 and img.shape[2] == 4:
        img = img[:, :, :3]
    if img.ndim != 3 or img.shape[2] != 3:
        raise DataError(f"scikit-image photo '{name}' has unsupported shape {img.shape}: pick another photo")
    img = np.ascontiguousarray(img)
    img.flags.writeable = False
    return img


def available_photos(names: Sequence[str] = PHOTO_NAMES) -> list[str]:
    """The photos among ``names`` that load on this machine without a download."""
    ok = []
    for name in names:
        try:
            _raw_photo(name)
        except Exception:  # anything (missing file, no network, no pooch) means "skip"
            continue
        ok.append(name)
    return ok


def load_photos(*, image_size: int = 32, names: Sequence[str] | None = None) -> ImageDataset:
    """scikit-image's bundled photos, centre-cropped and resized to RGB ``image_size`` px images.

    Each photo is its own class (label = position in ``names``, class name = photo name). Photos that
    cannot be loaded offline are skipped with a warning; labels stay ``0..N-1`` over those that loaded.
    """
    names = tuple(PHOTO_NAMES if names is None else names)
    if not names:
        raise ConfigError(f"no photo names given: choose from {', '.join(PHOTO_NAMES)}")
    check_images_fit(
        "data source 'photos'", count=len(names), channels=3, image_size=image_size, fix="lower --image-size"
    )
    loaded, failed = [], []
    images = torch.empty((len(names), 3, image_size, image_size))  # filled in place: no second copy to stack
    for name in names:
        try:
            raw = _raw_photo(name)
        except Exception as exc:  # e.g. a photo that needs a download
            failed.append(f"{name} ({type(exc).__name__})")
            continue
        x = torch.from_numpy(np.array(raw, dtype=np.float32) / 255.0).permute(2, 0, 1)
        images[len(loaded)] = to_channels(center_crop_resize(x, image_size), 3).clamp_(0.0, 1.0)
        loaded.append(name)
    if failed:
        warnings.warn(f"skipped photos that do not load offline: {', '.join(failed)}", stacklevel=2)
    if not loaded:
        raise DataError(
            f"none of the photos {', '.join(names)} could be loaded: check that scikit-image is installed "
            "with its bundled data, or use the 'digits' source or your own images"
        )
    return ImageDataset.from_tensors(
        "photos", images[: len(loaded)], torch.arange(len(loaded)), class_names=tuple(loaded)
    )


#: crops per photo of the ``photo-crops`` source, and the range of a crop's side (fraction of the shorter side)
PHOTO_CROPS_PER_PHOTO = 100
PHOTO_CROP_SIDES = (0.25, 0.75)


def load_photo_crops(
    *, image_size: int = 32, per_photo: int = PHOTO_CROPS_PER_PHOTO, seed: int = 0, names: Sequence[str] | None = None
) -> ImageDataset:
    """Random square crops of the bundled photos, ``per_photo`` each, resized to ``image_size``; label = photo.

    A crop's side is drawn uniformly from 25-75% of the photo's shorter side, its place uniformly inside the
    photo, and it is mirrored left-right with probability 1/2 (seeded: one seed, one dataset). No crop is a
    whole photo, so a model trained here has natural-image BatchNorm statistics (what GradInversion's prior,
    Yin et al. 2021, assumes of a trained model) without having seen the ``photos`` source's images.
    """
    if isinstance(per_photo, bool) or not isinstance(per_photo, int) or per_photo < 1:
        raise ConfigError(f"per_photo must be a positive integer, got {per_photo!r}")
    names = tuple(PHOTO_NAMES if names is None else names)
    check_images_fit(
        "data source 'photo-crops'",
        count=len(names) * per_photo,
        channels=3,
        image_size=image_size,
        fix="lower --image-size",
    )
    gen = torch.Generator().manual_seed(seed)
    crops, labels, loaded = [], [], []
    for name in names:
        try:
            raw = torch.from_numpy(np.array(_raw_photo(name), dtype=np.uint8)).permute(2, 0, 1)
        except Exception:  # a photo that needs a download: skipped, as load_photos does
            continue
        h, w = raw.shape[-2:]
        low, high = (max(1, round(f * min(h, w))) for f in PHOTO_CROP_SIDES)
        for _ in range(per_photo):
            side = int(torch.randint(low, high + 1, (), generator=gen))
            top = int(torch.randint(0, h - side + 1, (), generator=gen))
            left = int(torch.randint(0, w - side + 1, (), generator=gen))
            crop = raw[:, top : top + side, left : left + side].to(torch.float32) / 255.0
            if bool(torch.rand((), generator=gen) < 0.5):
                crop = crop.flip(-1)
            crops.append(center_crop_resize(crop, image_size).clamp_(0.0, 1.0))
            labels.append(len(loaded))
        loaded.append(name)
    if not loaded:
        raise DataError(
            "none of the bundled photos could be loaded: check that scikit-image is installed with its data"
        )
    return ImageDataset.from_tensors(
        "photo-crops", torch.stack(crops), torch.tensor(labels, dtype=torch.long), class_names=tuple(loaded)
    )


SYNTHETIC_DEFAULT_CLASSES = 100
SYNTHETIC_MAX_CLASSES = 100_000


def synthetic_size(num_classes: int) -> int:
    """How many images ``synthetic:K`` holds: ``max(2048, 4 * K)``."""
    return max(2048, 4 * int(num_classes))


def load_synthetic(
    *, num_classes: int = SYNTHETIC_DEFAULT_CLASSES, image_size: int = 32, seed: int = 0
) -> ImageDataset:
    """Random RGB images (uniform in [0, 1]) with random labels over ``num_classes`` classes: the many-class
    case of label-recovery benchmarks, beyond what the bundled data sets hold. ``max(2048, 4 * num_classes)``
    images so that batches of a few hundred and disjoint auxiliary samples fit."""
    if not 2 <= num_classes <= SYNTHETIC_MAX_CLASSES:
        raise ConfigError(f"synthetic data needs 2 to {SYNTHETIC_MAX_CLASSES} classes, got {num_classes}")
    n = synthetic_size(num_classes)
    check_images_fit(
        f"data source 'synthetic:{num_classes}'",
        count=n,
        channels=3,
        image_size=image_size,
        fix="lower --image-size or the number of classes K in synthetic:K",
    )
    generator = torch.Generator().manual_seed(int(seed))
    images = torch.rand((n, 3, image_size, image_size), generator=generator)
    labels = torch.randint(0, num_classes, (n,), generator=generator)
    return ImageDataset.from_tensors(
        f"synthetic:{num_classes}",
        images,
        labels,
        class_names=tuple(str(i) for i in range(num_classes)),
        num_classes=num_classes,
    )
