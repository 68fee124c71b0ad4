"""Brief SGD training, so attacks can target a trained state rather than a fresh initialisation.

Geiping et al. (2020) show that inverting gradients of a trained network is harder than of an
untrained one; ``--trained-steps`` uses this to reproduce that setting on bundled data.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from gradinv.errors import ConfigError, ShapeError


def _model_device(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    return torch.device("cpu")


GRAD_CLIP = 2.0  # keeps momentum SGD stable on every bundled model (the MLP on 3,072 raw pixels diverged)


def train_model(
    model: nn.Module,
    *,
    images: torch.Tensor,
    labels: torch.Tensor,
    steps: int,
    lr: float = 0.05,
    batch_size: int = 32,
    momentum: float = 0.9,
    seed: int = 0,
) -> list[float]:
    """Train ``model`` in place for ``steps`` SGD steps of cross-entropy and return the loss per step.

    ``images`` (N, C, H, W), already normalised, and integer ``labels`` (N,). Batches are drawn
    without replacement from a fresh permutation per epoch, using a private ``torch.Generator`` seeded
    with ``seed``; stochastic layers (dropout) use a forked global RNG seeded alike, so one seed gives
    one result and the global RNG is untouched. The model keeps its train/eval mode; ``steps=0`` does
    nothing.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ConfigError(f"steps must be a non-negative integer, got {steps!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
    if not lr > 0:
        raise ConfigError(f"lr must be positive, got {lr!r}")
    if not 0 <= momentum < 1:
        raise ConfigError(f"momentum must lie in [0, 1), got {momentum!r}")
    if labels.ndim != 1 or images.shape[0] != labels.shape[0] or images.shape[0] == 0:
        raise ShapeError(
            f"need N >= 1 images with N labels, got images {tuple(images.shape)} and labels {tuple(labels.shape)}"
        )
    if steps == 0:
        return []

    device = _model_device(model)
    images = images.to(device)
    labels = labels.to(device=device, dtype=torch.long)
    n = images.shape[0]
    batch = min(batch_size, n)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    order = torch.empty(0, dtype=torch.long)
    losses: list[float] = []
    was_training = model.training
    cuda_devices = (
        [device.index if device.index is not None else torch.cuda.current_device()] if (device.type == "cuda") else []
    )
    with torch.random.fork_rng(devices=cuda_devices):
        torch.random.default_generator.manual_seed(seed)
        if cuda_devices:
            torch.cuda.manual_seed(seed)
        model.train()
        try:
            for _ in range(steps):
                if order.numel() < batch:
                    order = torch.cat([order, torch.randperm(n, generator=generator)])
                idx, order = order[:batch], order[batch:]
                idx = idx.to(device)
                optimizer.zero_grad(set_to_none=True)
                loss = F.cross_entropy(model(images[idx]), labels[idx])
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=GRAD_CLIP)
                optimizer.step()
                losses.append(float(loss.detach()))
        finally:
            model.train(was_training)
            optimizer.zero_grad(set_to_none=True)
    return losses
