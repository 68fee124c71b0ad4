"""In-memory image datasets, per-channel normalisation and reproducible batch sampling."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from gradinv.errors import ConfigError, DataError
from gradinv.memory import check_allocation
from gradinv.types import Normalization  # defined in the core layer, re-exported here

#: Lower bound on a per-channel standard deviation, so constant images never divide by zero.
MIN_STD = 1e-3


#: Values per chunk when :func:`channel_stats` works through a large set (32 MB of float64).
_STATS_CHUNK = 1 << 22


def channel_stats(images: Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) std of ``(N,C,H,W)`` images; std floored at ``MIN_STD``.

    Computed in float64, two passes over chunks of images, so it needs no float64 copy of the whole set."""
    x = images.detach()
    n, c = int(x.shape[0]), int(x.shape[1])
    per_image = max(1, x[0].numel()) if n else 1
    step = max(1, _STATS_CHUNK // per_image)
    count = max(1, n * int(x.shape[2]) * int(x.shape[3]))
    total = torch.zeros(c, dtype=torch.float64)
    for i in range(0, n, step):
        total += x[i : i + step].to(torch.float64).sum(dim=(0, 2, 3))
    mean = total / count
    squares = torch.zeros(c, dtype=torch.float64)
    for i in range(0, n, step):
        squares += (x[i : i + step].to(torch.float64) - mean.view(1, c, 1, 1)).pow(2).sum(dim=(0, 2, 3))
    std = (squares / count).sqrt().clamp_min(MIN_STD)
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def image_bytes(count: int, channels: int, image_size: int) -> int:
    """Bytes of ``count`` float32 images of ``channels`` x ``image_size`` x ``image_size``."""
    return int(count) * int(channels) * int(image_size) ** 2 * 4


def check_images_fit(
    source: str,
    *,
    count: int,
    channels: int,
    image_size: int,
    copies: float = 1.0,
    extra_bytes: int = 0,
    detail: str = "",
    fix: str = "lower --image-size or use fewer images",
) -> None:
    """Refuse, in one line, to load ``count`` images that would not fit in memory: ``copies`` times their
    float32 size plus ``extra_bytes`` (the loader's own intermediate arrays, said in ``detail``) against
    :func:`gradinv.memory.available_bytes`."""
    need = copies * image_bytes(count, channels, image_size) + extra_bytes
    check_allocation(
        need,
        what=(
            f"loading {source} at {image_size}x{image_size} ({count:,} images x {channels} channel(s), float32{detail})"
        ),
        fix=fix,
    )


@dataclass(frozen=True, eq=False)
class ImageDataset:
    """A labelled set of square images held in memory, values in [0, 1]."""

    name: str
    images: Tensor  # (N, C, H, W) float32 in [0, 1]
    labels: Tensor  # (N,) int64
    num_classes: int
    class_names: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        images, labels = self.images, self.labels
        if not isinstance(images, Tensor) or images.dim() != 4 or images.dtype != torch.float32:
            raise DataError(
                f"dataset '{self.name}': images must be a float32 (N,C,H,W) tensor, got "
                f"{getattr(images, 'dtype', type(images).__name__)} {tuple(getattr(images, 'shape', ()))}"
            )
        n, c, h, w = images.shape
        if n == 0:
            raise DataError(f"dataset '{self.name}' has no images: give it at least one image")
        if h != w:
            raise DataError(f"dataset '{self.name}': images must be square, got {h}x{w}: centre-crop them")
        if not isinstance(labels, Tensor) or labels.dtype != torch.int64 or labels.shape != (n,):
            raise DataError(
                f"dataset '{self.name}': labels must be an int64 tensor of shape ({n},), got "
                f"{getattr(labels, 'dtype', type(labels).__name__)} {tuple(getattr(labels, 'shape', ()))}"
            )
        if self.num_classes < 1 or len(self.class_names) != self.num_classes:
            raise DataError(
                f"dataset '{self.name}': num_classes={self.num_classes} but {len(self.class_names)} class "
                "names: give one name per class"
            )
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi >= self.num_classes:
            raise DataError(f"dataset '{self.name}': labels must lie in 0..{self.num_classes - 1}, got {lo}..{hi}")
        if len(self.mean) != c or len(self.std) != c:
            raise DataError(
                f"dataset '{self.name}': mean/std need {c} values (one per channel), got "
                f"{len(self.mean)} and {len(self.std)}"
            )
        object.__setattr__(self, "class_names", tuple(str(s) for s in self.class_names))
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))

    @classmethod
    def from_tensors(
        cls,
        name: str,
        images: Tensor,
        labels: Tensor,
        *,
        class_names: Sequence[str] | None = None,
        num_classes: int | None = None,
    ) -> ImageDataset:
        """Build a dataset whose mean/std are computed from ``images``.

        ``num_classes`` defaults to ``len(class_names)`` or ``max(label) + 1``; class names default to
        ``"0", "1", ...``.
        """
        images = images.detach().to(torch.float32).contiguous()
        labels = labels.detach().to(torch.int64).contiguous()
        if num_classes is None:
            num_classes = len(class_names) if class_names is not None else int(labels.max()) + 1
        if class_names is None:
            class_names = tuple(str(i) for i in range(num_classes))
        mean, std = channel_stats(images)
        return cls(name, images, labels, num_classes, tuple(class_names), mean, std)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return self.images[index], int(self.labels[index])

    @property
    def channels(self) -> int:
        return int(self.images.shape[1])

    @property
    def image_size(self) -> int:
        return int(self.images.shape[-1])

    @property
    def normalization(self) -> Normalization:
        """The :class:`Normalization` built from this dataset's per-channel mean and std."""
        return Normalization(self.mean, self.std)

    def __repr__(self) -> str:
        return (
            f"ImageDataset(name={self.name!r}, images={len(self)}x{self.channels}x{self.image_size}x"
            f"{self.image_size}, num_classes={self.num_classes})"
        )


def sample_batch(
    dataset: ImageDataset, *, batch_size: int, seed: int, distinct_labels: bool = False
) -> tuple[Tensor, Tensor]:
    """Pick ``batch_size`` different images reproducibly from ``seed``; returns ``(images, labels)``.

    Uses its own ``torch.Generator`` so the global RNG is untouched. With ``distinct_labels`` at most one
    image per class is taken.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch size must be a positive integer, got {batch_size!r}")
    n = len(dataset)
    if batch_size > n:
        raise ConfigError(
            f"batch size {batch_size} is larger than data source '{dataset.name}', which has {n} images: "
            f"use a batch size of at most {n} or a larger data source"
        )
    generator = torch.Generator().manual_seed(int(seed))
    order = torch.randperm(n, generator=generator)
    if not distinct_labels:
        index = order[:batch_size]
    else:
        present = int(torch.unique(dataset.labels).numel())
        if batch_size > present:
            raise ConfigError(
                f"batch size {batch_size} with distinct labels needs {batch_size} classes, but data source "
                f"'{dataset.name}' has images of only {present} classes: use a batch size of at most "
                f"{present} or allow repeated labels"
            )
        seen: set[int] = set()
        picked: list[int] = []
        for i, label in zip(order.tolist(), dataset.labels[order].tolist(), strict=True):
            if label not in seen:
                seen.add(label)
                picked.append(i)
                if len(picked) == batch_size:
                    break
        index = torch.tensor(picked, dtype=torch.int64)
    return dataset.images[index].clone(), dataset.labels[index].clone()
