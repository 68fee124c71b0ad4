"""Defenses on the shared update: additive noise, DP-SGD, pruning, sign compression (survey Table 2,
"Shared Gradients")."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from gradinv.defenses import functional as D
from gradinv.defenses.base import ClientState, UpdateDefense, check_setting, register_defense
from gradinv.errors import ConfigError
from gradinv.fl.protocols import FedSGD, Protocol
from gradinv.memory import check_allocation, format_bytes
from gradinv.registry import OMIT_DEFAULT, integration


@dataclass(frozen=True)
class NoiseSettings:
    """``std``: noise standard deviation per entry; ``clip``: clip the update's global L2 norm to this first
    (None: no clipping); ``distribution``: "gaussian" or "laplace"."""

    std: float = 1e-2
    clip: float | None = None
    distribution: str = "gaussian"

    def __post_init__(self) -> None:
        check_setting(self.std >= 0, f"noise std must be >= 0, got {self.std}")
        check_setting(self.clip is None or self.clip > 0, f"noise clip must be > 0 or None, got {self.clip}")
        check_setting(
            self.distribution in ("gaussian", "laplace"),
            f"noise distribution must be 'gaussian' or 'laplace', got {self.distribution!r}",
        )


@register_defense
class Noise(UpdateDefense):
    """Additive noise on the update, optionally after norm clipping: the differential-privacy defense of the
    gradient-inversion literature (Zhu et al. 2019; Wei et al. 2020; Geiping et al. 2020), ``std`` absolute."""

    name = "noise"
    summary = "Gaussian or Laplace noise on the update, optional L2 clipping first (Zhu et al. 2019; Wei et al. 2020)"
    Settings = NoiseSettings
    primary = "std"

    def transform(
        self, update: Mapping[str, Tensor], *, client: ClientState, generator: torch.Generator
    ) -> dict[str, Tensor]:
        s = self.settings
        clipped = dict(update) if s.clip is None else D.clip_update(update, s.clip)
        return D.add_noise(clipped, std=s.std, generator=generator, distribution=s.distribution)


#: who computes DP-SGD's steps: gradinv's own ``torch.func`` code or Opacus (:mod:`gradinv.integrations.opacus`)
DPSGD_BACKENDS = ("gradinv", "opacus")


@dataclass(frozen=True)
class DPSGDSettings:
    """``clip``: per-sample gradient L2 bound C; ``noise_multiplier``: sigma (noise std sigma * C on the sum);
    ``delta``: the delta at which ``epsilon()`` is reported; ``backend``: who computes each step, ``"gradinv"``
    (``torch.func``) or ``"opacus"`` (Opacus' GradSampleModule and DPOptimizer, ``pip install gradinv[opacus]``)."""

    noise_multiplier: float = 1.0
    clip: float = 1.0
    delta: float = 1e-5
    backend: str = field(default="gradinv", metadata={OMIT_DEFAULT: True})

    def __post_init__(self) -> None:
        check_setting(self.noise_multiplier >= 0, f"dpsgd noise_multiplier must be >= 0, got {self.noise_multiplier}")
        check_setting(self.clip > 0, f"dpsgd clip must be > 0, got {self.clip}")
        check_setting(0 < self.delta < 1, f"dpsgd delta must be in (0, 1), got {self.delta}")
        check_setting(
            self.backend in DPSGD_BACKENDS,
            f"dpsgd backend must be one of {', '.join(DPSGD_BACKENDS)}, got {self.backend!r}",
        )


#: Bytes of per-sample gradients DP-SGD holds at once: a larger batch is processed in chunks of samples. A
#: fixed size, so that the numbers (the order of the sums) do not depend on the machine.
PER_SAMPLE_CHUNK_BYTES = 512 * 2**20


def local_batch_index(step: int, local_batch_size: int, num_samples: int) -> Tensor:
    """The samples of FedAvg's local step ``step``: ``[step*b, (step+1)*b)`` modulo ``n``, as
    :func:`gradinv.fl.protocols.client_update` takes them (a sample appears several times in one step when
    ``b > n``)."""
    return torch.arange(step * local_batch_size, (step + 1) * local_batch_size) % num_samples


def local_uses(protocol: Protocol, num_samples: int) -> int:
    """The privacy cost of the client's training for its busiest sample, in Gaussian mechanisms of
    sensitivity C: ``max_i sum_t m_it^2``, where ``m_it`` counts the times sample ``i`` appears in the batch of
    gradient step ``t``.

    A step that holds a sample ``m`` times adds ``m`` clipped copies of its gradient to the noisy sum, so its
    sensitivity is ``m C`` and, under noise ``sigma C``, it is ``(m / sigma)``-GDP; the steps compose to
    ``mu = sqrt(sum_t m_t^2) / sigma`` (Dong, Roth & Su 2022), the same as ``sum_t m_t^2`` steps of
    sensitivity C. That is 1 for FedSGD, and ``ceil(K * b / n)`` for FedAvg when the local batch ``b`` is at
    most the client's ``n`` samples (each step holds a sample at most once); a local batch larger than ``n``
    repeats samples inside a step and costs more."""
    if isinstance(protocol, FedSGD):
        return 1
    n = int(num_samples)
    if n < 1:
        raise ConfigError(f"dpsgd needs at least one sample on the client, got {num_samples}")
    b = protocol.local_batch_size or n
    if b <= n:
        return math.ceil(protocol.local_steps * b / n)
    squares = torch.zeros(n, dtype=torch.int64)
    for step in range(protocol.local_steps):
        squares += torch.bincount(local_batch_index(step, b, n), minlength=n).pow(2)
    return int(squares.max())


@register_defense
class DPSGD(UpdateDefense):
    """DP-SGD (Abadi et al. 2016) as the client's training: in each gradient step every sample's gradient is
    clipped to L2 norm C, the clipped gradients are summed, Gaussian noise of std sigma * C is added and the
    sum is divided by the batch size. Under FedSGD that step is the update; under FedAvg the client takes its
    K local steps this way (DP-FedAvg with local DP-SGD) and shares the weight delta. Each step is a Gaussian
    mechanism; :meth:`epsilon` composes those a sample takes part in. ``backend="opacus"`` has Opacus compute
    each step (:func:`gradinv.integrations.opacus.opacus_private_gradient`) on the same local batches."""

    name = "dpsgd"
    summary = "DP-SGD: per-sample clipping + Gaussian noise, with its (epsilon, delta) (Abadi et al. 2016)"
    Settings = DPSGDSettings
    primary = "noise_multiplier"
    retrains = True

    def epsilon(self, *, rounds: int = 1) -> float:
        """The epsilon at ``delta`` of ``rounds`` noisy steps over the same sample (no subsampling)."""
        if self.settings.noise_multiplier == 0:
            return math.inf
        return D.gaussian_epsilon(self.settings.noise_multiplier, delta=self.settings.delta, rounds=rounds)

    def private_gradient(
        self, client: ClientState, params: Mapping[str, Tensor], x: Tensor, y: Tensor, generator: torch.Generator
    ) -> dict[str, Tensor]:
        """One DP-SGD gradient of the batch ``(x, y)`` at ``params``: clipped per-sample gradients, summed,
        noised and averaged (by Opacus when ``backend="opacus"``)."""
        s = self.settings
        if s.backend == "opacus":
            return integration("opacus").opacus_private_gradient(
                client, params, x, y, noise_multiplier=s.noise_multiplier, clip=s.clip, generator=generator
            )

        def sample_loss(p: dict[str, Tensor], xi: Tensor, yi: Tensor) -> Tensor:
            out = functional_call(client.model, (p, dict(client.buffers)), (xi.unsqueeze(0),))
            return client.loss_fn(out, yi.unsqueeze(0))

        per_sample_grad = vmap(grad(sample_loss), in_dims=(None, 0, 0))
        batch = int(x.shape[0])
        sample_bytes = sum(v.numel() * v.element_size() for v in params.values())
        chunk = max(1, min(batch, PER_SAMPLE_CHUNK_BYTES // max(1, sample_bytes)))
        check_allocation(  # the chunk's per-sample gradients and their clipped copy, one tensor at a time
            chunk * sample_bytes + chunk * max(v.numel() * v.element_size() for v in params.values()),
            what=(
                f"dpsgd's per-sample gradients ({chunk:,} sample(s) at a time x "
                f"{format_bytes(sample_bytes)} of parameters)"
            ),
            fix=(
                "lower --batch-size (or --local-batch-size) or use a smaller model"
                if chunk == batch
                else "use a smaller model"
            ),
        )
        summed = {k: torch.zeros_like(v) for k, v in params.items()}
        for start in range(0, batch, chunk):  # clip and sum chunk by chunk: memory chunk x parameters
            try:
                per_sample = per_sample_grad(dict(params), x[start : start + chunk], y[start : start + chunk])
            except RuntimeError as exc:
                if "random" not in str(exc).lower():
                    raise
                raise ConfigError(
                    "dpsgd cannot take per-sample gradients through a random model defense (dropout)"
                ) from None
            norms = torch.sqrt(sum(g.flatten(1).pow(2).sum(dim=1) for g in per_sample.values()))
            factor = (s.clip / (norms + 1e-12)).clamp(max=1.0)
            for k, g in per_sample.items():
                summed[k] += (g * factor.view((-1,) + (1,) * (g.ndim - 1))).sum(dim=0)
            del per_sample
        out = {}
        for k, total in summed.items():
            noisy = D.add_noise({k: total}, std=s.noise_multiplier * s.clip, generator=generator)[k]
            out[k] = noisy / batch
        return out

    def transform(
        self, update: Mapping[str, Tensor], *, client: ClientState, generator: torch.Generator
    ) -> dict[str, Tensor]:
        if client.train_mode and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in client.model.modules()):
            raise ConfigError("dpsgd needs per-sample gradients, which train-mode BatchNorm does not have")
        x, y, protocol = client.batch.inputs, client.batch.targets, client.protocol
        params = {k: client.params[k] for k in update}
        if isinstance(protocol, FedSGD):
            return self.private_gradient(client, params, x, y, generator)
        n = x.shape[0]
        b = protocol.local_batch_size or n
        current = dict(params)
        for step in range(protocol.local_steps):  # the same local batches as the protocol's own loop
            idx = local_batch_index(step, b, n) if client.order is None else client.order[step * b : (step + 1) * b]
            g = self.private_gradient(client, current, x[idx], y[idx], generator)
            current = {k: current[k] - protocol.lr * g[k] for k in current}
        return {k: current[k] - params[k] for k in current}


@dataclass(frozen=True)
class PruneSettings:
    """``fraction``: share of each tensor's entries, smallest in magnitude first, set to zero."""

    fraction: float = 0.9

    def __post_init__(self) -> None:
        check_setting(0 <= self.fraction < 1, f"prune fraction must be in [0, 1), got {self.fraction}")


@register_defense
class Prune(UpdateDefense):
    """Gradient pruning / sparsification: the smallest-magnitude entries of each tensor become zero
    (Zhu et al. 2019, Sec. 5; the compression the survey cites after Vogels et al. 2019)."""

    name = "prune"
    summary = "zero the smallest-magnitude fraction of each update tensor (Zhu et al. 2019)"
    Settings = PruneSettings
    primary = "fraction"
    sparsifies = True

    def transform(
        self, update: Mapping[str, Tensor], *, client: ClientState, generator: torch.Generator
    ) -> dict[str, Tensor]:
        return D.prune_smallest(update, self.settings.fraction)

    def bytes_sent(self, update: Mapping[str, Tensor]) -> int:
        """The kept entries as float32 values plus where they are: a bitmap of the tensor or an int32 index per
        kept entry, whichever is smaller (the sparse encodings of Aji & Heafield 2017 and their successors)."""
        total = 0
        for v in update.values():
            n = int(v.numel())
            kept = n - max(0, int(round(self.settings.fraction * n)))  # as prune_smallest drops them
            total += 4 * kept + min(math.ceil(n / 8), 4 * kept)
        return total


@dataclass(frozen=True)
class SignSettings:
    """``scaled``: multiply each tensor's sign by its mean magnitude (EF-signSGD's compressor) or send +-1."""

    scaled: bool = True


@register_defense
class Sign(UpdateDefense):
    """Sign compression: only the signs of the update travel, scaled by each tensor's mean magnitude
    (signSGD; Karimireddy et al. 2019's scaled sign)."""

    name = "sign"
    summary = "send the update's signs, scaled by mean magnitude per tensor (Karimireddy et al. 2019)"
    Settings = SignSettings
    primary = "scaled"

    def transform(
        self, update: Mapping[str, Tensor], *, client: ClientState, generator: torch.Generator
    ) -> dict[str, Tensor]:
        return D.scaled_sign(update, scaled=self.settings.scaled)

    def bytes_sent(self, update: Mapping[str, Tensor]) -> int:
        """One bit per entry, plus each tensor's float32 scale when ``scaled``."""
        return sum(math.ceil(int(v.numel()) / 8) + (4 if self.settings.scaled else 0) for v in update.values())
