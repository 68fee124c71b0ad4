"""User data: a folder of images (ImageFolder or flat layout) or an ``.npz`` archive."""

from __future__ import annotations

import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from gradinv.data.dataset import ImageDataset, check_images_fit
from gradinv.data.transforms import center_crop_resize, to_channels
from gradinv.errors import DataError

#: File extensions read as images (lower case, compared case-insensitively).
IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")

#: Class name of a flat folder (all images get label 0).
FLAT_CLASS_NAME = "images"

_GREY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})
_EXT_HINT = ", ".join(IMAGE_EXTENSIONS)


def _is_image(path: Path) -> bool:
    return path.is_file() and not path.name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS


def _visible(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if not p.name.startswith("."))


def _read_image(path: Path) -> tuple[Tensor, bool]:
    """Decode one file as a (C,H,W) float32 tensor in [0,1] (C is 1 or 3) and whether it is colour."""
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. palette-with-transparency notices
            with Image.open(path) as im:
                im.seek(0)  # first frame of animated GIF/WebP/multi-page TIFF
                im.load()
                mode = im.mode
                if mode in _GREY_MODES:
                    if mode in ("1", "L", "LA", "La"):
                        arr = np.asarray(im.convert("L"), dtype=np.float32) / 255.0
                    else:  # 16/32-bit integer or float grey
                        arr = np.asarray(im, dtype=np.float32)
                        top = float(arr.max()) if arr.size else 0.0
                        if mode.startswith("I;16") or top > 255.0:
                            arr = arr / 65535.0
                        elif mode == "I" or top > 1.0:
                            arr = arr / 255.0
                    arr = arr[None]
                    colour = False
                else:
                    rgb = im.convert("RGBA").convert("RGB") if mode == "P" else im.convert("RGB")
                    arr = np.asarray(rgb, dtype=np.float32).transpose(2, 0, 1) / 255.0
                    colour = True
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise DataError(
            f"cannot read image '{path}': {exc}. Remove or replace this file (it may be corrupt or not really an image)"
        ) from exc
    if arr.shape[-1] == 0 or arr.shape[-2] == 0:
        raise DataError(f"image '{path}' is empty (0 pixels): remove it")
    return torch.from_numpy(np.clip(arr, 0.0, 1.0)), colour


def _load_images(files: list[Path], image_size: int, source: str) -> Tensor:
    """Decode and resize ``files``; refuses before reading if even grey images would not fit in memory, and
    again at the first colour image if RGB ones would not."""
    fix = "lower --image-size or use fewer images"
    check_images_fit(source, count=len(files), channels=1, image_size=image_size, fix=fix)
    images: list[Tensor | None] = []
    colour_seen = False
    for f in files:
        x, colour = _read_image(f)
        if colour and not colour_seen:
            colour_seen = True
            check_images_fit(source, count=len(files), channels=3, image_size=image_size, fix=fix)
        images.append(center_crop_resize(x, image_size))
    channels = 3 if colour_seen else 1
    out = torch.empty((len(files), channels, image_size, image_size))
    for i, x in enumerate(images):  # filled in place, each resized image released once copied: no 2x peak
        out[i] = to_channels(x, channels)
        images[i] = None
    return out.clamp_(0.0, 1.0)


def load_folder(path: str | Path, *, image_size: int = 32) -> ImageDataset:
    """Load a folder of images, centre-cropped and resized to ``image_size``.

    With class sub-folders (ImageFolder layout) the sorted sub-folder names are the classes; a flat folder
    gives one class, ``"images"``. Images are RGB if any image is colour, grey otherwise.
    """
    root = Path(path).expanduser()
    if not root.exists():
        raise DataError(
            f"data folder '{root}' does not exist: pass a folder of images, an .npz file, 'digits' or 'photos'"
        )
    if not root.is_dir():
        raise DataError(f"'{root}' is not a folder: pass a folder of images or an .npz file")
    entries = _visible(root)
    if not entries:
        raise DataError(
            f"data folder '{root}' is empty: put images ({_EXT_HINT}) in it, or one sub-folder of images per class"
        )
    loose = [p for p in entries if _is_image(p)]
    class_dirs = [p for p in entries if p.is_dir()]
    if class_dirs and loose:
        raise DataError(
            f"data folder '{root}' mixes {len(loose)} loose image(s) (e.g. '{loose[0].name}') with class "
            f"sub-folders ({', '.join(d.name for d in class_dirs[:5])}): move the loose images into a class "
            "sub-folder, or use a flat folder without sub-folders"
        )
    if class_dirs:
        files: list[Path] = []
        labels: list[int] = []
        for label, d in enumerate(class_dirs):
            found = sorted(p for p in d.rglob("*") if _is_image(p) and not _hidden_below(p, d))
            if not found:
                raise DataError(
                    f"class folder '{d}' has no images with a known extension ({_EXT_HINT}): add images "
                    "to it or remove it"
                )
            files += found
            labels += [label] * len(found)
        class_names = tuple(d.name for d in class_dirs)
    else:
        if not loose:
            others = [p.name for p in entries if p.is_file()]
            shown = ", ".join(others[:5]) + (", ..." if len(others) > 5 else "")
            raise DataError(
                f"data folder '{root}' has no images with a known extension ({_EXT_HINT}); found "
                f"{len(others)} other file(s): {shown}. Add images, or convert them to one of these formats"
            )
        files, labels, class_names = loose, [0] * len(loose), (FLAT_CLASS_NAME,)
    name = root.resolve().name or str(root)
    images = _load_images(files, image_size, f"data folder '{root}'")
    return ImageDataset.from_tensors(name, images, torch.tensor(labels, dtype=torch.int64), class_names=class_names)


