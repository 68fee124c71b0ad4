"""Gradient disaggregation (Lam, Wei, Brooks, Janapa Reddi & Mitzenmacher, "Gradient Disaggregation: Breaking
Privacy in Federated Learning by Reconstructing the User Participant Matrix", ICML 2021).

Secure aggregation shows the server only the sum of the participants' updates in each round. Over ``T`` rounds
with ``N`` clients whose updates ``U`` (``N x d``) stay the same (the server keeps the model fixed) or change
slowly, the stacked sums are ``G = P U`` with the participant matrix ``P`` in ``{0, 1}^(T x N)`` unknown to the
server. Device analytics reveal, per client, how many times it took part in each window of ``window`` rounds.

Every column ``p_i`` of ``P`` is a binary vector in the column space of ``G`` (when ``U`` has full row rank and
``P`` rank ``N``, ``span(G) = span(P)``): orthogonal to the null space of ``G^T``, and its window sums equal the
client's counts. The paper finds each column with an integer program (Gurobi, minimising ``|N^T p|^2`` for a
basis ``N`` of that null space, the span truncated to the top ``N`` singular vectors to absorb noise). Here the
program is a feasibility MILP solved with HiGHS (``scipy.optimize.milp``)::

    find p in {0,1}^T   with   |N^T p|_inf <= tolerance   and   sum_{t in window w} p_t = counts[i, w]  for all w

(``N`` orthonormal, so the residual ``|p - proj_span(G) p|_2 <= tolerance * sqrt(T - N)``). A second MILP with a
no-good cut (``p`` must differ from the first solution in at least one round) checks whether the column is
unique: infeasible means no other binary vector with those counts lies within ``tolerance`` of the span (up to
HiGHS's feasibility tolerances), feasible means the column is ambiguous (e.g. two clients with equal counts), a
time limit leaves it unknown. The updates then follow by least squares, ``U = P^+ G``, and any single-client
attack inverts a recovered update (:func:`client_observation`).

Threat model: an honest-but-curious server that observes only per-round sums (and how many clients each sum
holds, not which), knows the model it sent and the per-window participation counts of every client, and keeps
the model fixed (or nearly) over the observed rounds. Exact recovery needs ``T >= N`` rounds with ``P`` of rank
``N`` and linearly independent client updates; noisy or slowly changing updates need ``tolerance`` of the order
of the noise's effect on the span (see :func:`simulate_rounds`' ``noise``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import scipy.linalg
import torch
from scipy.optimize import Bounds, LinearConstraint, milp
from torch import Tensor, nn

from gradinv.errors import AttackError, ConfigError, DataError, ShapeError
from gradinv.protocol import FedSGD, Protocol
from gradinv.types import ClientDefense, Knowledge, Observation

#: the attack as a row of the survey's Table 1 (for ``gradinv list``)
TABLE1: dict[str, str] = {
    "initialisation": "-",
    "objective": "participant matrix: integer program on the span of the aggregates + per-window count constraints",
    "optimiser": "MILP (HiGHS, scipy.optimize.milp); updates by least squares U = P^+ G",
    "priors": "binary entries, participation counts per window",
}

#: HiGHS's MILP status codes (scipy.optimize.milp)
_OPTIMAL, _LIMIT, _INFEASIBLE = 0, 1, 2


# -- the server's records ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class UpdateLayout:
    """How a named update (parameter name -> tensor) flattens into one vector, in this order."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[torch.dtype, ...]

    @classmethod
    def of(cls, update: Mapping[str, Tensor]) -> UpdateLayout:
        if not update:
            raise DataError("an update needs at least one named tensor")
        return cls(
            names=tuple(update),
            shapes=tuple(tuple(t.shape) for t in update.values()),
            dtypes=tuple(t.dtype for t in update.values()),
        )

    @property
    def size(self) -> int:
        return sum(math.prod(s) for s in self.shapes)

    def flatten(self, update: Mapping[str, Tensor]) -> Tensor:
        """The update as one float64 vector; refuses other names or shapes."""
        if tuple(update) != self.names and set(update) != set(self.names):
            raise ShapeError(
                f"the update's names {sorted(update)} differ from the first client's {sorted(self.names)}: "
                "every client must share the same model"
            )
        parts = []
        for name, shape in zip(self.names, self.shapes, strict=True):
            t = update[name]
            if tuple(t.shape) != shape:
                raise ShapeError(f"update {name!r} has shape {tuple(t.shape)}, the first client's has {shape}")
            parts.append(t.detach().to("cpu", torch.float64).reshape(-1))
        return torch.cat(parts)

    def unflatten(self, vector: Tensor) -> dict[str, Tensor]:
        """A flat vector back to named tensors of the layout's shapes and dtypes."""
        if vector.numel() != self.size:
            raise ShapeError(f"a flat update of this layout has {self.size} values, got {vector.numel()}")
        out, start = {}, 0
        for name, shape, dtype in zip(self.names, self.shapes, self.dtypes, strict=True):
            n = math.prod(shape)
            out[name] = vector[start : start + n].reshape(shape).to(dtype)
            start += n
        return out


