"""The Bayes-optimal gradient-leakage adversary, approximated (Balunović, Dimitrov, Staab, Vechev, ICLR 2022,
"Bayesian Framework for Gradient Leakage").

The paper's adversary returns the input of highest posterior, ``argmax_x log p(g_obs | x) + log p(x)``: the
distribution of the shared update given the input (the defense, which the server knows as protocol metadata)
and a prior on inputs. Existing attacks are that adversary under assumptions they leave implicit (Euclidean
matching is Gaussian noise of unit variance and no prior); stating the defense's distribution gives the
attack the defense calls for. Following the paper, the approximation is gradient descent on the negative log
posterior from a random start (Adam, the box of valid images; the authors' code also uses Adam).

The likelihood is built from ``Observation.defenses`` (update defenses, in the order they act; see
:func:`defense_channel`):

- ``noise`` (Gaussian, std ``sigma`` per entry, absolute): ``||g(x) - g_obs||^2 / (2 sigma^2)``; Laplace noise of
  the same std has scale ``b = sigma / sqrt(2)``: ``||g(x) - g_obs||_1 / b`` (the paper's two cases). Several
  clients' noisy updates are averaged by secure aggregation, so the noise std of the mean is
  ``sigma * sqrt(sum_k (n_k / N)^2)`` (Gaussian by the central limit for Laplace). Clipping before the noise
  is replayed on the candidate (one client: clipping is a function of the update the server can evaluate).
- ``dpsgd``: Gaussian noise of std ``noise_multiplier * C / n`` on a client's mean gradient (FedSGD; FedAvg
  adds ``lr`` times that at each of its local steps); per-sample clipping is replayed when the one client holds
  one sample under FedSGD (its gradient is the update), and otherwise left out.
- ``prune``: the server sees which entries were zeroed, so, when no noise comes after, only the sent entries
  are compared (the engine's adaptive mask) and the zeroed ones constrain nothing; when noise comes after, the
  candidate's own update is pruned the same way before the noise likelihood (the exact forward model).
- ``sign``: a likelihood of the observed signs ``s``: with noise before the compression the exact probit
  ``-sum log Phi(s * g(x) / sigma)``; without, a smooth surrogate ``sum softplus(-s * g(x) / (tau * mean|g(x)|))``
  (``sign_temperature`` = tau, scale-free as signs are), plus, when the sign is scaled, the squared log-ratio of
  each tensor's mean magnitude to the observed one, per entry.
- any other defense (data or model defenses, Soteria before noise...) is not modelled: it is listed in the
  reconstruction's ``extras["unmodelled"]``.
- no noise at all (no defense, or only pruning that the server sees exactly): the update is exact, the
  posterior sits on the inputs whose update matches and the prior only breaks ties (the noise-free limit), so
  the attack matches with the plain ``objective`` (Euclidean by default) and no image prior, and says so in
  ``extras["likelihood"]``.

Prior: the paper's image prior is total variation; its code uses the sum of squared neighbour differences of
the normalised input (a Gaussian Markov random field, ``image_prior="tv_squared"``, weight 1 as the authors'
MNIST scripts), the default here; ``"tv"`` is the sum of absolute differences (a Laplace field). The prior is a
log density: summed over pixels, not averaged, so its weight does not depend on the image size, and it is
weighed against a likelihood in nats. ``noise_model=False`` keeps the prior and the optimiser and replaces the
likelihood by the plain ``objective``: the ablation the benchmark ``bench/bayesian.py`` runs.

Threat model: honest-but-curious server that knows the input shape, the number of samples, the normalisation
(box and prior) and the client's defenses and their parameters (public protocol metadata).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from gradinv._settings import above, at_least, one_of
from gradinv.attacks.base import AttackOutput, Callback, register_attack
from gradinv.attacks.components.engine import MatchingSettings
from gradinv.attacks.components.objectives import OBJECTIVES, Distance, Objective
from gradinv.attacks.components.priors import Prior, build_priors, combine_priors
from gradinv.attacks.matching import GradientMatchingAttack
from gradinv.fl.protocols import FedAvg, FedSGD, client_slices
from gradinv.types import Observation

IMAGE_PRIORS = ("tv_squared", "tv", "none")
LIKELIHOODS = ("gaussian", "laplace", "sign", "probit_sign", "none")


@dataclass(frozen=True)
class Channel:
    """How the observed update arises from the candidate's: ``transforms`` (``("clip", C)``, ``("prune",
    fraction)``) applied in order to the candidate's update, then the ``likelihood`` with its ``scale`` (the
    noise std for ``gaussian`` and ``probit_sign``, the Laplace scale b for ``laplace``); ``scaled_sign``: the
    sign compression also sends each tensor's mean magnitude; ``unmodelled``: what the channel leaves out."""

    likelihood: str = "none"
    scale: float = 0.0
    transforms: tuple[tuple[str, float], ...] = ()
    scaled_sign: bool = False
    unmodelled: tuple[str, ...] = ()

    def describe(self) -> str:
        """One line: the likelihood, its scale and the transforms replayed on the candidate."""
        if self.likelihood == "none":
            text = "none"
        elif self.likelihood == "sign":
            text = "sign (smooth surrogate)" + (", scaled" if self.scaled_sign else "")
        else:
            text = f"{self.likelihood} (scale {self.scale:.4g})"
        if self.transforms:
            text += " after " + ", ".join(f"{k}:{v:g}" for k, v in self.transforms)
        return text


