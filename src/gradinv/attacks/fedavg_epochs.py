"""Data leakage in federated averaging (Dimitrov, Balunović, Konstantinov, Vechev, TMLR 2022).

Threat model: an honest-but-curious server sees one client's FedAvg weight delta after ``E > 1`` local epochs
over its ``n`` samples in mini-batches of ``b`` (``K = E n / b`` SGD steps at a known learning rate); it knows
the input shape, ``n`` and the protocol, and (for the box constraint) the normalisation. The client may
reshuffle its samples every epoch with private randomness (``FedAvg(shuffle=True)``), so the server does not
know which samples went into which step. Labels come from the threat model or from the update: label counts
from model statistics along the local steps (``label_method="fedavg-count"``; the paper interpolates Geng et
al.'s statistics over every step, gradinv's method averages the two ends).

The attack's three parts:

- **simulation**: the client's ``K`` steps are replayed differentiably with *separate* dummy data ``X^1..X^E``
  for every epoch (each epoch's dummy batch in an order of its own); step ``k`` takes positions
  ``[k b, (k+1) b)`` of the epochs' concatenation. Every epoch carries the same label vector (the recovered
  multiset, as the paper's code tiles it), so sample ``i`` of every epoch should show a sample of class ``y_i``.
  The simulated delta, in gradient units ``-delta / lr``, is matched to the observed one (the paper's FEMNIST
  runs: squared L2 with exponentially decaying layer weights).
- **epoch-order-invariant prior**: every epoch reconstructs the same *set* of samples, so the epochs are tied
  through an order-invariant function: ``R_inv = (1/E^2) sum_{a,b} d(X^a, X^b)``, with
  ``epoch_invariant="mean"`` (the paper's ``l2_mean``: mean squared difference of the epochs' mean samples) or
  ``"nearest"`` (ours, the default: every sample of epoch ``a`` to its nearest sample of the same class in
  epoch ``b``, a set distance that pulls each sample to its counterparts, not only the batch means together).
  ``epoch_prior`` weighs it.
- **output**: the per-epoch reconstructions are matched to each other (Hungarian, within classes; the paper
  matches every epoch to the first) and averaged: the consensus batch of ``n`` samples.

Differences from the paper's code (eth-sri/fedavg_leakage, JAX): the box constraint replaces its squared
"clip" penalty; gradinv's ``exp`` layer weights halve per layer (theirs divide by ``e``); no ramp of the
matching term's factor and no division by the steps per epoch; the consensus takes a second matching pass
against the mean. Limitation shared with the paper: the simulated steps' label mix (the tiled label vector)
is not the shuffled client's, so under large local learning rates the replay cannot match exactly.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from gradinv._settings import at_least, one_of
from gradinv.attacks.base import AttackOutput, Callback, register_attack
from gradinv.attacks.components.budget import check_restarts
from gradinv.attacks.components.engine import MatchingSettings, optimise, use_autograd
from gradinv.attacks.components.objectives import layer_weights
from gradinv.attacks.components.replay import box_bounds, sent_entries
from gradinv.attacks.labels import label_declines
from gradinv.attacks.matching import GradientMatchingAttack
from gradinv.fl.functional import stateless_twin
from gradinv.fl.protocols import FedAvg, client_update, cross_entropy
from gradinv.types import Observation

#: the order-invariant functions ``g`` of the epoch prior
EPOCH_INVARIANTS = ("mean", "nearest")


@dataclass(frozen=True)
class FedAvgEpochsSettings(MatchingSettings):
    """The paper's FEMNIST values (scripts/reconstruct_femnist_table1.sh): Gaussian init, Adam at lr 0.4 for
    400 steps, squared-L2 matching with exponential layer weights, TV 1e-3, labels from counts.

    ``epoch_prior``: weight of the epoch-order-invariant prior (0: separate epochs, no tie); ``epoch_invariant``:
    its order-invariant function. The default is ours, ``nearest`` at 10; the paper's is ``mean`` at 1000
    (``l2_mean``, ``--reg_reorder 1000``), which on gradinv's small cases measured worse than no prior at all
    while ``nearest`` gained 2-10 dB over it (LeNet, 16x16 digits, 4 samples, 4 shuffled epochs; see
    tests/test_fedavg_epochs.py)."""

    iterations: int = 400
    init: str = "gaussian"
    objective: str = "euclidean"
    layer_weights: str = "exp"
    tv: float = 1e-3
    optimizer: str = "adam"
    lr: float = 0.4
    schedule: str = "none"
    label_method: str = "fedavg-count"
    epoch_prior: float = 10.0
    epoch_invariant: str = "nearest"

    def problems(self) -> list[str]:
        return [
            *super().problems(),
            *at_least("epoch_prior", self.epoch_prior, 0),
            *one_of("epoch_invariant", self.epoch_invariant, EPOCH_INVARIANTS),
        ]


def local_epochs(protocol: FedAvg, num_samples: int) -> int:
    """How many epochs (passes over the client's ``num_samples``) FedAvg's local steps make: ``ceil(K b / n)``."""
    n = int(num_samples)
    return -(-protocol.local_steps * (protocol.local_batch_size or n) // n)


def epoch_replay(observation: Observation, *, epochs: int, autograd: bool = False) -> Callable[[Tensor, Tensor], dict]:
    """``update(x, y)``: the FedAvg weight delta the client's ``K`` local steps give when epoch ``e`` trains on
    its own dummy batch ``x[e]`` (``x`` is (E, n, ...)) with labels ``y``, the same for every epoch (n,) or
    one row per epoch (E, n): step ``k`` takes positions ``[k b, (k+1) b)`` of the epochs' concatenation. Pure
    (``vmap``-able); ``autograd``: see :func:`gradinv.fl.protocols.loss_gradient`."""
    protocol = observation.protocol
    n = int(observation.knowledge.num_samples)
    b = protocol.local_batch_size or n
    # the same local batch size over the concatenated epochs (None meant "all n", not all E*n)
    replayed = dataclasses.replace(protocol, local_batch_size=b, shuffle=False)
    order = torch.arange(protocol.local_steps * b, device=observation.device)
    twin = stateless_twin(observation.model, train_mode=observation.train_mode)
    params = {k: v.detach() for k, v in observation.parameters.items()}
    if autograd:
        params = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    buffers = {k: v.detach().clone() for k, v in observation.buffers.items()}

    def update(x: Tensor, y: Tensor) -> dict[str, Tensor]:
        flat = x.reshape(epochs * n, *x.shape[2:])
        labels = y.reshape(-1) if y.ndim == 2 else y.repeat(epochs)
        return client_update(
            replayed, twin, params, buffers, flat, labels, loss_fn=cross_entropy, autograd=autograd, order=order
        )

    return update


def mean_invariant(x: Tensor, y: Tensor) -> Tensor:
    """The paper's ``l2_mean`` prior: mean over epoch pairs of the mean squared difference of the epochs' mean
    samples. ``x`` is (E, n, ...)."""
    m = x.mean(1).flatten(1)
    return (m[:, None] - m[None, :]).pow(2).mean()


def nearest_invariant(x: Tensor, y: Tensor) -> Tensor:
    """Mean over epoch pairs ``(a, b)`` and samples ``i`` of epoch ``a`` of the mean squared difference to the
    nearest sample of epoch ``b`` with the same label: zero exactly when every epoch holds the same samples, in
    any order (a set distance, invariant to each epoch's order)."""
    e, n = x.shape[:2]
    f = x.reshape(e, n, -1)
    sq = f.pow(2).sum(-1)
    cross = torch.einsum("aip,bjp->abij", f, f)
    d = (sq[:, None, :, None] + sq[None, :, None, :] - 2 * cross).clamp_min(0) / f.shape[-1]
    same = (y[:, None] == y[None, :]).to(d.dtype)  # (n, n): i of epoch a may match j of epoch b
    far = d.detach().max() + 1
    return torch.where(same > 0, d, far).amin(-1).mean()


INVARIANTS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {"mean": mean_invariant, "nearest": nearest_invariant}


def consensus(
    x: Tensor, y: Tensor, *, visited: Tensor | None = None, passes: int = 2
) -> tuple[Tensor, list[list[int]]]:
    """The epochs' reconstructions ``x`` (E, n, ...) matched to each other and averaged: each epoch is aligned to
    the reference (first the first epoch, then the mean) by the assignment of least squared distance between
    samples of the same label (Hungarian; Kuhn 1955). ``visited`` (E, n, bool): the dummy samples some local
    step trained on (a last, partial epoch leaves some unvisited: they are matched but not averaged); None: all.
    Returns the (n, ...) mean and each epoch's alignment (``x[e][alignment[e]]`` lines up with the mean)."""
    e, n = x.shape[:2]
    f = x.detach().reshape(e, n, -1).double().cpu()
    used = torch.ones(e, n, dtype=torch.bool) if visited is None else visited.cpu()
    allowed = (y[:, None] == y[None, :]).cpu()
    ref = f[0]
    perms = [list(range(n))] * e
    for _ in range(passes):
        perms = []
        for k in range(e):
            cost = torch.cdist(ref, f[k]).pow(2)
            cost = torch.where(allowed, cost, torch.full_like(cost, 1e30)).numpy()
            rows, cols = linear_sum_assignment(cost)
            perms.append(cols[rows.argsort()].tolist())
        ref = _weighted_mean(torch.stack([f[k][perms[k]] for k in range(e)]), used, perms)
    aligned = torch.stack([x[k][torch.tensor(perms[k], device=x.device)] for k in range(e)])
    return _weighted_mean(aligned, used.to(x.device), perms), perms


def _weighted_mean(aligned: Tensor, used: Tensor, perms: list[list[int]]) -> Tensor:
    """Mean over epochs of aligned samples (E, n, ...), counting only the visited ones."""
    w = torch.stack([used[k][torch.tensor(p, device=used.device)] for k, p in enumerate(perms)]).to(aligned.dtype)
    w = w.reshape(*w.shape, *([1] * (aligned.ndim - 2)))
    return (aligned * w).sum(0) / w.sum(0).clamp_min(1)


@register_attack
class FedAvgEpochs(GradientMatchingAttack):
    """The multi-epoch FedAvg attack: per-epoch dummy data replayed through the client's local steps, tied by
    the epoch-order-invariant prior, averaged to one batch (Dimitrov et al., TMLR 2022)."""

    name = "fedavg_epochs"
    summary = "Dimitrov et al. 2022: FedAvg replay with per-epoch dummy data + epoch-order-invariant prior"
    Settings = FedAvgEpochsSettings
    table1 = {
        "initialisation": "Gaussian, one dummy batch per local epoch",
        "objective": "squared L2 between simulated and observed FedAvg updates, exponential layer weights",
        "optimiser": "Adam, box",
        "priors": "total variation, epoch-order-invariant prior",
    }

    def _unmet_assumptions(self, observation: Observation) -> list[str]:
        protocol = observation.protocol
        if not isinstance(protocol, FedAvg):
            return ["the update is a FedSGD gradient, not a FedAvg weight delta: use invgrad for FedSGD"]
        reasons = []
        if local_epochs(protocol, observation.knowledge.num_samples) < 2:
            reasons.append(
                f"the client runs a single local epoch ({protocol.local_steps} step(s) of "
                f"{protocol.local_batch_size or 'all'} over {observation.knowledge.num_samples} samples): the "
                "epoch prior needs at least two; use invgrad, which replays FedAvg"
            )
        if observation.clients > 1:
            reasons.append(
                f"the update averages {observation.clients} clients' deltas: this attack replays one client's "
                "epochs; attack each client's own update"
            )
        return reasons + label_declines(observation, self.settings.label_method)

    def _reconstruct(
        self,
        observation: Observation,
        *,
        generator: torch.Generator,
        progress: bool,
        callback: Callback | None,
    ) -> AttackOutput:
        s = self.settings
        start = time.perf_counter()
        k = observation.knowledge
        epochs = local_epochs(observation.protocol, k.num_samples)
        check_restarts(observation, s.restarts * epochs, attack=self.name)  # E dummy batches per restart
        labels, label_source = self._labels(observation)
        labels = labels.to(observation.device)
        shape = (s.restarts, epochs, k.num_samples, *k.input_shape)
        x0 = self._initial(observation, shape, generator).to(observation.device)
        build = functools.partial(self._cost, observation, labels=labels, epochs=epochs)
        cost = build()
        loop = use_autograd(s, s.restarts, observation.device) and s.optimizer != "lbfgs"
        autograd_cost = build(autograd=True) if loop else None
        result = optimise(
            cost,
            x0,
            settings=s,
            bounds=box_bounds(observation, shape) if s.boxed else None,
            autograd_cost=autograd_cost,
            progress=progress,
            callback=None
            if callback is None
            else _consensus_callback(callback, labels, self._visited(observation, epochs)),
            desc=self.name,
            start=start,
        )
        inputs, alignment = consensus(result.inputs, labels, visited=self._visited(observation, epochs))
        return AttackOutput(
            inputs=inputs,
            labels=labels,
            label_source=label_source,
            trace=result.trace,
            extras={
                "epochs": epochs,
                "epoch_alignment": alignment,
                "restart_costs": result.costs.tolist(),
                "best_restart": result.best,
                "iterations_run": result.iterations_run,
                "stopped": result.stopped,
                **result.extras,
            },
            settings={"epochs": epochs},
        )

    @staticmethod
    def _visited(observation: Observation, epochs: int) -> Tensor:
        """(E, n) booleans: the dummy samples one of the ``K b`` sample visits of the local steps reaches."""
        n = int(observation.knowledge.num_samples)
        visits = observation.protocol.local_steps * (observation.protocol.local_batch_size or n)
        return (torch.arange(epochs * n) < visits).reshape(epochs, n)

    def _cost(
        self, observation: Observation, *, labels: Tensor, epochs: int, autograd: bool = False
    ) -> Callable[[Tensor], Tensor]:
        """``cost(x)`` of one restart's per-epoch candidates ``x`` (E, n, ...): the distance of the simulated
        update to the observed one (both in gradient units, ``-delta / lr``), the priors on every epoch's batch
        and the weighted epoch-order-invariant prior."""
        s = self.settings
        scale = -1.0 / observation.protocol.lr
        target = {name: v.detach() * scale for name, v in observation.update.items()}
        weights = layer_weights(list(observation.update), s.layer_weights)
        distance = self._objective(observation)(target, weights=weights)
        mask = sent_entries(observation) if s.adaptive else None
        replay = epoch_replay(observation, epochs=epochs, autograd=autograd)
        prior = self._prior(observation, labels.repeat(epochs))
        invariant = INVARIANTS[s.epoch_invariant]
        weight = s.epoch_prior

        def cost(x: Tensor) -> Tensor:
            update = replay(x, labels)
            update = {name: v * scale for name, v in update.items()}
            if mask is not None:
                update = {name: update[name] * mask[name] for name in update}
            value = distance(update)
            if prior is not None:
                value = value + prior(x.flatten(0, 1))
            if weight:
                value = value + weight * invariant(x, labels)
            return value

        return cost


def _consensus_callback(callback: Callback, labels: Tensor, visited: Tensor) -> Callback:
    """The user's callback, shown the consensus batch (n samples) rather than the per-epoch candidates."""

    def shown(iteration: int, seconds: float, x: Tensor) -> None:
        callback(iteration, seconds, consensus(x, labels, visited=visited)[0])

    return shown


__all__ = [
    "EPOCH_INVARIANTS",
    "FedAvgEpochs",
    "FedAvgEpochsSettings",
    "consensus",
    "epoch_replay",
    "local_epochs",
    "mean_invariant",
    "nearest_invariant",
]