@dataclass(frozen=True, eq=False)
class SentModel:
    """What the server sent every client in the observed rounds (unchanged: the paper's assumption)."""

    model: nn.Module
    parameters: Mapping[str, Tensor]
    buffers: Mapping[str, Tensor]
    protocol: Protocol = field(default_factory=FedSGD)
    train_mode: bool = False
    defenses: tuple[ClientDefense, ...] = ()


@dataclass(frozen=True, eq=False)
class RoundsObservation:
    """What the server holds after ``T`` rounds under secure aggregation; never the participant matrix.

    ``aggregates`` (T, d) float64: each round's sum of its participants' flattened updates; ``round_sizes``
    (T,): how many clients each sum holds (the aggregation protocol reveals the number, not who), or None;
    ``counts`` (N, W) int64: device analytics, the times client ``i`` took part in window ``w`` (rounds
    ``w*window`` to ``(w+1)*window - 1``, the last window possibly shorter). ``layout`` maps flat updates to
    parameter names; ``sent`` and ``knowledge`` (one per client, in the counts' order) let
    :func:`client_observation` build a single-client :class:`~gradinv.types.Observation`.
    """

    aggregates: Tensor
    counts: Tensor
    window: int
    round_sizes: Tensor | None = None
    layout: UpdateLayout | None = None
    sent: SentModel | None = None
    knowledge: tuple[Knowledge, ...] | None = None

    @property
    def rounds(self) -> int:
        return int(self.aggregates.shape[0])

    @property
    def clients(self) -> int:
        return int(self.counts.shape[0])


@dataclass(frozen=True, eq=False)
class RoundsTruth:
    """The simulation's secrets, for scoring only: the participant matrix (T, N) and the clients' updates (N, d;
    their mean over rounds when they change from round to round)."""

    participants: Tensor
    updates: Tensor


# -- simulation -------------------------------------------------------------------------------------------------


def _as_updates(
    updates: Sequence[Observation] | Sequence[Mapping[str, Tensor]] | Tensor,
) -> tuple[Tensor, UpdateLayout | None, SentModel | None, tuple[Knowledge, ...] | None]:
    """Client updates as a float64 tensor (N, d) or (T, N, d), with their layout and public context."""
    if isinstance(updates, Tensor):
        if updates.ndim not in (2, 3) or not updates.is_floating_point():
            raise ShapeError(
                f"updates given as a tensor must be floating point (N, d) or (rounds, N, d), got "
                f"{tuple(updates.shape)} {updates.dtype}"
            )
        if not bool(torch.isfinite(updates).all()):
            raise DataError("the updates hold NaN or infinite values")
        return updates.detach().to("cpu", torch.float64), None, None, None
    items = list(updates)
    if not items:
        raise ConfigError("simulate_rounds needs at least one client's update")
    sent = knowledge = None
    if all(isinstance(u, Observation) for u in items):
        first = items[0]
        for i, obs in enumerate(items):
            if obs.clients != 1:
                raise ConfigError(f"client {i}'s observation already aggregates {obs.clients} clients: give one each")
            same = set(obs.parameters) == set(first.parameters) and all(
                torch.equal(obs.parameters[k], first.parameters[k]) for k in first.parameters
            )
            if not same or obs.protocol != first.protocol:
                raise ConfigError(
                    f"client {i} was sent another model or protocol than client 0: gradient disaggregation assumes "
                    "the server sends every client the same model over the observed rounds"
                )
        sent = SentModel(
            model=first.model,
            parameters=first.parameters,
            buffers=first.buffers,
            protocol=first.protocol,
            train_mode=first.train_mode,
            defenses=first.defenses,
        )
        knowledge = tuple(obs.knowledge for obs in items)
        items = [obs.update for obs in items]
    elif any(isinstance(u, Observation) for u in items):
        raise ConfigError("give the clients' updates as all Observations or all name -> tensor mappings, not a mix")
    layout = UpdateLayout.of(items[0])
    flat = torch.stack([layout.flatten(u) for u in items])
    if not bool(torch.isfinite(flat).all()):
        raise DataError("the clients' updates hold NaN or infinite values")
    return flat, layout, sent, knowledge