def _client_sizes(observation: Observation) -> list[int]:
    n = int(observation.knowledge.num_samples or observation.clients)
    return [s.stop - s.start for s in client_slices(n, observation.clients)]


def _dpsgd_std(defense: object, observation: Observation, sizes: Sequence[int]) -> float:
    """The std of DP-SGD's noise on the aggregated update (independent noise per client and per local step)."""
    s = defense.settings
    total = sum(sizes)
    protocol = observation.protocol
    variance = 0.0
    for n in sizes:
        if isinstance(protocol, FedAvg):
            b = protocol.local_batch_size or n
            per_client = protocol.lr * s.noise_multiplier * s.clip * math.sqrt(protocol.local_steps) / b
        else:
            per_client = s.noise_multiplier * s.clip / n
        variance += (n / total) ** 2 * per_client**2
    return math.sqrt(variance)


def defense_channel(observation: Observation) -> Channel:
    """The distribution of the observed update given the candidate's, read from ``observation.defenses``."""
    sizes = _client_sizes(observation)
    total, clients = sum(sizes), observation.clients
    spread = math.sqrt(sum((n / total) ** 2 for n in sizes))  # std factor of the weighted mean of client noises
    updates = [d for d in observation.defenses if d.stage == "update"]
    unmodelled = [f"{d.name} ({d.stage} defense)" for d in observation.defenses if d.stage != "update"]
    noisy_at = [
        i
        for i, d in enumerate(updates)
        if (d.name == "noise" and d.settings.std > 0) or (d.name == "dpsgd" and d.settings.noise_multiplier > 0)
    ]
    last_noise = noisy_at[-1] if noisy_at else -1
    likelihood, variance, laplace_b = "none", 0.0, 0.0
    transforms: list[tuple[str, float]] = []
    scaled_sign = False
    for i, d in enumerate(updates):
        s = getattr(d, "settings", None)
        if d.name == "noise":
            if s.clip is not None:
                if clients == 1 and likelihood == "none":
                    transforms.append(("clip", float(s.clip)))
                else:
                    unmodelled.append("noise's clipping (per client, or after earlier noise)")
            if s.std > 0:
                if s.distribution == "laplace" and clients == 1 and likelihood == "none":
                    likelihood, laplace_b = "laplace", s.std / math.sqrt(2.0)
                else:  # a sum of noises (or a mean over clients) is taken as Gaussian of the summed variance
                    variance += 2 * laplace_b**2 + (s.std * spread) ** 2
                    likelihood, laplace_b = "gaussian", 0.0
        elif d.name == "dpsgd":
            if isinstance(observation.protocol, FedSGD) and sizes == [1]:
                transforms.append(("clip", float(s.clip)))  # one sample per client: its gradient is the update
            else:
                unmodelled.append("dpsgd's per-sample clipping")
            std = _dpsgd_std(d, observation, sizes)
            if std > 0:
                variance += 2 * laplace_b**2 + std**2
                likelihood, laplace_b = "gaussian", 0.0
        elif d.name == "prune":
            if i < last_noise:
                if clients == 1:
                    transforms.append(("prune", float(s.fraction)))
                else:
                    unmodelled.append("prune before noise with several clients")
            # after every noise: the zeros are seen exactly; the engine's adaptive mask compares the sent entries
        elif d.name == "sign" and i == len(updates) - 1 and clients == 1:
            scaled_sign = bool(s.scaled)
            if likelihood == "none":
                likelihood = "sign"
            else:  # noise, then sign: P(sign(g + n) = s) = Phi(s g / sigma)
                variance += 2 * laplace_b**2
                likelihood, laplace_b = "probit_sign", 0.0
        elif d.name == "soteria" and i > last_noise:
            pass  # zeros seen exactly: the engine's adaptive mask
        else:
            unmodelled.append(d.name)
    scale = laplace_b if likelihood == "laplace" else math.sqrt(variance)
    if likelihood in ("gaussian", "probit_sign") and scale == 0:
        likelihood = "none"
    return Channel(
        likelihood=likelihood,
        scale=scale,
        transforms=tuple(transforms),
        scaled_sign=scaled_sign,
        unmodelled=tuple(unmodelled),
    )