def _hidden_below(path: Path, top: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(top).parts)


def _images_to_nchw(arr: np.ndarray, source: Path) -> np.ndarray:
    if arr.ndim == 3:
        return arr[:, None]
    if arr.ndim == 4:
        if arr.shape[1] in (1, 3) and arr.shape[-1] not in (1, 3):
            return arr
        if arr.shape[-1] in (1, 3):
            return arr.transpose(0, 3, 1, 2)
        if arr.shape[1] in (1, 3):
            return arr
    raise DataError(
        f"'images' in '{source}' has shape {arr.shape}: expected (N,H,W), (N,H,W,C) or (N,C,H,W) with C = 1 "
        "(grey) or 3 (RGB)"
    )


def _scale_pixels(arr: np.ndarray, source: Path) -> np.ndarray:
    if arr.dtype == np.bool_:
        return arr.astype(np.float32)
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise DataError(f"'images' in '{source}' has dtype {arr.dtype}: store uint8 (0..255) or float (0..1)")
    x = arr.astype(np.float32)
    if not np.isfinite(x).all():
        raise DataError(f"'images' in '{source}' contains NaN or infinite values: replace them")
    lo, hi = float(x.min()), float(x.max())
    if lo < 0.0 or hi > 255.0:
        raise DataError(
            f"'images' in '{source}' has values in [{lo:g}, {hi:g}]: store uint8 0..255 or float 0..1 pixels"
        )
    if np.issubdtype(arr.dtype, np.integer) or hi > 1.0:
        x /= 255.0  # in place: ``x`` is already a fresh float32 copy
    return x


def load_npz(path: str | Path, *, image_size: int = 32) -> ImageDataset:
    """Load an ``.npz`` with ``images`` ((N,H,W), (N,H,W,C) or (N,C,H,W); uint8 or float in [0,1]) and
    integer ``labels`` (N,); an optional string array ``class_names`` names the classes."""
    source = Path(path).expanduser()
    if not source.exists():
        raise DataError(
            f"data file '{source}' does not exist: pass a folder of images, an .npz file, 'digits' or 'photos'"
        )
    try:
        archive = np.load(source, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise DataError(
            f"cannot read '{source}' as an .npz archive ({exc}): save it with np.savez(path, images=..., labels=...)"
        ) from exc
    if not hasattr(archive, "files"):
        raise DataError(
            f"'{source}' holds a single array, not an .npz archive: save it with np.savez(path, images=..., labels=...)"
        )
    with archive:
        keys = list(archive.files)
        missing = [k for k in ("images", "labels") if k not in keys]
        if missing:
            raise DataError(
                f"'{source}' has no {' or '.join(repr(k) for k in missing)} array (it has: "
                f"{', '.join(keys) or 'nothing'}): save it with np.savez(path, images=..., labels=...)"
            )
        try:
            raw_images, raw_labels = archive["images"], archive["labels"]
            raw_names = archive["class_names"] if "class_names" in keys else None
        except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
            raise DataError(
                f"cannot read arrays from '{source}' ({exc}): store plain numeric arrays (no pickled "
                "objects) with np.savez(path, images=..., labels=...)"
            ) from exc
    images = _images_to_nchw(np.asarray(raw_images), source)
    if images.size == 0:
        raise DataError(f"'images' in '{source}' is empty (shape {np.shape(raw_images)}): store at least one image")
    check_images_fit(  # the resized images plus the float32 copy of the stored ones
        f"data file '{source}'",
        count=images.shape[0],
        channels=images.shape[1],
        image_size=image_size,
        extra_bytes=images.size * 4,
        detail=", from a float32 copy of the stored ones",
        fix="lower --image-size or store fewer images",
    )
    images = _scale_pixels(images, source)
    labels = np.asarray(raw_labels)
    n = images.shape[0]
    if labels.ndim != 1:
        raise DataError(f"'labels' in '{source}' has shape {labels.shape}: store a 1-D array (N,) of class ids")
    if labels.shape[0] != n:
        raise DataError(f"'{source}' has {n} images but {labels.shape[0]} labels: store exactly one label per image")
    if np.issubdtype(labels.dtype, np.floating) and np.isfinite(labels).all() and (labels == labels.round()).all():
        labels = labels.astype(np.int64)
    if not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"'labels' in '{source}' has dtype {labels.dtype}: store integer class ids 0..K-1")
    labels = labels.astype(np.int64)
    if labels.min() < 0:
        raise DataError(f"'labels' in '{source}' has negative values (min {labels.min()}): use class ids 0..K-1")
    num_classes = int(labels.max()) + 1
    class_names = None
    if raw_names is not None:
        names = [str(s) for s in np.asarray(raw_names).reshape(-1)]
        if len(names) < num_classes:
            raise DataError(
                f"'class_names' in '{source}' has {len(names)} names but labels go up to {num_classes - 1}: "
                "give one name per class"
            )
        class_names, num_classes = tuple(names), len(names)
    tensor = center_crop_resize(torch.from_numpy(np.ascontiguousarray(images)), image_size).clamp_(0.0, 1.0)
    return ImageDataset.from_tensors(
        source.stem,
        tensor,
        torch.from_numpy(labels),
        class_names=class_names,
        num_classes=num_classes,
    )