def participation_counts(participants: Tensor, window: int) -> Tensor:
    """Per client, the number of rounds it took part in within each window of ``window`` rounds: (N, W) int64."""
    t = participants.shape[0]
    windows = [participants[w : w + window].sum(dim=0) for w in range(0, t, window)]
    return torch.stack(windows, dim=1).to(torch.int64)


def simulate_rounds(
    *,
    updates: Sequence[Observation] | Sequence[Mapping[str, Tensor]] | Tensor,
    rounds: int,
    participation: float,
    window: int,
    seed: int,
    noise: float = 0.0,
) -> tuple[RoundsObservation, RoundsTruth]:
    """``rounds`` rounds of secure aggregation over the clients' ``updates``; what the server sees, and the truth.

    ``updates``: one per client, as its single-round :class:`~gradinv.types.Observation` (e.g.
    ``Scenario.observe()``; the server's public part, the sent model and the knowledge, is kept for
    :func:`client_observation`, the update itself only inside the sums), as name -> tensor mappings, or as a
    tensor (N, d); a tensor (rounds, N, d) gives every round's updates (updates that change). Each client takes
    part in each round independently with probability ``participation``; a round's aggregate is the sum of its
    participants' updates. ``noise`` > 0 models slowly changing updates (a model that moves a little, data
    resampled): a participant's update in a round is ``u_i + noise * rms(u_i) * z`` with ``z`` standard normal.
    Device analytics reveal each client's participation count per ``window`` rounds. All randomness comes
    from ``seed``.
    """
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ConfigError(f"rounds must be a positive integer, got {rounds!r}")
    if isinstance(window, bool) or not isinstance(window, int) or not 1 <= window <= rounds:
        raise ConfigError(f"window must be an integer from 1 to rounds={rounds}, got {window!r}")
    if not 0.0 < float(participation) <= 1.0:
        raise ConfigError(f"participation must be a probability in (0, 1], got {participation!r}")
    if not float(noise) >= 0.0:
        raise ConfigError(f"noise must be >= 0, got {noise!r}")
    flat, layout, sent, knowledge = _as_updates(updates)
    per_round = flat.ndim == 3
    if per_round and flat.shape[0] != rounds:
        raise ShapeError(f"updates of shape (rounds, N, d) need rounds={rounds} rows, got {flat.shape[0]}")
    n, d = flat.shape[-2], flat.shape[-1]
    generator = torch.Generator().manual_seed(int(seed))
    participants = (torch.rand(rounds, n, generator=generator, dtype=torch.float64) < participation).to(torch.int64)
    base = flat.mean(dim=0) if per_round else flat
    aggregates = torch.empty(rounds, d, dtype=torch.float64)
    rms = base.norm(dim=1, keepdim=True) / math.sqrt(d)
    for t in range(rounds):
        current = flat[t] if per_round else flat
        if noise > 0:
            current = current + noise * rms * torch.randn(n, d, generator=generator, dtype=torch.float64)
        aggregates[t] = participants[t].to(torch.float64) @ current
    observation = RoundsObservation(
        aggregates=aggregates,
        counts=participation_counts(participants, window),
        window=window,
        round_sizes=participants.sum(dim=1),
        layout=layout,
        sent=sent,
        knowledge=knowledge,
    )
    return observation, RoundsTruth(participants=participants, updates=base.clone())