def _transform(candidate: Mapping[str, Tensor], transforms: Sequence[tuple[str, float]]) -> dict[str, Tensor]:
    """The candidate's update after the defense's deterministic steps (pure, ``vmap``-able)."""
    out = dict(candidate)
    for kind, value in transforms:
        if kind == "clip":
            norm = torch.sqrt(sum(t.pow(2).sum() for t in out.values()))
            factor = torch.clamp(value / norm.clamp_min(1e-12), max=1.0)
            out = {k: t * factor for k, t in out.items()}
        elif kind == "prune":
            pruned = {}
            for k, t in out.items():
                keep = t.numel() - int(round(value * t.numel()))
                if keep >= t.numel():
                    pruned[k] = t
                    continue
                flat = t.detach().abs().flatten()
                threshold = torch.topk(flat, max(keep, 1)).values[-1] if keep > 0 else flat.max() + 1
                pruned[k] = t * (t.detach().abs() >= threshold).to(t.dtype)
            out = pruned
    return out


def _log_normal_cdf(z: Tensor) -> Tensor:
    """``log Phi(z)``, stable in both tails and ``vmap``-friendly (``torch.special.log_ndtr`` has no batching
    rule): the exact value above -8, the asymptotic series ``-z^2/2 - log(-z) - log(2 pi)/2 + log(1 - 1/z^2 +
    3/z^4)`` below (error under 1e-4)."""
    near = torch.log(0.5 * torch.erfc(-z.clamp(min=-8.0) / math.sqrt(2.0)))
    far_z = z.clamp(max=-8.0)
    inv = far_z.pow(-2)
    far = -far_z.pow(2) / 2 - torch.log(-far_z) - 0.5 * math.log(2 * math.pi) + torch.log1p(-inv + 3 * inv.pow(2))
    return torch.where(z > -8.0, near, far)


def channel_objective(channel: Channel, *, temperature: float = 1.0) -> Objective:
    """The negative log-likelihood of the observed update given the candidate's, under ``channel`` (up to a
    constant), as an engine objective ``objective(target, *, weights=None) -> distance``."""
    kind, scale = channel.likelihood, channel.scale

    def objective(target: Mapping[str, Tensor], *, weights: Mapping[str, float] | None = None) -> Distance:
        w = {k: 1.0 if weights is None else float(weights.get(k, 1.0)) for k in target}
        keys = [k for k in target if w[k]]
        signs = {k: torch.sign(target[k]) for k in keys}
        sent = {k: (signs[k] != 0).to(target[k].dtype) for k in keys}
        magnitude = {k: target[k].abs().amax() for k in keys}

        def distance(candidate: Mapping[str, Tensor]) -> Tensor:
            c = _transform(candidate, channel.transforms)
            terms = []
            for k in keys:
                if kind == "gaussian":
                    term = (c[k] - target[k]).pow(2).sum() / (2 * scale**2)
                elif kind == "laplace":
                    term = (c[k] - target[k]).abs().sum() / scale
                elif kind == "probit_sign":
                    term = -(_log_normal_cdf(signs[k] * c[k] / scale) * sent[k]).sum()
                else:  # sign, no noise: a smooth surrogate, scale-free
                    mean = c[k].abs().mean().clamp_min(1e-30)
                    term = (F.softplus(-signs[k] * c[k] / (temperature * mean)) * sent[k]).sum()
                    if channel.scaled_sign:
                        ratio = torch.log(mean) - torch.log(magnitude[k].clamp_min(1e-30))
                        term = term + c[k].numel() * ratio.pow(2) / 2
                terms.append(w[k] * term)
            return sum(terms)

        return distance

    return objective


