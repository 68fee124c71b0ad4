"""The defenses' maths as pure tensor functions (no classes, no state): the registry's classes, the scenario
and any framework adapter call these. Updates are dictionaries of tensors keyed by parameter name."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import brentq
from scipy.stats import norm
from torch import Tensor

Update = Mapping[str, Tensor]


def _randn_like(t: Tensor, generator: torch.Generator) -> Tensor:
    """Standard normal noise shaped like ``t``, drawn on the CPU from ``generator`` (same numbers on any device)."""
    return torch.randn(t.shape, generator=generator, dtype=t.dtype).to(t.device)


def global_norm(update: Update) -> Tensor:
    """The L2 norm of all tensors of ``update`` taken together."""
    return torch.sqrt(sum(t.double().pow(2).sum() for t in update.values()))


def clip_update(update: Update, max_norm: float) -> dict[str, Tensor]:
    """Scale ``update`` down so its global L2 norm is at most ``max_norm`` (unchanged when already within)."""
    scale = min(1.0, max_norm / max(float(global_norm(update)), 1e-12))
    return {k: v * scale for k, v in update.items()}


def add_noise(update: Update, *, std: float, generator: torch.Generator, distribution: str = "gaussian") -> dict:
    """Add i.i.d. noise of standard deviation ``std`` to every entry (Gaussian, or Laplace of the same std)."""
    noisy = {}
    for k, v in update.items():
        if distribution == "gaussian":
            z = _randn_like(v, generator)
        else:  # Laplace with unit variance: sign(u) * log(1 - 2|u|) / sqrt(2), u uniform in (-1/2, 1/2)
            u = torch.rand(v.shape, generator=generator, dtype=v.dtype).to(v.device) - 0.5
            z = -torch.sign(u) * torch.log1p(-2 * u.abs().clamp(max=0.5 - 1e-7)) / math.sqrt(2.0)
        noisy[k] = v + std * z
    return noisy


def prune_smallest(update: Update, fraction: float) -> dict[str, Tensor]:
    """Set the ``fraction`` of entries of smallest magnitude in each tensor to zero (Zhu et al. 2019, Sec. 5)."""
    pruned = {}
    for k, v in update.items():
        drop = int(round(fraction * v.numel()))
        if drop <= 0:
            pruned[k] = v.clone()
            continue
        order = v.abs().flatten().argsort(stable=True)
        mask = torch.ones(v.numel(), dtype=torch.bool, device=v.device)
        mask[order[:drop]] = False
        pruned[k] = v * mask.view_as(v)
    return pruned


def scaled_sign(update: Update, *, scaled: bool = True) -> dict[str, Tensor]:
    """Each tensor's sign, times its mean magnitude ``||g||_1 / d`` when ``scaled`` (Karimireddy et al. 2019)."""
    return {k: torch.sign(v) * (v.abs().mean() if scaled else 1.0) for k, v in update.items()}


def gaussian_epsilon(noise_multiplier: float, *, delta: float, rounds: int = 1) -> float:
    """Exact (epsilon, delta) of ``rounds`` Gaussian mechanisms of sensitivity 1 and noise ``noise_multiplier``.

    Their composition is mu-GDP with ``mu = sqrt(rounds) / noise_multiplier`` (Dong, Roth & Su 2022), whose
    privacy curve is ``delta(eps) = Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2)`` (Balle & Wang 2018);
    solved for eps. No subsampling amplification: the client's batch is fixed.
    """
    if noise_multiplier <= 0:
        return math.inf
    mu = math.sqrt(rounds) / noise_multiplier

    def excess(eps: float) -> float:
        # e^eps Phi(.) in log space: e^eps alone overflows for eps above ~709 (a very small noise multiplier)
        return norm.cdf(-eps / mu + mu / 2) - math.exp(eps + norm.logcdf(-eps / mu - mu / 2)) - delta

    if excess(0.0) <= 0:
        return 0.0
    hi = 1.0
    while excess(hi) > 0:
        hi *= 2
    return float(brentq(excess, 0.0, hi, xtol=1e-10))


# -- data-side defenses: they transform the client's batch before it trains ---------------------------------


def _numpy_rng(generator: torch.Generator) -> np.random.Generator:
    """A NumPy generator seeded from ``generator`` (for the distributions torch cannot draw with a generator)."""
    return np.random.default_rng(int(torch.randint(0, 2**31 - 1, (1,), generator=generator)))


def mix_partners(batch: int, k: int, *, generator: torch.Generator) -> Tensor:
    """(B, k) indices: row i starts with i, then k - 1 other samples of the batch drawn without replacement."""
    rows = []
    for i in range(batch):
        others = torch.tensor([j for j in range(batch) if j != i], dtype=torch.long)
        rows.append(torch.cat([torch.tensor([i]), others[torch.randperm(batch - 1, generator=generator)[: k - 1]]]))
    return torch.stack(rows)


def dirichlet_coefficients(batch: int, k: int, *, alpha: float, generator: torch.Generator) -> Tensor:
    """(B, k) mixing weights ~ Dirichlet(alpha, ..., alpha); for k = 2 that is MixUp's Beta(alpha, alpha)."""
    return torch.from_numpy(_numpy_rng(generator).dirichlet([alpha] * k, size=batch))