# -- the attack -------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Disaggregation:
    """The recovered participant matrix and per-client updates, with what was checked.

    ``unique[i]``: True when the no-good-cut MILP proved no other binary vector with client ``i``'s counts lies
    within ``tolerance`` of the span (up to HiGHS's feasibility tolerances), False when it found one
    (``alternatives[i]``), None when its time limit left the question open or ``check_unique=False``.
    ``residuals[i]``: ``max |N^T p_i|`` of the recovered column (null-space coordinates); ``fit``:
    ``|G - P U|_F / |G|_F``; ``rank``: the aggregates' numerical rank (``N`` for exact updates; more with noise,
    when the span of the top ``N`` singular vectors is used, as in the paper).
    """

    participants: Tensor
    flat_updates: Tensor
    updates: tuple[dict[str, Tensor], ...] | None
    residuals: Tensor
    unique: tuple[bool | None, ...]
    alternatives: tuple[Tensor | None, ...]
    fit: float
    rank: int
    tolerance: float
    seconds: float
    column_seconds: tuple[float, ...]
    checks: Mapping[str, bool] = field(default_factory=dict)

    @property
    def identified(self) -> bool:
        """Every column proven unique and every consistency check passed (then ``P`` is determined by the data)."""
        return all(u is True for u in self.unique) and all(self.checks.values())


def _check_observation(obs: RoundsObservation) -> tuple[np.ndarray, np.ndarray]:
    """The aggregates (T, d) float64 and counts (N, W) int64 as arrays; every problem with them in one error."""
    if not isinstance(obs, RoundsObservation):
        raise TypeError(f"disaggregate() takes a RoundsObservation, got {type(obs).__name__}")
    g, c = obs.aggregates, obs.counts
    if not isinstance(g, Tensor) or g.ndim != 2 or not g.is_floating_point():
        raise ShapeError(f"aggregates must be a floating-point tensor (rounds, d), got {getattr(g, 'shape', g)!r}")
    if not isinstance(c, Tensor) or c.ndim != 2 or c.is_floating_point() or c.is_complex():
        raise ShapeError(f"counts must be an integer tensor (clients, windows), got {getattr(c, 'shape', c)!r}")
    t, n = g.shape[0], c.shape[0]
    window = obs.window
    problems = []
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise DataError(f"window must be a positive integer number of rounds, got {window!r}")
    if not bool(torch.isfinite(g).all()):
        problems.append("the aggregates hold NaN or infinite values")
    lengths = np.array([min(window, t - w) for w in range(0, t, window)])
    if c.shape[1] != len(lengths):
        problems.append(
            f"counts have {c.shape[1]} windows but {t} rounds in windows of {window} make {len(lengths)}: give one "
            "count per client and window"
        )
    else:
        cn = c.cpu().numpy()
        low = np.argwhere(cn < 0)
        high = np.argwhere(cn > lengths[None, :])
        if len(low):
            problems.append(f"negative counts (client, window) {low[:5].tolist()}")
        if len(high):
            problems.append(
                f"counts larger than their window's length at (client, window) {high[:5].tolist()}: a client takes "
                "part at most once per round"
            )
        if obs.round_sizes is not None:
            sizes = obs.round_sizes.cpu().numpy().astype(np.int64)
            if sizes.shape != (t,):
                problems.append(f"round_sizes must have one entry per round ({t}), got shape {tuple(sizes.shape)}")
            else:
                per_window = np.array([sizes[w : w + window].sum() for w in range(0, t, window)])
                bad = np.flatnonzero(per_window != cn.sum(axis=0))
                if len(bad):
                    totals = cn.sum(axis=0)[bad[:5]].tolist()
                    problems.append(
                        f"in windows {bad[:5].tolist()} the clients' counts add up to {totals} participations but "
                        f"the rounds held {per_window[bad[:5]].tolist()}: the analytics and the aggregates disagree"
                    )
    if problems:
        raise DataError("the rounds' records are inconsistent: " + "; ".join(problems))
    if t < n:
        raise AttackError(
            f"{t} rounds cannot identify {n} clients: the participant matrix (rounds x clients) has rank at most "
            f"{t} < {n}, so the updates are not determined by the sums; observe at least {n} rounds (the paper "
            "uses several times more rounds than clients)"
        )
    return g.detach().cpu().to(torch.float64).numpy(), c.cpu().numpy().astype(np.int64)