def image_log_prior(kind: str) -> Callable[[Tensor], Tensor] | None:
    """``-log p(x)`` up to a constant for a candidate batch (..., H, W): ``tv_squared`` (sum of squared
    neighbour differences, the authors' code) or ``tv`` (sum of absolute differences); None for ``none``."""
    if kind == "none":
        return None
    power = 2 if kind == "tv_squared" else 1

    def energy(x: Tensor) -> Tensor:
        dx = (x[..., :, 1:] - x[..., :, :-1]).abs().pow(power).sum()
        dy = (x[..., 1:, :] - x[..., :-1, :]).abs().pow(power).sum()
        return dx + dy

    return energy


@dataclass(frozen=True)
class BayesianSettings(MatchingSettings):
    """The approximate Bayes-optimal adversary: the defense's likelihood (``noise_model``), an image prior
    (``image_prior`` with weight ``prior_weight``, a log density of the normalised input), Adam on the
    posterior from a Gaussian start, box of valid images. ``objective``: the plain distance used when no
    defense is modelled or ``noise_model=False``; ``sign_temperature``: width of the smooth sign likelihood
    relative to each tensor's mean magnitude."""

    iterations: int = 1000
    init: str = "gaussian"
    objective: str = "euclidean"
    noise_model: bool = True
    image_prior: str = "tv_squared"
    prior_weight: float = 1.0
    sign_temperature: float = 1.0
    optimizer: str = "adam"
    lr: float = 0.1
    schedule: str = "cosine"

    def problems(self) -> list[str]:
        return [
            *super().problems(),
            *one_of("image_prior", self.image_prior, IMAGE_PRIORS),
            *at_least("prior_weight", self.prior_weight, 0),
            *above("sign_temperature", self.sign_temperature, 0),
        ]


@register_attack
class BayesianAttack(GradientMatchingAttack):
    name = "bayesian"
    summary = "Bayes-optimal adversary (Balunovic et al. 2022): the defense's likelihood + image prior, Adam"
    Settings = BayesianSettings
    table1 = {
        "initialisation": "Gaussian",
        "objective": "negative log-likelihood of the defended update (Gaussian: weighted L2, Laplace: L1, sign)",
        "optimiser": "Adam, box",
        "priors": "image prior (squared or absolute total variation) as a log density",
    }

    def channel(self, observation: Observation) -> Channel:
        """The defense's distribution this attack uses (``likelihood="none"`` when ``noise_model`` is off)."""
        if not self.settings.noise_model:
            return Channel(unmodelled=("noise model switched off",))
        return defense_channel(observation)

    def _objective(self, observation: Observation) -> Objective:
        channel = self.channel(observation)
        if channel.likelihood == "none":
            return OBJECTIVES[self.settings.objective]
        return channel_objective(channel, temperature=self.settings.sign_temperature)

    def _prior(self, observation: Observation, labels: Tensor) -> Prior | None:
        s = self.settings
        engine = build_priors(observation, labels, {"tv": s.tv, "l2": s.l2, "bn": s.bn, "label": s.label})
        exact = s.noise_model and self.channel(observation).likelihood == "none"  # an exact update needs no prior
        return combine_priors((1.0, engine), (0.0 if exact else s.prior_weight, image_log_prior(s.image_prior)))

    def _reconstruct(
        self,
        observation: Observation,
        *,
        generator: torch.Generator,
        progress: bool,
        callback: Callback | None,
    ) -> AttackOutput:
        out = super()._reconstruct(observation, generator=generator, progress=progress, callback=callback)
        channel = self.channel(observation)
        likelihood = channel.describe()
        if channel.likelihood == "none":
            prior = "the image prior" if not self.settings.noise_model else "no image prior (exact update)"
            likelihood = f"none: plain {self.settings.objective} with {prior}"
        extras = {
            **out.extras,
            "likelihood": likelihood,
            "noise_scale": channel.scale,
            "unmodelled": list(channel.unmodelled),
        }
        return dataclasses.replace(out, extras=extras)
