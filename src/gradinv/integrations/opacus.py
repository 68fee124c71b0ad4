"""Opacus (Yousefpour et al. 2021, "Opacus: user-friendly differential privacy library in PyTorch") as the
``dpsgd`` defense's backend and as a second privacy accountant.

- :func:`opacus_private_gradient`: one DP-SGD step computed by Opacus itself: its ``GradSampleModule`` takes
  the per-sample gradients, its ``DPOptimizer`` clips them to ``C``, sums them, adds Gaussian noise of std
  ``sigma * C`` from a generator seeded by the scenario and divides by the batch size. ``dpsgd:backend=opacus``
  runs every step of the client (FedSGD's one, FedAvg's local ones) through it.
- :func:`opacus_epsilon` and :func:`compare_epsilon`: Opacus' accountants (RDP, PRV, GDP) beside gradinv's
  exact epsilon of the same Gaussian mechanisms.

``pip install gradinv[opacus]``. Opacus is imported inside the functions only: the core never loads it.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import torch
from torch import Tensor, nn

from gradinv.defenses.base import ClientState
from gradinv.defenses.functional import gaussian_epsilon
from gradinv.errors import ConfigError
from gradinv.memory import check_allocation, format_bytes

INSTALL_HINT = "the opacus backend needs `pip install gradinv[opacus]`"
ACCOUNTANTS = ("rdp", "prv", "gdp")


def _opacus() -> SimpleNamespace:
    """Opacus' pieces gradinv uses, or a ConfigError saying how to install it."""
    try:
        from opacus import GradSampleModule
        from opacus.accountants import GaussianAccountant, PRVAccountant, RDPAccountant
        from opacus.optimizers import DPOptimizer
    except ImportError as exc:
        raise ConfigError(f"{INSTALL_HINT} (importing opacus failed: {exc})") from None
    return SimpleNamespace(
        GradSampleModule=GradSampleModule,
        DPOptimizer=DPOptimizer,
        accountants={"rdp": RDPAccountant, "prv": PRVAccountant, "gdp": GaussianAccountant},
    )


# -- one DP-SGD step, computed by Opacus ------------------------------------------------------------------------


def client_module(client: ClientState, params: Mapping[str, Tensor]) -> nn.Module:
    """A real module for Opacus: a copy of the client's stateless twin holding ``params`` as trainable
    ``nn.Parameter`` s (the update's parameters; the others frozen at the client's values) and the client's
    buffers. Tied parameters stay tied. The twin is untouched."""
    module = copy.deepcopy(client.model)
    fresh: dict[int, nn.Parameter] = {}
    for owner, sub in module.named_modules(remove_duplicate=False):
        for attr, value in list(sub._parameters.items()):
            if value is None:
                continue
            name = f"{owner}.{attr}" if owner else attr
            if id(value) not in fresh:
                source = params[name] if name in params else client.params.get(name, value)
                fresh[id(value)] = nn.Parameter(source.detach().clone(), requires_grad=False)
            if name in params:
                fresh[id(value)].requires_grad_(True)
            sub._parameters[attr] = fresh[id(value)]
        for attr, value in list(sub._buffers.items()):
            name = f"{owner}.{attr}" if owner else attr
            if value is not None and name in client.buffers:
                sub._buffers[attr] = client.buffers[name].detach().clone()
    return module


def _record_activations(module: nn.Module) -> None:
    """Put the layers that hold trainable parameters in training mode, the only mode in which Opacus' hooks
    record their activations; the rest keeps the twin's mode (an eval-mode client's dropout stays off). Linear,
    convolution, normalisation and embedding layers compute the same in both modes; attention with dropout
    does not, so an eval-mode client holding one is refused."""
    for name, sub in module.named_modules():
        if sub.training or not any(p.requires_grad for p in sub.parameters(recurse=False)):
            continue
        if isinstance(sub, nn.MultiheadAttention) and sub.dropout > 0:
            raise ConfigError(
                f"the opacus backend records activations in training mode, where {name!r} (attention with dropout "
                f"{sub.dropout}) computes differently than the eval-mode client: use dpsgd's backend=gradinv"
            )
        sub.training = True


def _unsupported(model: nn.Module, exc: Exception) -> str:
    return (
        f"Opacus could not take per-sample gradients of {type(model).__name__} ({str(exc).splitlines()[0][:160]}): "
        "its hooks need every layer with trainable parameters to see the batch first (e.g. a position embedding "
        "looked up without the batch dimension breaks them); use dpsgd's backend=gradinv"
    )