def _span_complement(g: np.ndarray, n: int, rank_tolerance: float) -> tuple[np.ndarray, int]:
    """An orthonormal basis (T, T - n) of the complement of the top-``n`` left singular space of ``g``."""
    u, s, _ = np.linalg.svd(g, full_matrices=False)
    rank = int((s > rank_tolerance * s[0]).sum()) if s.size and s[0] > 0 else 0
    if rank < n:
        raise AttackError(
            f"the aggregates span {rank} dimensions for {n} clients (singular values above {rank_tolerance:g} of "
            "the largest): either the participant matrix has rank < clients (too few rounds, or a client that "
            "never or always takes part) or some clients' updates are linearly dependent (or d < clients); "
            "observe more rounds"
        )
    return scipy.linalg.null_space(u[:, :n].T), rank


def _solve_column(
    complement: np.ndarray,
    windows: np.ndarray,
    counts: np.ndarray,
    *,
    tolerance: float,
    time_limit: float,
    exclude: np.ndarray | None = None,
) -> tuple[int, np.ndarray | None]:
    """One feasibility MILP: binary ``p`` with ``|complement^T p|_inf <= tolerance`` and window sums ``counts``
    (and, with ``exclude``, differing from that binary vector somewhere). Returns HiGHS's status and ``p``."""
    t = windows.shape[1]
    constraints = [LinearConstraint(windows, counts, counts)]
    if complement.shape[1]:
        constraints.append(LinearConstraint(complement.T, -tolerance, tolerance))
    if exclude is not None:  # sum_{t: x_t=0} p_t + sum_{t: x_t=1} (1 - p_t) >= 1
        ones = exclude > 0.5
        constraints.append(LinearConstraint(np.where(ones, -1.0, 1.0)[None], 1.0 - ones.sum(), np.inf))
    result = milp(
        np.zeros(t),
        integrality=np.ones(t),
        bounds=Bounds(np.zeros(t), np.ones(t)),
        constraints=constraints,
        options={"time_limit": float(time_limit), "disp": False},
    )
    x = None if result.x is None else np.rint(result.x)
    return int(result.status), x


