"""A small image generator for generative-prior attacks (GIAS, Jeon et al., NeurIPS 2021), trained offline on
the bundled digits.

GIAS needs a generator ``G: z -> x`` trained on the client's data distribution. gradinv ships no weights and
reaches no network, so it ships the code that trains one on scikit-learn's digits, on a fixed *training split*;
the complementary *held-out split* is what an honest evaluation attacks (images the generator never saw).

Method: the generator is the decoder of a variational auto-encoder (Kingma & Welling, ICLR 2014) with a
DCGAN-style decoder (Radford et al., ICLR 2016: a linear layer to a 4x4 map, then stride-2 transposed
convolutions, no BatchNorm). Chosen over adversarial training because it is stable and quick on a CPU (no
generator/discriminator balance to tune, the same seed always gives the same weights; measured on one CPU
thread: ~10 s at 16x16, ~40 s at 32x32), and because its latent prior is the standard normal that the attack's
latent search starts from and regularises towards. The digits are grey: a generator for 3-channel inputs repeats
its grey channel (3-channel digits are grey images repeated), so one set of weights serves both.

The first call of :func:`digits_generator` trains and writes the weights (safetensors) under
:func:`generator_cache_dir`, keyed by the training settings and a fingerprint of the training images; later
calls load them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gradinv._atomic import atomic_path
from gradinv._settings import above, at_least
from gradinv.errors import ConfigError, ShapeError

#: bumped when the architecture or the training code changes, so stale cached weights are never loaded
GENERATOR_VERSION = 1
#: image sides the digits generator is built for (a 4x4 map doubled 1, 2, 3 or 4 times)
GENERATOR_SIZES = (8, 16, 32, 64)


class DigitsGenerator(nn.Module):
    """DCGAN-style decoder ``z (B, latent_dim) -> images (B, channels, size, size)`` in [0, 1] (sigmoid output).

    ``channels=3`` repeats the grey channel (the weights are those of the grey generator).
    """

    #: the range of the outputs: images in [0, 1] (an attack maps them to the model's normalised input space)
    output_range = "unit"

    def __init__(self, *, latent_dim: int = 16, image_size: int = 16, channels: int = 1, width: int = 16) -> None:
        super().__init__()
        if image_size not in GENERATOR_SIZES:
            raise ShapeError(
                f"the digits generator makes images of side {', '.join(map(str, GENERATOR_SIZES))}, "
                f"got {image_size}: pick one of those sizes"
            )
        if channels not in (1, 3):
            raise ConfigError(f"the digits generator makes 1 or 3 channels, got {channels}")
        if latent_dim < 1 or width < 1:
            raise ConfigError(f"latent_dim and width must be positive, got {latent_dim} and {width}")
        self.latent_dim, self.image_size, self.channels, self.width = latent_dim, image_size, channels, width
        self.fc = nn.Linear(latent_dim, 2 * width * 16)
        ups = int(math.log2(image_size // 4))
        layers: list[nn.Module] = []
        c = 2 * width
        for i in range(ups):
            out = width if i < ups - 1 else width // 2 or 1
            layers += [nn.ConvTranspose2d(c, out, kernel_size=4, stride=2, padding=1), nn.LeakyReLU(0.2)]
            c = out
        layers.append(nn.Conv2d(c, 1, kernel_size=3, padding=1))
        self.body = nn.Sequential(*layers)

    def forward(self, z: Tensor) -> Tensor:
        h = F.leaky_relu(self.fc(z), 0.2).view(z.shape[0], 2 * self.width, 4, 4)
        x = torch.sigmoid(self.body(h))
        return x.expand(-1, self.channels, -1, -1) if self.channels > 1 else x

    def extra_repr(self) -> str:
        return f"latent_dim={self.latent_dim}, image_size={self.image_size}, channels={self.channels}"


class _Encoder(nn.Module):
    """The VAE's encoder: stride-2 convolutions down to 4x4, then the Gaussian posterior's mean and log-variance."""

    def __init__(self, *, latent_dim: int, image_size: int, width: int) -> None:
        super().__init__()
        downs = int(math.log2(image_size // 4))
        layers: list[nn.Module] = []
        c = 1
        for i in range(downs):
            out = width if i < downs - 1 else 2 * width
            layers += [nn.Conv2d(c, out, kernel_size=4, stride=2, padding=1), nn.LeakyReLU(0.2)]
            c = out
        self.body = nn.Sequential(*layers, nn.Flatten())
        self.head = nn.Linear(c * 16, 2 * latent_dim)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        mean, log_var = self.head(self.body(x)).chunk(2, dim=1)
        return mean, log_var.clamp(-10, 10)


@dataclass(frozen=True)
class GeneratorTraining:
    """How the digits generator is trained (every field is part of the cache key).

    A VAE (Kingma & Welling 2014) with a Bernoulli likelihood (per-pixel binary cross-entropy, summed) and
    ``beta`` times the KL divergence to N(0, I) (beta-VAE, Higgins et al. 2017; 1 is the plain VAE, whose decoder
    was blurrier here: held-out digits fitted through its latent reached ~27 dB against ~29 dB at 0.25), Adam at
    ``lr`` with a cosine decay over ``steps`` mini-batches of ``batch_size``, on the training split of the digits:
    a seeded permutation of the 1,797 images with the last ``held_out`` fraction kept out (:func:`digits_split`).
    """

    image_size: int = 16
    latent_dim: int = 16
    width: int = 16
    steps: int = 1500
    batch_size: int = 64
    lr: float = 2e-3
    beta: float = 0.25
    seed: int = 0
    held_out: float = 0.2
    split_seed: int = 0

    def problems(self) -> list[str]:
        return [
            *([] if self.image_size in GENERATOR_SIZES else [f"image_size must be one of {GENERATOR_SIZES}"]),
            *at_least("latent_dim", self.latent_dim, 1),
            *at_least("width", self.width, 2),
            *at_least("steps", self.steps, 1),
            *at_least("batch_size", self.batch_size, 1),
            *above("lr", self.lr, 0),
            *at_least("beta", self.beta, 0),
            *([] if 0 < self.held_out < 1 else [f"held_out must lie in (0, 1), got {self.held_out!r}"]),
        ]

    def check(self) -> None:
        problems = self.problems()
        if problems:
            raise ConfigError(f"generator training: {'; '.join(problems)}")


def digits_split(n: int, *, held_out: float = 0.2, seed: int = 0) -> tuple[Tensor, Tensor]:
    """``(train, held_out)`` index tensors of a data set of ``n`` images: a seeded permutation, its last
    ``held_out`` fraction (at least one image) held out. The same ``n``, fraction and seed always give the same
    split, whatever the image size or channels the images were loaded at."""
    if not 0 < held_out < 1:
        raise ConfigError(f"held_out must lie in (0, 1), got {held_out!r}")
    if n < 2:
        raise ConfigError(f"a split needs at least 2 images, got {n}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))
    keep = max(1, min(n - 1, round(n * held_out)))
    return order[: n - keep].sort().values, order[n - keep :].sort().values


def generator_cache_dir() -> Path:
    """Where trained generators are kept: ``$GRADINV_CACHE/generators`` or ``~/.cache/gradinv/generators``."""
    root = os.environ.get("GRADINV_CACHE")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "gradinv"
    return base / "generators"


def _digits_training_images(training: GeneratorTraining) -> Tensor:
    from gradinv.data import load_dataset

    ds = load_dataset("digits", image_size=training.image_size, channels=1)
    train, _ = digits_split(len(ds), held_out=training.held_out, seed=training.split_seed)
    return ds.images[train]


def _cache_key(training: GeneratorTraining, images: Tensor) -> str:
    fingerprint = hashlib.sha256(images.detach().cpu().contiguous().numpy().tobytes()).hexdigest()
    spec = {"version": GENERATOR_VERSION, "method": "vae", **dataclasses.asdict(training), "data": fingerprint}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def train_generator(
    images: Tensor, *, training: GeneratorTraining | None = None, progress: bool = False
) -> tuple[DigitsGenerator, dict[str, float]]:
    """Train a :class:`DigitsGenerator` (grey, ``training.image_size``) as the decoder of a VAE on ``images``
    ((N, 1, S, S) in [0, 1]); returns it (eval mode) and a record (final losses, seconds).

    All randomness (initial weights, batches, the reparameterisation noise) comes from ``training.seed``; the
    global RNG is left as it was."""
    t = training or GeneratorTraining()
    t.check()
    if images.dim() != 4 or images.shape[1] != 1 or tuple(images.shape[-2:]) != (t.image_size, t.image_size):
        raise ShapeError(
            f"train_generator takes (N, 1, {t.image_size}, {t.image_size}) grey images, got {tuple(images.shape)}"
        )
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(t.seed)
        decoder = DigitsGenerator(latent_dim=t.latent_dim, image_size=t.image_size, width=t.width)
        encoder = _Encoder(latent_dim=t.latent_dim, image_size=t.image_size, width=t.width)
    generator = torch.Generator().manual_seed(t.seed)
    params = [*decoder.parameters(), *encoder.parameters()]
    optimizer = torch.optim.Adam(params, lr=t.lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda i: 0.5 * (1 + math.cos(math.pi * min(i, t.steps) / t.steps))
    )
    x_all = images.detach().to(torch.float32).clamp(0, 1)
    n, batch = x_all.shape[0], min(t.batch_size, x_all.shape[0])
    order = torch.empty(0, dtype=torch.long)
    recon = kl = float("nan")
    decoder.train()
    encoder.train()
    for step in range(t.steps):
        if order.numel() < batch:
            order = torch.cat([order, torch.randperm(n, generator=generator)])
        idx, order = order[:batch], order[batch:]
        x = x_all[idx]
        mean, log_var = encoder(x)
        z = mean + (0.5 * log_var).exp() * torch.randn(mean.shape, generator=generator)
        logits_x = decoder(z).clamp(1e-6, 1 - 1e-6)
        rec = F.binary_cross_entropy(logits_x, x, reduction="sum") / batch
        div = 0.5 * (mean.pow(2) + log_var.exp() - 1 - log_var).sum() / batch
        loss = rec + t.beta * div
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 10.0)
        optimizer.step()
        schedule.step()
        recon, kl = float(rec.detach()), float(div.detach())
        if progress and (step % 500 == 0 or step == t.steps - 1):
            print(f"generator step {step}: reconstruction {recon:.2f}, KL {kl:.2f}", flush=True)
    decoder.eval()
    for p in decoder.parameters():
        p.requires_grad_(False)
    return decoder, {"reconstruction": recon, "kl": kl, "seconds": time.perf_counter() - start}


def digits_generator(
    *,
    image_size: int = 16,
    channels: int = 1,
    training: GeneratorTraining | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = False,
) -> DigitsGenerator:
    """The digits generator for ``image_size`` px, ``channels``-channel images, trained on the digits' training
    split (:class:`GeneratorTraining`, whose ``image_size`` this call's replaces) on first use and cached.

    The weights are stored as safetensors under ``cache_dir`` (default :func:`generator_cache_dir`) in a file
    named by a hash of the training settings and of the training images; a later call with the same settings
    loads them instead of training. Returns the generator in eval mode with gradients off for its parameters.
    """
    from safetensors.torch import load_file, save_file

    t = dataclasses.replace(training or GeneratorTraining(), image_size=image_size)
    t.check()
    if channels not in (1, 3):
        raise ConfigError(f"the digits generator makes 1 or 3 channels, got {channels}")
    images = _digits_training_images(t)
    folder = Path(cache_dir).expanduser() if cache_dir is not None else generator_cache_dir()
    path = folder / f"digits-vae-{image_size}px-{_cache_key(t, images)}.safetensors"
    model = DigitsGenerator(latent_dim=t.latent_dim, image_size=image_size, channels=channels, width=t.width)
    if path.is_file():
        model.load_state_dict(load_file(path))
    else:
        trained, record = train_generator(images, training=t, progress=progress)
        state = {k: v.contiguous() for k, v in trained.state_dict().items()}
        meta = {"training": json.dumps(dataclasses.asdict(t)), "record": json.dumps(record)}
        with atomic_path(path) as tmp:
            save_file(state, str(tmp), metadata=meta)
        model.load_state_dict(state)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


__all__ = [
    "GENERATOR_SIZES",
    "DigitsGenerator",
    "GeneratorTraining",
    "digits_generator",
    "digits_split",
    "generator_cache_dir",
    "train_generator",
]
