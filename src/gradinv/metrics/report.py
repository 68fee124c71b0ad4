"""Scoring a reconstructed batch against the ground truth in one call."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from gradinv.errors import ShapeError
from gradinv.metrics.image import mse, psnr, ssim
from gradinv.metrics.matching import _check, align

__all__ = ["ImageScores", "score_images"]


def _mean(values: list[float]) -> float:
    return math.fsum(values) / len(values) if values else math.nan


@dataclass(frozen=True)
class ImageScores:
    """Per-sample scores of an aligned batch: entry ``i`` compares ``recon[order[i]]`` with ``truth[i]``."""

    mse: list[float]
    psnr: list[float]
    ssim: list[float]
    order: list[int]

    @property
    def mean_mse(self) -> float:
        """Mean of the per-sample MSEs (NaN for an empty batch)."""
        return _mean(self.mse)

    @property
    def mean_psnr(self) -> float:
        """Mean of the per-sample PSNRs in dB (not the PSNR of the mean MSE)."""
        return _mean(self.psnr)

    @property
    def mean_ssim(self) -> float:
        """Mean of the per-sample SSIMs."""
        return _mean(self.ssim)

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-ready dict with the per-sample lists, the order and the three means."""
        return {
            "mse": list(self.mse),
            "psnr": list(self.psnr),
            "ssim": list(self.ssim),
            "order": list(self.order),
            "mean_mse": self.mean_mse,
            "mean_psnr": self.mean_psnr,
            "mean_ssim": self.mean_ssim,
        }


def score_images(recon: Tensor, truth: Tensor, *, align_batch: bool = True) -> ImageScores:
    """Score a reconstruction ``(N, C, H, W)`` against the truth ``(B, C, H, W)``, both in ``[0, 1]``.

    ``recon`` is clamped into ``[0, 1]`` first (NaNs stay NaN). With ``align_batch`` (default) the samples are
    matched by :func:`~gradinv.metrics.matching.align` on MSE, which also lets ``N > B`` pick the best subset;
    otherwise ``N == B`` is required and ``recon[i]`` is compared with ``truth[i]``. MSE, PSNR and SSIM
    (Wang et al. 2004) are then computed per sample.
    """
    _check(recon, truth, need_enough=True)
    with torch.no_grad():
        r = recon.detach().clamp(0.0, 1.0)
        t = truth.detach().to(r.device)
        if align_batch:
            perm = align(r, t)
        else:
            if r.shape[0] != t.shape[0]:
                raise ShapeError(
                    f"align_batch=False needs as many reconstructions as true images, got {r.shape[0]} and "
                    f"{t.shape[0]}; pass align_batch=True to pick the best-matching subset"
                )
            perm = torch.arange(t.shape[0], device=r.device)
        matched = r[perm]
        return ImageScores(
            mse=[float(v) for v in mse(matched, t).tolist()],
            psnr=[float(v) for v in psnr(matched, t).tolist()],
            ssim=[float(v) for v in ssim(matched, t).tolist()],
            order=[int(v) for v in perm.tolist()],
        )