def disaggregate(
    observation: RoundsObservation,
    *,
    tolerance: float = 1e-5,
    rank_tolerance: float = 1e-9,
    check_unique: bool = True,
    time_limit: float = 60.0,
) -> Disaggregation:
    """Recover the participant matrix and every client's update from ``observation`` (Lam et al., ICML 2021).

    ``tolerance``: how far (in orthonormal null-space coordinates, participation units) a binary column may lie
    from the span of the aggregates; the default suits exact updates in float32/float64, noisy or slowly changing
    updates need more (of the order of the noise). ``rank_tolerance``: singular values below this fraction of the
    largest count as zero when checking that the aggregates span ``N`` dimensions. ``check_unique``: re-solve each
    column with a no-good cut to test whether it is the only solution. ``time_limit``: seconds per MILP.

    Raises :class:`DataError` when the counts contradict the rounds (shape, a count above its window's length,
    totals that differ from the round sizes), :class:`AttackError` when the updates are not identifiable
    (fewer rounds than clients, aggregates of rank < N) or a client's column is not found.
    """
    if not float(tolerance) > 0:
        raise ConfigError(f"tolerance must be > 0, got {tolerance!r}")
    if not 0 < float(rank_tolerance) < 1:
        raise ConfigError(f"rank_tolerance must be in (0, 1), got {rank_tolerance!r}")
    if not float(time_limit) > 0:
        raise ConfigError(f"time_limit must be > 0 seconds, got {time_limit!r}")
    g, counts = _check_observation(observation)
    t, n = g.shape[0], counts.shape[0]
    window = observation.window
    start = time.perf_counter()
    complement, rank = _span_complement(g, n, rank_tolerance)
    windows = np.zeros((counts.shape[1], t))
    for w, s in enumerate(range(0, t, window)):
        windows[w, s : s + window] = 1.0

    columns, unique, alternatives, seconds, failed = [], [], [], [], []
    for i in range(n):
        began = time.perf_counter()
        status, p = _solve_column(complement, windows, counts[i], tolerance=tolerance, time_limit=time_limit)
        if status != _OPTIMAL or p is None:
            reason = "time limit reached" if status == _LIMIT else "no binary vector fits"
            failed.append(f"client {i} ({reason})")
            columns.append(np.zeros(t))
            unique.append(None)
            alternatives.append(None)
            seconds.append(time.perf_counter() - began)
            continue
        columns.append(p)
        other = None
        if check_unique:
            status2, q = _solve_column(
                complement, windows, counts[i], tolerance=tolerance, time_limit=time_limit, exclude=p
            )
            verdict = {_INFEASIBLE: True, _OPTIMAL: False}.get(status2)
            other = torch.from_numpy(q).to(torch.int64) if verdict is False and q is not None else None
        else:
            verdict = None
        unique.append(verdict)
        alternatives.append(other)
        seconds.append(time.perf_counter() - began)
    if failed:
        raise AttackError(
            f"no participation vector found for {', '.join(failed)}: no binary vector with the client's counts "
            f"lies within tolerance={tolerance:g} of the aggregates' span; for noisy or slowly changing updates "
            "raise tolerance, otherwise the counts or the rounds are not those of these aggregates"
        )

    p_hat = np.stack(columns, axis=1)
    u_hat, *_ = np.linalg.lstsq(p_hat, g, rcond=None)
    norm = float(np.linalg.norm(g))
    fit = float(np.linalg.norm(g - p_hat @ u_hat)) / norm if norm > 0 else 0.0
    residuals = np.abs(complement.T @ p_hat).max(axis=0) if complement.shape[1] else np.zeros(n)
    checks = {
        "full_rank": int(np.linalg.matrix_rank(p_hat)) == n,
        "distinct_columns": len({col.tobytes() for col in p_hat.T}) == n,
    }
    if observation.round_sizes is not None:
        checks["round_sizes"] = bool(np.array_equal(p_hat.sum(axis=1), observation.round_sizes.cpu().numpy()))
    flat = torch.from_numpy(u_hat)
    layout = observation.layout
    updates = tuple(layout.unflatten(flat[i]) for i in range(n)) if layout is not None else None
    return Disaggregation(
        participants=torch.from_numpy(p_hat).to(torch.int64),
        flat_updates=flat,
        updates=updates,
        residuals=torch.from_numpy(np.asarray(residuals, dtype=np.float64)),
        unique=tuple(unique),
        alternatives=tuple(alternatives),
        fit=fit,
        rank=rank,
        tolerance=float(tolerance),
        seconds=time.perf_counter() - start,
        column_seconds=tuple(seconds),
        checks=checks,
    )


def client_observation(observation: RoundsObservation, result: Disaggregation, client: int) -> Observation:
    """Client ``client``'s recovered update as a single-client :class:`~gradinv.types.Observation` (the sent
    model, its parameters and buffers, the protocol and that client's knowledge), for any gradinv attack."""
    if observation.sent is None or observation.layout is None:
        raise ConfigError(
            "this RoundsObservation does not record the sent model: simulate the rounds from the clients' "
            "Observations (Scenario.observe()) to attack a recovered update"
        )
    if not 0 <= int(client) < observation.clients:
        raise ConfigError(f"client must be in 0..{observation.clients - 1}, got {client!r}")
    sent = observation.sent
    knowledge = observation.knowledge[client] if observation.knowledge is not None else Knowledge()
    update = observation.layout.unflatten(result.flat_updates[client])
    device = next(iter(sent.parameters.values())).device
    return Observation(
        model=sent.model,
        parameters=sent.parameters,
        buffers=sent.buffers,
        update={k: v.to(device) for k, v in update.items()},
        protocol=sent.protocol,
        knowledge=knowledge,
        train_mode=sent.train_mode,
        defenses=sent.defenses,
        clients=1,
    )


__all__ = [
    "TABLE1",
    "Disaggregation",
    "RoundsObservation",
    "RoundsTruth",
    "SentModel",
    "UpdateLayout",
    "client_observation",
    "disaggregate",
    "participation_counts",
    "simulate_rounds",
]
