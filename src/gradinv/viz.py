"""Headless figures: reconstruction grids and line plots, written atomically.

Figures are built with :class:`matplotlib.figure.Figure` and rendered by the Agg canvas directly, never
through ``pyplot``: no display is needed, no global backend is switched and no figure is left open, so these
functions are safe in scripts, tests and threads. Files are written to a temporary file in the target folder
and moved into place with :func:`os.replace`, so a reader never sees a half-written image.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from gradinv._atomic import atomic_path
from gradinv.errors import ShapeError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["save_reconstruction_grid", "save_curves"]

_MAX_COLS = 16
_CELL_IN = 1.3  # inches per image: a 32 px image becomes ~156 px at 120 dpi
_DPI = 120


def _new_figure(width_in: float, height_in: float) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_in, height_in), dpi=_DPI)
    FigureCanvasAgg(fig)
    return fig


def _save_atomic(fig: Figure, path: str | os.PathLike[str]) -> Path:
    """Render ``fig`` to ``path`` (format from the suffix, PNG by default) via a temp file + os.replace."""
    target = Path(path)
    fmt = target.suffix.lstrip(".").lower() or "png"
    with atomic_path(target) as tmp, open(tmp, "xb") as fh:
        # 'tight' fits the canvas to what is drawn, so a long title is never cut off.
        fig.savefig(fh, format=fmt, dpi=_DPI, bbox_inches="tight", pad_inches=0.05)
    return target


def _to_display(images: Tensor, name: str) -> np.ndarray:
    """(B, C, H, W) tensor in [0, 1] -> (B, H, W) or (B, H, W, 3) float array, NaN/inf made displayable."""
    if not isinstance(images, Tensor) or images.ndim != 4:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ShapeError(f"{name} must be a (B, C, H, W) tensor, got {shape}")
    if images.shape[1] not in (1, 3):
        raise ShapeError(f"{name} must have 1 (grey) or 3 (RGB) channels, got {images.shape[1]}")
    arr = images.detach().to(device="cpu", dtype=torch.float32)
    arr = torch.nan_to_num(arr, nan=0.0, posinf=1.0, neginf=0.0).clamp(0.0, 1.0).numpy()
    if arr.shape[1] == 1:
        return arr[:, 0]
    return arr.transpose(0, 2, 3, 1)


def save_reconstruction_grid(
    path: str | os.PathLike[str],
    *,
    truth: Tensor | None,
    reconstruction: Tensor,
    psnr: Sequence[float] | None = None,
    captions: Sequence[str] | None = None,
    title: str | None = None,
) -> Path:
    """Save a PNG grid: ground truth row above the reconstruction row, ``(B, C, H, W)`` images in ``[0, 1]``.

    Grey images (``C == 1``) are drawn in grey, RGB as is; values are clamped to ``[0, 1]``. Pixels are
    upscaled by nearest neighbour (about 1.3 inch at 120 dpi per image). At most 16 images per row; larger
    batches wrap into more truth/reconstruction row pairs. When ``psnr`` is given (one value per
    reconstruction) each reconstruction is labelled with it; ``captions`` (one short text per reconstruction,
    up to two lines) label them instead. With ``truth=None`` only reconstructions are drawn. Returns the
    written path.
    """
    rec = _to_display(reconstruction, "reconstruction")
    tru = _to_display(truth, "truth") if truth is not None else None
    n_rec = rec.shape[0]
    n_tru = tru.shape[0] if tru is not None else 0
    if tru is not None and tru.shape[1:3] != rec.shape[1:3]:
        raise ShapeError(f"truth images are {tru.shape[1:3]} pixels but reconstructions are {rec.shape[1:3]}")
    if psnr is not None and len(psnr) != n_rec:
        raise ShapeError(f"got {len(psnr)} PSNR values for {n_rec} reconstructed images")
    if captions is not None and len(captions) != n_rec:
        raise ShapeError(f"got {len(captions)} captions for {n_rec} reconstructed images")
    if captions is None and psnr is not None:
        captions = [f"{float(v):.1f} dB" for v in psnr]
    n = max(n_rec, n_tru, 1)
    cols = min(n, _MAX_COLS)
    groups = math.ceil(n / cols)
    rows_per_group = 2 if tru is not None else 1

    # Manual layout in inches: [title] then per group a truth row, a reconstruction row and its PSNR labels.
    img_h, img_w = rec.shape[1:3]
    cell_h = _CELL_IN
    cell_w = _CELL_IN * min(max(img_w / max(img_h, 1), 0.25), 4.0)  # keep the aspect ratio of the images
    gap = 0.06
    label_h = 0.0 if captions is None else 0.22 * max((c.count("\n") + 1 for c in captions), default=1)
    title_h = 0.4 if title else 0.0
    side_w = 0.3 if tru is not None else 0.05
    group_h = rows_per_group * cell_h + (rows_per_group - 1) * gap + label_h
    group_gap = 0.18
    width = side_w + cols * cell_w + (cols - 1) * gap + 0.05
    height = title_h + 0.05 + groups * group_h + (groups - 1) * group_gap + 0.05
    fig = _new_figure(width, height)
    if title:
        fig.text(0.5, 1.0 - 0.2 / height, title, ha="center", va="center", fontsize=11)

    def cell(row_top_in: float, col: int):
        left = side_w + col * (cell_w + gap)
        ax = fig.add_axes((left / width, 1.0 - (row_top_in + cell_h) / height, cell_w / width, cell_h / height))
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_visible(False)
        return ax

    def draw(ax, img: np.ndarray) -> None:
        if img.ndim == 2:
            ax.imshow(img, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest", aspect="auto")
        else:
            ax.imshow(img, interpolation="nearest", aspect="auto")

    for g in range(groups):
        top = title_h + 0.05 + g * (group_h + group_gap)
        rec_top = top + (cell_h + gap if tru is not None else 0.0)
        for c in range(cols):
            i = g * cols + c
            if tru is not None and i < n_tru:
                ax = cell(top, c)
                draw(ax, tru[i])
                if c == 0:
                    ax.set_ylabel("truth", fontsize=9)
            if i < n_rec:
                ax = cell(rec_top, c)
                draw(ax, rec[i])
                if c == 0 and tru is not None:
                    ax.set_ylabel("reconstruction", fontsize=9)
                if captions is not None:
                    ax.set_xlabel(captions[i], fontsize=8, labelpad=2)
    return _save_atomic(fig, path)


def save_curves(
    path: str | os.PathLike[str],
    *,
    curves: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    xlabel: str,
    ylabel: str,
    title: str | None = None,
    logx: bool = False,
) -> Path:
    """Save a line plot with one labelled line per entry ``name -> (xs, ys)`` (e.g. time-to-PSNR curves).

    ``logx`` puts the x axis on a log scale (non-positive x values are then not shown). Returns the path.
    """
    fig = _new_figure(6.4, 4.2)
    ax = fig.add_subplot(1, 1, 1)
    for name, (xs, ys) in curves.items():
        x = np.asarray([float(v) for v in xs], dtype=np.float64)
        y = np.asarray([float(v) for v in ys], dtype=np.float64)
        if x.shape != y.shape:
            raise ShapeError(f"curve {name!r} has {x.size} x values but {y.size} y values")
        ax.plot(x, y, marker="o" if x.size <= 30 else None, markersize=3, linewidth=1.5, label=str(name))
    if logx:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(True, alpha=0.3, which="both" if logx else "major")
    if curves:
        ax.legend(fontsize=9)
    fig.tight_layout()
    return _save_atomic(fig, path)