def opacus_private_gradient(
    client: ClientState,
    params: Mapping[str, Tensor],
    x: Tensor,
    y: Tensor,
    *,
    noise_multiplier: float,
    clip: float,
    generator: torch.Generator,
) -> dict[str, Tensor]:
    """One DP-SGD gradient of the batch ``(x, y)`` at ``params``, by parameter name, computed by Opacus.

    Opacus' ``GradSampleModule`` takes the per-sample gradients of ``client.loss_fn`` on each sample (the loss
    is summed over samples, ``loss_reduction="sum"``, so a sample's gradient is that of its own loss, as in
    gradinv's backend); ``DPOptimizer`` (``max_grad_norm=clip``, ``expected_batch_size=len(x)``,
    ``loss_reduction="mean"``) clips each to L2 norm ``clip``, sums, adds ``N(0, (noise_multiplier * clip)^2)``
    per entry and divides by the batch size. The batch is the client's fixed one (no Poisson sampling). The
    noise comes from a ``torch.Generator`` seeded by one draw of ``generator``: the same seed, the same update.
    """
    op = _opacus()
    batch = int(x.shape[0])
    module = client_module(client, params)
    _record_activations(module)
    trainable = [(k, p) for k, p in module.named_parameters() if p.requires_grad]
    sample_bytes = sum(p.numel() * p.element_size() for _, p in trainable)
    check_allocation(
        batch * sample_bytes,
        what=f"opacus' per-sample gradients ({batch:,} samples x {format_bytes(sample_bytes)} of parameters)",
        fix="lower --batch-size (or --local-batch-size), or use dpsgd's backend=gradinv (it takes them in chunks)",
    )
    with_buffers = [  # what GradSampleModule(strict=True) refuses, named here in one line
        name or type(module).__name__
        for name, sub in module.named_modules()
        if any(p.requires_grad for p in sub.parameters(recurse=False)) and next(sub.buffers(), None) is not None
    ]
    if with_buffers:
        more = f" and {len(with_buffers) - 3} more" if len(with_buffers) > 3 else ""
        raise ConfigError(
            f"the opacus backend cannot take per-sample gradients of layers with buffers ({', '.join(with_buffers[:3])}"
            f"{more}): Opacus refuses trainable layers that hold buffers such as BatchNorm's running statistics; use "
            "dpsgd's backend=gradinv (it handles eval-mode BatchNorm) or a model without BatchNorm"
        )
    gsm = op.GradSampleModule(module, batch_first=True, loss_reduction="sum", strict=True)
    device = next(iter(params.values())).device
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    noise = torch.Generator(device=device).manual_seed(seed)
    optimizer = op.DPOptimizer(
        torch.optim.SGD([p for _, p in trainable], lr=0.0),
        noise_multiplier=noise_multiplier,
        max_grad_norm=clip,
        expected_batch_size=batch,
        loss_reduction="mean",
        generator=noise,
    )
    optimizer.zero_grad(set_to_none=True)
    with torch.enable_grad(), warnings.catch_warnings():
        # the inputs need no gradient, so torch notes that the layer hooks fire on the outputs: what Opacus wants
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        out = gsm(x)
        loss = sum(client.loss_fn(out[i : i + 1], y[i : i + 1]) for i in range(batch))
        try:
            loss.backward()  # Opacus' hooks take the per-sample gradients here
        except RuntimeError as exc:
            raise ConfigError(_unsupported(client.model, exc)) from exc
    for _, p in trainable:  # a parameter the forward pass never uses: zero per-sample gradients, as gradinv's
        if p.grad is None and getattr(p, "grad_sample", None) is None:
            p.grad_sample = torch.zeros((batch, *p.shape), dtype=p.dtype, device=p.device)
    try:
        optimizer.pre_step()  # clip, accumulate, add noise, scale by 1 / batch: Opacus' DP-SGD step minus the update
    except (RuntimeError, ValueError) as exc:  # per-sample gradients of mismatched batch sizes, or missing
        raise ConfigError(_unsupported(client.model, exc)) from exc
    by_id = {id(p): p for _, p in trainable}
    grads = {}
    for name in params:
        p = by_id.get(id(module.get_parameter(name)))
        if p is None or p.grad is None:
            raise ConfigError(f"opacus computed no gradient for {name!r}: is it used in the model's forward pass?")
        grads[name] = p.grad.detach().clone()
    gsm.remove_hooks()
    return grads


# -- epsilon: Opacus' accountants beside gradinv's exact one ----------------------------------------------------


