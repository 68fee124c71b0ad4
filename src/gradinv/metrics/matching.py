"""Order-free matching of reconstructed samples to true samples.

Gradient inversion recovers a batch only up to a permutation (the averaged gradient is symmetric in the batch
order), so scores are computed after an optimal one-to-one assignment of reconstructions to ground-truth
images, found with the Hungarian algorithm (Kuhn 1955; ``scipy.optimize.linear_sum_assignment``), as done in
e.g. Geiping et al. 2020 and Yin et al. 2021.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from gradinv.errors import ConfigError, ShapeError
from gradinv.metrics.image import MSE_FLOOR

__all__ = ["align", "pairwise_mse"]

_COSTS = ("mse", "neg_psnr")


def pairwise_mse(recon: Tensor, truth: Tensor) -> Tensor:
    """Float64 matrix ``(len(recon), len(truth))`` of per-sample MSEs between every pair of images."""
    _check(recon, truth, need_enough=False)
    r = recon.detach().to(torch.float64).flatten(1)
    t = truth.detach().to(device=recon.device, dtype=torch.float64).flatten(1)
    if r.shape[0] == 0 or t.shape[0] == 0 or r.shape[1] == 0:
        return torch.zeros(r.shape[0], t.shape[0], dtype=torch.float64, device=r.device)
    # Direct differences (not the |a|^2 + |b|^2 - 2ab expansion): exact for near-identical images.
    dist = torch.cdist(r, t, compute_mode="donot_use_mm_for_euclid_dist")
    return dist.square() / r.shape[1]


def _check(recon: Tensor, truth: Tensor, *, need_enough: bool) -> None:
    if not isinstance(recon, Tensor) or not isinstance(truth, Tensor):
        raise ShapeError(f"expected two torch tensors, got {type(recon).__name__} and {type(truth).__name__}")
    if recon.ndim != 4 or truth.ndim != 4:
        raise ShapeError(
            "expected image batches of shape (B, C, H, W), got reconstruction "
            f"{tuple(recon.shape)} and truth {tuple(truth.shape)}"
        )
    if recon.shape[1:] != truth.shape[1:]:
        raise ShapeError(
            f"reconstructed images have shape {tuple(recon.shape[1:])} but true images have "
            f"{tuple(truth.shape[1:])}; both must be (C, H, W) alike"
        )
    if need_enough and recon.shape[0] < truth.shape[0]:
        raise ShapeError(
            f"cannot match {truth.shape[0]} true images with only {recon.shape[0]} reconstructions; "
            "the reconstruction needs at least as many samples as the truth"
        )


def align(recon: Tensor, truth: Tensor, *, cost: str = "mse") -> Tensor:
    """Optimal assignment of reconstructions to true images; returns ``perm`` (LongTensor, ``len(truth)``).

    ``recon[perm[i]]`` is the reconstruction matched with ``truth[i]``; ``recon[perm]`` is the aligned batch.
    The assignment minimises the summed pairwise cost: ``"mse"`` (default), or ``"neg_psnr"`` (maximises the
    summed PSNR, i.e. minimises the sum of ``log(mse)``, which favours getting some images very right; it
    usually, but not always, gives the same permutation as ``"mse"``). A reconstruction with more samples than
    the truth is allowed: the best-matching subset is chosen and the rest ignored. Non-finite costs (e.g. a
    diverged, NaN reconstruction) are treated as worse than any finite cost. ``perm`` lives on
    ``recon.device``.

    Raises :class:`~gradinv.errors.ShapeError` if ``recon`` has fewer samples than ``truth`` or the per-sample
    shapes differ.
    """
    if cost not in _COSTS:
        raise ConfigError(f"unknown matching cost {cost!r}; choose one of {', '.join(_COSTS)}")
    _check(recon, truth, need_enough=True)
    m = truth.shape[0]
    if m == 0:
        return torch.zeros(0, dtype=torch.long, device=recon.device)
    c = pairwise_mse(recon, truth)
    if cost == "neg_psnr":
        # -PSNR = 10*log10(mse) - 10*log10(range**2); the constant does not change the assignment.
        c = 10.0 * torch.log10(c.clamp_min(MSE_FLOOR))
    c_np = c.cpu().numpy().T  # rows: truth, columns: reconstructions (rows <= columns)
    finite = np.isfinite(c_np)
    if not finite.all():
        worst = float(np.abs(c_np[finite]).max()) if finite.any() else 0.0
        c_np = np.where(finite, c_np, 2.0 * worst + 1.0)
    rows, cols = linear_sum_assignment(c_np)
    perm = np.empty(m, dtype=np.int64)
    perm[rows] = cols
    return torch.from_numpy(perm).to(recon.device)