def instahide_coefficients(batch: int, k: int, *, upper: float, generator: torch.Generator) -> Tensor:
    """(B, k) mixing weights as InstaHide draws them: |N(0, 1)| normalised to sum 1, redrawn until none
    exceeds ``upper`` (Huang et al. 2020 use 0.65)."""
    rng = _numpy_rng(generator)
    rows = []
    for _ in range(batch):
        while True:
            lam = np.abs(rng.standard_normal(k))
            lam = lam / lam.sum()
            if k == 1 or lam.max() <= upper:
                break
        rows.append(lam)
    return torch.from_numpy(np.stack(rows))


def mix(inputs: Tensor, targets: Tensor, *, partners: Tensor, coeffs: Tensor) -> tuple[Tensor, Tensor]:
    """k-way MixUp within the batch (Zhang et al. 2018; Huang et al. 2020's k-mix): sample i becomes
    ``sum_j coeffs[i, j] * x[partners[i, j]]`` and its soft label (B, K) the same mix of the partners' labels."""
    b, k = partners.shape
    idx = partners.to(inputs.device)
    c = coeffs.to(device=inputs.device, dtype=inputs.dtype)
    mixed = (c.view((b, k) + (1,) * (inputs.ndim - 1)) * inputs[idx]).sum(dim=1)
    mixed_targets = (c.unsqueeze(-1).to(targets.dtype) * targets[idx]).sum(dim=1)
    return mixed, mixed_targets


def random_sign_flip(inputs: Tensor, *, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Flip the sign of each pixel with probability 1/2 (InstaHide's one-time key, Huang et al. 2020)."""
    key = torch.randint(0, 2, inputs.shape, generator=generator).to(inputs.device, inputs.dtype) * 2 - 1
    return inputs * key, key


def pixelate(images: Tensor, *, block: int) -> Tensor:
    """Replace each ``block x block`` cell of images (B, C, H, W) by its mean (Fan 2018); edge cells are
    averaged over the pixels they hold."""
    h, w = images.shape[-2:]
    pooled = F.avg_pool2d(images, block, stride=block, ceil_mode=True, count_include_pad=False)
    return pooled.repeat_interleave(block, dim=-2).repeat_interleave(block, dim=-1)[..., :h, :w]


def dp_pixelate(images: Tensor, *, block: int, epsilon: float, m: int, generator: torch.Generator) -> Tensor:
    """DP-Pix (Fan 2018): pixelise, then add Laplace noise of scale ``m / (block^2 * epsilon)`` to each cell
    (pixel values in [0, 1]; ``m`` pixels may differ between neighbouring images)."""
    h, w = images.shape[-2:]
    pooled = F.avg_pool2d(images, block, stride=block, ceil_mode=True, count_include_pad=False)
    scale = m / (block * block * epsilon)
    u = torch.rand(pooled.shape, generator=generator, dtype=pooled.dtype).to(pooled.device) - 0.5
    noise = -scale * torch.sign(u) * torch.log1p(-2 * u.abs().clamp(max=0.5 - 1e-7))
    noisy = (pooled + noise).clamp(0, 1)
    return noisy.repeat_interleave(block, dim=-2).repeat_interleave(block, dim=-1)[..., :h, :w]


# -- Soteria: prune the representation layer's gradient where the input is most sensitive -------------------


def soteria_scores(
    representation: Callable[[Tensor], Tensor], inputs: Tensor, *, eps: float, chunk: int = 256
) -> Tensor:
    """Soteria's per-feature score ``sum_i ||d r_f(x_i) / d x_i|| / (r_f(x_i) + eps)`` (Sun et al. 2021), the
    practical stand-in for ``||r_f (d r_f / d x)^-1||``: perturbing a feature with a small score moves the input
    a reconstruction must explain the most, so those features' gradient entries are pruned.

    ``representation`` maps a batch (B, ...) to features (B, D). Exact: one vector-Jacobian product per feature
    and sample, ``chunk`` features at a time (batched with ``torch.func``), so it costs D backward passes.
    """
    from torch.func import vjp, vmap

    total = None
    for i in range(inputs.shape[0]):
        features, pull = vjp(representation, inputs[i : i + 1])
        d = features.shape[1]
        norms = []
        for lo in range(0, d, chunk):
            basis = torch.eye(d, dtype=features.dtype, device=features.device)[lo : lo + chunk].unsqueeze(1)
            (rows,) = vmap(pull)(basis)
            norms.append(rows.flatten(1).norm(dim=1))
        score = torch.cat(norms) / (features.detach()[0] + eps)
        total = score if total is None else total + score
    return total


def soteria_mask(scores: Tensor, fraction: float) -> Tensor:
    """Keep-mask over features: drop the ``fraction`` whose scores are smallest in magnitude."""
    drop = int(round(fraction * scores.numel()))
    mask = torch.ones_like(scores, dtype=torch.bool)
    if drop > 0:
        mask[scores.abs().argsort(stable=True)[:drop]] = False
    return mask