def opacus_epsilon(
    *, noise_multiplier: float, steps: int, delta: float, sample_rate: float = 1.0, accountant: str = "rdp"
) -> float:
    """Opacus' epsilon at ``delta`` after ``steps`` DP-SGD steps of noise ``noise_multiplier``, each on a
    Poisson sample of rate ``sample_rate`` (1: the whole batch, as a gradinv client trains), by its
    ``accountant``: ``"rdp"`` (Renyi DP, Mironov 2017, converted to (eps, delta) over a grid of orders),
    ``"prv"`` (privacy random variables, Gopi et al. 2021: a numerical upper bound within 0.01 of the
    exact value) or ``"gdp"`` (Gaussian DP's central-limit approximation, Bu et al. 2020, meant for small
    sample rates and many steps: experimental, it can under- or over-state)."""
    if accountant not in ACCOUNTANTS:
        raise ConfigError(f"unknown opacus accountant {accountant!r}: choose one of {', '.join(ACCOUNTANTS)}")
    if noise_multiplier < 0 or steps < 1 or not 0 < delta < 1 or not 0 < sample_rate <= 1:
        raise ConfigError(
            f"opacus_epsilon needs noise_multiplier >= 0, steps >= 1, delta in (0, 1) and sample_rate in (0, 1], "
            f"got {noise_multiplier}, {steps}, {delta}, {sample_rate}"
        )
    if noise_multiplier == 0:
        return math.inf
    with warnings.catch_warnings(), np.errstate(divide="ignore"):
        warnings.simplefilter("ignore")  # GDP's "experimental" notice; log(0) at sample_rate 1 in PRV's domain
        acc = _opacus().accountants[accountant]()
        acc.history = [(float(noise_multiplier), float(sample_rate), int(steps))]
        return float(acc.get_epsilon(delta=delta))


@dataclass(frozen=True)
class EpsilonComparison:
    """gradinv's and Opacus' epsilon for the same Gaussian mechanisms (``steps`` of noise ``noise_multiplier``
    at ``delta``, no subsampling), and why they differ (``note``)."""

    noise_multiplier: float
    steps: int
    delta: float
    gradinv: float
    rdp: float
    prv: float
    gdp: float
    note: str


NOTE = (
    "gradinv composes the steps exactly: k Gaussian mechanisms of noise sigma are sqrt(k)/sigma-GDP, whose "
    "privacy curve is solved for epsilon (Dong, Roth & Su 2022; Balle & Wang 2018). Opacus' RDP accountant "
    "converts Renyi DP to (epsilon, delta) with a bound that is never tight, so it reports more; "
    "its PRV accountant computes the same curve numerically and returns an upper bound within its 0.01 "
    "eps_error; its GDP accountant uses the central-limit mu = sqrt(k (e^(1/sigma^2) - 1)) for Poisson "
    "subsampling, made for small sample rates, which at sample rate 1 overstates mu. All use sample rate 1 here: "
    "gradinv's client trains on its whole fixed batch, so no sample is left out at random; Opacus' usual "
    "setting, Poisson sampling of rate q = B/N from a dataset, amplifies privacy and reports a much smaller "
    "epsilon for the same noise, which a fixed federated batch does not earn."
)


def compare_epsilon(*, noise_multiplier: float, steps: int = 1, delta: float = 1e-5) -> EpsilonComparison:
    """gradinv's exact epsilon (:func:`gradinv.defenses.functional.gaussian_epsilon`) beside Opacus' RDP, PRV
    and GDP accountants for ``steps`` Gaussian mechanisms of noise ``noise_multiplier`` at ``delta``, with
    sample rate 1 (a client's fixed batch). ``steps``: the mechanisms a sample takes part in,
    :func:`gradinv.defenses.update.local_uses` for a client's protocol."""
    exact = gaussian_epsilon(noise_multiplier, delta=delta, rounds=steps)
    values = {
        a: opacus_epsilon(noise_multiplier=noise_multiplier, steps=steps, delta=delta, accountant=a)
        for a in ACCOUNTANTS
    }
    gap = (
        ""
        if math.isinf(exact)
        else f" Here RDP reports {100 * (values['rdp'] / exact - 1):+.1f}% over the exact value."
    )
    return EpsilonComparison(
        noise_multiplier=noise_multiplier,
        steps=steps,
        delta=delta,
        gradinv=exact,
        rdp=values["rdp"],
        prv=values["prv"],
        gdp=values["gdp"],
        note=NOTE + gap,
    )


__all__ = [
    "ACCOUNTANTS",
    "EpsilonComparison",
    "INSTALL_HINT",
    "client_module",
    "compare_epsilon",
    "opacus_epsilon",
    "opacus_private_gradient",
]
