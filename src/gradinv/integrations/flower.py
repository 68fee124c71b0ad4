"""Flower integration (``pip install gradinv[flower]``): audit a federation's server, defend its clients.

Written against Flower's Message API (flwr >= 1.21; tested with 1.42 and its simulation extra):

- :class:`AuditStrategy` wraps any Message-API strategy (``flwr.serverapp.strategy.FedAvg``...). Before the
  inner strategy aggregates a round, each client's reply becomes an :class:`~gradinv.types.Observation`: the
  arrays the server sent that round, the client's returned arrays as a delta, the public train config (which
  says the protocol, :func:`train_config`) and the reported ``num-examples``. An :class:`Auditor` runs the label
  method and the attacks on it and writes per-round, per-client records through the experiments
  :class:`~gradinv.experiments.store.Store`. It never holds the truth.
- :class:`LegacyAuditStrategy` does the same for a legacy ``flwr.server.strategy.Strategy`` run by
  ``DefaultWorkflow(fit_workflow=SecAggPlusWorkflow(...))`` on a ``LegacyContext``: with Flower's SecAgg+ the
  strategy's ``aggregate_fit`` receives only the unmasked aggregate (every result carries the same arrays), which
  the audit attacks as one batch of all clients' samples (``Observation(clients=N)``).
- :func:`defense_mod` turns a gradinv update defense into a Flower mod: it applies the defense's pure function to
  the client's delta (returned - sent) and returns sent + defended delta; mods compose with Flower's own.
- :func:`make_client_app` is an example client on a shard of bundled data (FedSGD: one step of ``lr`` on its
  batch, so delta = -lr * gradient; FedAvg: K local steps), which also writes the truth of each round to a side
  folder the audit never reads; :func:`evaluate_audit` joins it afterwards (PSNR, labels).
- :func:`run_flower_demo` is ``gradinv flower-demo``: a complete simulated federation with the audit on.

The protocol travels in the public train config: ``protocol`` (``"fedsgd"`` or ``"fedavg"``), ``lr``,
``local-steps`` and ``local-batch-size`` (0: the whole batch). A FedSGD client takes one SGD step of ``lr`` and
returns its new weights, so the server reads its gradient as ``-(returned - sent) / lr``; a FedAvg client's
delta is observed as it is.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import statistics
import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from gradinv.errors import ConfigError, GradinvError

try:
    import flwr.compat.common.recorddict_compat as compat
    from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.server.strategy import Strategy as LegacyStrategy
    from flwr.serverapp.strategy import Strategy
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ConfigError(
        f"the Flower integration needs flwr with its simulation extra ({exc}): pip install 'gradinv[flower]'"
    ) from None

from gradinv.attacks import Attack, build_attack
from gradinv.attacks.labels import check_methods, recover_labels
from gradinv.defenses import Defense, UpdateDefense, as_defense
from gradinv.experiments.case import Case, ModelCache, Seeds, num_classes
from gradinv.experiments.store import Store
from gradinv.fl.functional import stateless_twin
from gradinv.fl.malicious import parse_server
from gradinv.fl.protocols import client_update
from gradinv.io import write_json_atomic
from gradinv.protocol import FedAvg, FedSGD, Protocol
from gradinv.types import Knowledge, Normalization, Observation, as_defenses

#: the key of the public number of examples in a reply's MetricRecord (Flower's FedAvg weights by it)
NUM_EXAMPLES = "num-examples"
#: the legacy (FitIns/FitRes) record names, used by Flower's DefaultWorkflow and SecAgg+
LEGACY_INS, LEGACY_RES = "fitins.parameters", "fitres.parameters"
AGGREGATE = "aggregate"  # the client field of an audit record made on a securely aggregated round
TEST_FRACTION = 0.2  # the bundled data's held-out share for the federation's test accuracy


# -- conversion --------------------------------------------------------------------------------------------------


def state_to_arrays(state: Mapping[str, Tensor]) -> ArrayRecord:
    """A state dict (parameters and buffers by name) as an ArrayRecord keyed by the same names."""
    return ArrayRecord({k: Array(v.detach().cpu().contiguous().numpy().copy()) for k, v in state.items()})


def arrays_to_state(record: ArrayRecord) -> dict[str, Tensor]:
    """An ArrayRecord as tensors by name (copies: the record is left as it is)."""
    return {k: torch.from_numpy(np.array(record[k].numpy(), copy=True)) for k in record}


def ndarrays_to_state(template: Mapping[str, Tensor], ndarrays: Sequence[np.ndarray]) -> dict[str, Tensor]:
    """Legacy (unnamed, ordered) arrays as a state dict named after ``template``'s order, shapes checked."""
    if len(ndarrays) != len(template):
        raise ConfigError(f"got {len(ndarrays)} arrays for a model of {len(template)} tensors: is it the same model?")
    out = {}
    for (name, ref), arr in zip(template.items(), ndarrays, strict=True):
        t = torch.from_numpy(np.array(arr, copy=True))
        if tuple(t.shape) != tuple(ref.shape):
            raise ConfigError(f"array for {name!r} has shape {tuple(t.shape)}, the model's {tuple(ref.shape)}")
        out[name] = t.to(ref.dtype)
    return out


def _only(records: Mapping[str, Any], what: str) -> tuple[str, Any]:
    if len(records) != 1:
        raise ConfigError(f"expected one {what} in the message, found {sorted(records)}: send one")
    return next(iter(records.items()))


# -- the protocol in the public train config ---------------------------------------------------------------------


def train_config(protocol: Protocol, *, lr: float = 0.1) -> ConfigRecord:
    """The public train config that tells clients (and the audit) the protocol: FedSGD is one SGD step of ``lr``
    on the client's batch; FedAvg's own ``lr``, local steps and local batch size are used (``lr`` ignored)."""
    if isinstance(protocol, FedAvg):
        return ConfigRecord(
            {
                "protocol": "fedavg",
                "lr": float(protocol.lr),
                "local-steps": int(protocol.local_steps),
                "local-batch-size": int(protocol.local_batch_size or 0),
            }
        )
    if not lr > 0:
        raise ConfigError(f"a FedSGD client steps with a positive lr, got {lr}")
    return ConfigRecord({"protocol": "fedsgd", "lr": float(lr), "local-steps": 1, "local-batch-size": 0})


def protocol_from_config(config: Mapping[str, Any]) -> tuple[Protocol, float]:
    """The protocol a train config describes, and the client's step size (FedSGD: delta = -lr * gradient)."""
    name = config.get("protocol")
    lr = config.get("lr")
    if name not in ("fedsgd", "fedavg") or not isinstance(lr, int | float) or not lr > 0:
        raise ConfigError(
            f"the train config must say 'protocol' ('fedsgd' or 'fedavg') and a positive 'lr', got "
            f"{dict(config)}: build it with gradinv.integrations.flower.train_config(...)"
        )
    if name == "fedsgd":
        return FedSGD(), float(lr)
    b = int(config.get("local-batch-size", 0) or 0)
    return FedAvg(local_steps=int(config.get("local-steps", 1)), lr=float(lr), local_batch_size=b or None), float(lr)


def observed_update(delta: Mapping[str, Tensor], protocol: Protocol, lr: float) -> dict[str, Tensor]:
    """What the protocol shares, from the weight delta: FedSGD's gradient ``-delta / lr``, FedAvg's delta."""
    if isinstance(protocol, FedSGD):
        return {k: -v / lr for k, v in delta.items()}
    return dict(delta)


# -- the audit, framework-free ----------------------------------------------------------------------------------


@dataclasses.dataclass
class Auditor:
    """Runs a label method and attacks on what the server observes, and writes the records.

    ``model`` is the architecture (its weights are replaced by what the server sent each round);
    ``input_shape`` and ``normalization`` are the public facts an attacker needs. ``defenses`` are the clients'
    defenses as the server knows them (public protocol metadata; empty: the audit assumes none). ``rounds`` and
    ``clients`` limit the audit (None: all); ``max_clients`` audits at most that many clients a round (the lowest
    ids). ``out`` (optional) is the results store: ``results.sqlite``, ``reconstructions/*.safetensors`` and the
    model sent each round under ``sent/``. ``seed`` is every attack's seed.
    """

    model: nn.Module
    input_shape: tuple[int, ...]
    normalization: Normalization | None
    attacks: Sequence[Attack | str] = ("idlg",)
    label_method: str = "auto"
    defenses: Sequence[Defense | str] = ()
    rounds: Collection[int] | None = None
    clients: Collection[int] | None = None
    max_clients: int | None = None
    out: str | Path | None = None
    seed: int = 0
    records: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    seconds: dict[int, float] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        self.attacks = tuple(build_attack(a) if isinstance(a, str) else a for a in self.attacks)
        check_methods([self.label_method])
        self.defenses = as_defenses(self.defenses)
        if self.max_clients is not None and self.max_clients < 0:
            raise ConfigError(f"max_clients must be >= 0 or None, got {self.max_clients}")
        self._template = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self._params = [n for n, _ in self.model.named_parameters()]

    @property
    def template(self) -> dict[str, Tensor]:
        """The model's state names, in order, with shapes and dtypes (to name legacy arrays)."""
        return self._template

    def wants(self, server_round: int, client: int | str) -> bool:
        """Whether this round and client are audited (before any ``max_clients`` cut)."""
        if self.rounds is not None and server_round not in self.rounds:
            return False
        return not (self.clients is not None and client != AGGREGATE and client not in self.clients)

    def select(self, server_round: int, clients: Iterable[int]) -> list[int]:
        """The clients of a round the audit looks at, lowest ids first."""
        chosen = sorted(c for c in clients if self.wants(server_round, c))
        return chosen if self.max_clients is None else chosen[: self.max_clients]

    def observation(
        self,
        sent: Mapping[str, Tensor],
        returned: Mapping[str, Tensor],
        config: Mapping[str, Any],
        num_examples: int,
        *,
        clients: int = 1,
    ) -> Observation:
        """What the server observes of one reply (or of the secure aggregate of ``clients`` replies)."""
        protocol, lr = protocol_from_config(config)
        model = copy.deepcopy(self.model)
        model.load_state_dict({k: v.to(self._template[k].dtype) for k, v in sent.items()})
        params = {n: sent[n].detach().clone() for n in self._params}
        buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
        delta = {n: (returned[n].to(params[n].dtype) - params[n]) for n in self._params}
        return Observation(
            model=model,
            parameters=params,
            buffers=buffers,
            update=observed_update(delta, protocol, lr),
            protocol=protocol,
            knowledge=Knowledge(
                input_shape=tuple(self.input_shape), num_samples=int(num_examples), normalization=self.normalization
            ),
            defenses=self.defenses,
            clients=clients,
        )

    def save_sent(self, server_round: int, sent: Mapping[str, Tensor]) -> None:
        """Keep the model sent this round (``sent/round-RRR.safetensors``): what the server holds anyway."""
        if self.out is not None:
            from gradinv.io import save_update

            save_update(sent, Path(self.out) / "sent" / f"round-{server_round:03d}.safetensors")

    def audit(self, server_round: int, client: int | str, observation: Observation) -> list[dict[str, Any]]:
        """Label method then every attack on ``observation``; returns (and stores) one record per attack. A
        decline (the attack does not apply) and a failure are recorded, never raised: the federation goes on."""
        start = time.perf_counter()
        n = observation.knowledge.num_samples
        labels, label_source, label_reason = None, None, None
        try:
            estimate = recover_labels(observation, method=self.label_method)
            labels, label_source = estimate.as_batch(int(n)), estimate.method
        except GradinvError as exc:
            label_reason = str(exc)
        seen = observation if labels is None else observation.with_knowledge(labels=labels)
        out = []
        for attack in self.attacks:
            key = f"round-{server_round:03d}-client-{client}-{attack.name}"
            record: dict[str, Any] = {
                "key": key,
                "round": server_round,
                "client": client,
                "clients": observation.clients,
                "num_samples": n,
                "protocol": observation.protocol.to_dict(),
                "defenses": [d.spec() for d in observation.defenses],
                "attack": attack.name,
                "label_method": label_source or self.label_method,
                "labels_recovered": labels.tolist() if labels is not None else None,
                "label_reason": label_reason,
                "status": "ok",
                "reason": None,
                "cost": None,
                "seconds": None,
                "reconstruction": None,
            }
            reasons = attack.applicable(seen)
            if reasons:
                record.update(status="declined", reason="; ".join(reasons))
            else:
                try:
                    rec = attack.reconstruct(seen, seed=self.seed)
                except GradinvError as exc:
                    record.update(status="failed", reason=str(exc))
                else:
                    record.update(
                        cost=rec.trace[-1].cost if rec.trace else None,
                        seconds=round(rec.seconds, 3),
                        attack_labels=rec.labels.tolist() if rec.labels is not None else None,
                    )
                    if self.out is not None:
                        from gradinv.io import save_update

                        tensors = {"images": rec.images.detach().cpu().float()}
                        if rec.labels is not None:
                            tensors["labels"] = rec.labels.detach().cpu()
                        relative = f"reconstructions/{key}.safetensors"
                        save_update(tensors, Path(self.out) / relative)
                        record["reconstruction"] = relative
                    record["_images"] = rec.images.detach().cpu()
            out.append(record)
        for record in out:
            stored = {k: v for k, v in record.items() if not k.startswith("_")}
            if self.out is not None:
                with Store(self.out) as store:
                    store.add(stored)
            self.records.append(record)
        self.seconds[server_round] = self.seconds.get(server_round, 0.0) + time.perf_counter() - start
        return out


# -- server: the auditing strategies ----------------------------------------------------------------------------


class AuditStrategy(Strategy):
    """A Message-API strategy that audits each client's reply before ``inner`` aggregates it.

    Every other call goes to ``inner`` unchanged, so any strategy (FedAvg, FedProx, a DP wrapper...) can be
    audited. ``bytes_received[round]`` holds the ArrayRecord bytes of each reply (what a client sent),
    ``round_seconds[round]`` the round's time from sending to aggregating (the audit included).
    """

    def __init__(self, inner: Strategy, auditor: Auditor) -> None:
        self.inner = inner
        self.auditor = auditor
        self._sent: dict[int, tuple[ArrayRecord, ConfigRecord]] = {}
        self._states: dict[int, dict[str, Tensor]] = {}
        self.bytes_received: dict[int, list[int]] = {}
        #: seconds from sending a round's train messages to its aggregate (the clients' work and the audit)
        self.round_seconds: dict[int, float] = {}
        self._started = 0.0

    def __getattr__(self, name: str) -> Any:
        inner = self.__dict__.get("inner")
        if inner is None:
            raise AttributeError(name)
        return getattr(inner, name)

    def summary(self) -> None:
        self.inner.summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid) -> Iterable[Message]:
        self._started = time.perf_counter()
        messages = list(self.inner.configure_train(server_round, arrays, config, grid))
        self._sent, self._states = {}, {}
        for m in messages:
            _, record = _only(m.content.array_records, "ArrayRecord")
            _, cfg = _only(m.content.config_records, "ConfigRecord")
            self._sent[m.metadata.dst_node_id] = (record, ConfigRecord(dict(cfg)))
        return messages

    def _state(self, record: ArrayRecord) -> dict[str, Tensor]:
        if id(record) not in self._states:
            self._states[id(record)] = arrays_to_state(record)
        return self._states[id(record)]

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[Any, Any]:
        replies = list(replies)
        ok = {m.metadata.src_node_id: m for m in replies if not m.has_error()}
        self.bytes_received[server_round] = [
            sum(r.count_bytes() for r in m.content.array_records.values()) for m in ok.values()
        ]
        chosen = self.auditor.select(server_round, [n for n in ok if n in self._sent])
        saved = False
        for node in chosen:
            sent_record, config = self._sent[node]
            sent = self._state(sent_record)
            if not saved:
                self.auditor.save_sent(server_round, sent)
                saved = True
            content = ok[node].content
            _, returned = _only(content.array_records, "ArrayRecord")
            key = getattr(self.inner, "weighted_by_key", NUM_EXAMPLES)
            metrics = next((r for r in content.metric_records.values() if key in r), None)
            if metrics is None:
                continue  # no public number of examples: nothing to size the batch by
            observation = self.auditor.observation(sent, arrays_to_state(returned), config, int(metrics[key]))
            self.auditor.audit(server_round, node, observation)
        result = self.inner.aggregate_train(server_round, replies)
        self.round_seconds[server_round] = time.perf_counter() - self._started
        return result

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid):
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]):
        return self.inner.aggregate_evaluate(server_round, replies)


class LegacyAuditStrategy(LegacyStrategy):
    """A legacy strategy (``flwr.server.strategy``) that audits what ``aggregate_fit`` receives.

    With ``secure_aggregation`` (Flower's ``SecAggPlusWorkflow``), every result carries the same unmasked
    aggregate: the audit attacks it once, as one batch of all clients' samples (``clients=N``), and
    ``received[round]`` keeps what each result carried, to check that no client's own update arrives. Without
    it, each client's result is audited as :class:`AuditStrategy` does.
    """

    def __init__(self, inner: LegacyStrategy, auditor: Auditor, *, secure_aggregation: bool = True) -> None:
        self.inner = inner
        self.auditor = auditor
        self.secure_aggregation = secure_aggregation
        self._sent: dict[str, Tensor] | None = None
        self._config: dict[str, Any] = {}
        self.received: dict[int, list[dict[str, Tensor]]] = {}

    def __getattr__(self, name: str) -> Any:
        inner = self.__dict__.get("inner")
        if inner is None:
            raise AttributeError(name)
        return getattr(inner, name)

    def initialize_parameters(self, client_manager):
        return self.inner.initialize_parameters(client_manager)

    def configure_fit(self, server_round: int, parameters, client_manager):
        instructions = self.inner.configure_fit(server_round, parameters, client_manager)
        self._sent = ndarrays_to_state(self.auditor.template, parameters_to_ndarrays(parameters))
        self._config = dict(instructions[0][1].config) if instructions else {}
        return instructions

    def aggregate_fit(self, server_round: int, results, failures):
        states = [ndarrays_to_state(self.auditor.template, parameters_to_ndarrays(r.parameters)) for _, r in results]
        self.received[server_round] = states
        if results and self._sent is not None and self.auditor.wants(server_round, AGGREGATE):
            self.auditor.save_sent(server_round, self._sent)
            if self.secure_aggregation:
                total = sum(int(r.num_examples) for _, r in results)
                obs = self.auditor.observation(self._sent, states[0], self._config, total, clients=len(results))
                self.auditor.audit(server_round, AGGREGATE, obs)
            else:
                nodes = {int(p.node_id): (s, r) for (p, r), s in zip(results, states, strict=True)}
                for node in self.auditor.select(server_round, nodes):
                    state, res = nodes[node]
                    obs = self.auditor.observation(self._sent, state, self._config, int(res.num_examples))
                    self.auditor.audit(server_round, node, obs)
        return self.inner.aggregate_fit(server_round, results, failures)

    def configure_evaluate(self, server_round: int, parameters, client_manager):
        return self.inner.configure_evaluate(server_round, parameters, client_manager)

    def aggregate_evaluate(self, server_round: int, results, failures):
        return self.inner.aggregate_evaluate(server_round, results, failures)

    def evaluate(self, server_round: int, parameters):
        return self.inner.evaluate(server_round, parameters)


# -- client: defenses as mods ------------------------------------------------------------------------------------


def _update_only(defense: Defense | str) -> UpdateDefense:
    d = as_defense(defense)
    if d.stage != "update" or getattr(d, "retrains", False) or d.name == "soteria":
        raise ConfigError(
            f"{d.name} cannot be a Flower mod: a mod sees only the update, and {d.name} "
            + ("acts on the client's data or model" if d.stage != "update" else "needs the client's batch or training")
            + "; use an update defense that transforms the update alone (noise, prune, sign)"
        )
    return d


def _seed_of(*parts: int) -> int:
    h = 1469598103934665603
    for p in parts:
        h = ((h ^ (int(p) & 0xFFFFFFFFFFFF)) * 1099511628211) % (1 << 63)
    return h


def defense_mod(defense: Defense | str, *, seed: int = 0) -> Callable[[Message, Context, Callable], Message]:
    """A Flower mod applying a gradinv update defense (object or spec such as ``"noise:0.01"``) to the client's
    delta: the mod calls the rest of the app, then returns ``sent + defense(returned - sent)``. Its randomness is
    seeded by ``seed``, the round and the node, so a run repeats. Works with Message-API and legacy (FitIns)
    train messages; put it after ``secaggplus_mod`` so the defended update is what gets masked."""
    d = _update_only(defense)

    def mod(msg: Message, context: Context, call_next: Callable[[Message, Context], Message]) -> Message:
        reply = call_next(msg, context)
        if msg.metadata.message_type != "train" or reply.has_error() or not msg.content.array_records:
            return reply
        sent_key, sent = _only(msg.content.array_records, "ArrayRecord")
        key, returned = _only(reply.content.array_records, "ArrayRecord")
        if list(sent.keys()) != list(returned.keys()):
            raise ConfigError(f"{d.name} mod: the reply's arrays are not named as the sent ones")
        sent_t, returned_t = arrays_to_state(sent), arrays_to_state(returned)
        config = next(iter(msg.content.config_records.values()), {})
        server_round = int(config.get("server-round", 0)) if hasattr(config, "get") else 0
        floats = [k for k, v in sent_t.items() if v.is_floating_point()]
        delta = {k: returned_t[k] - sent_t[k] for k in floats}
        generator = torch.Generator().manual_seed(_seed_of(seed, server_round, context.node_id))
        defended = d.transform(delta, client=None, generator=generator)
        out = {k: (sent_t[k] + defended[k]) if k in defended else returned_t[k] for k in returned_t}
        reply.content.array_records[key] = state_to_arrays(out)
        return reply

    mod.__name__ = f"gradinv_{d.name}_mod"
    mod.__qualname__ = mod.__name__
    return mod


# -- client: the example client on bundled data -----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Federation:
    """The simulated federation's data and model: ``case`` names the model, the bundled data, the image size and
    the seeds (the model's; the data seed shuffles the split); ``clients`` shards of the training part, each
    client drawing ``batch_size`` samples of its shard a round; the rest is the server's test set.

    A malicious ``case.server`` (``"imprint:64"``: Robbing the Fed; ``"trap"``: trap weights,
    :mod:`gradinv.fl.malicious`) modifies the model before the first round, fitted to the server's own
    held-out images (the test set, disjoint from every client's shard): the federation then trains, and the
    audit attacks, the model as that server sends it (``rtf``, ``trap-weights``)."""

    case: Case
    clients: int
    batch_size: int

    def __post_init__(self) -> None:
        if self.clients < 1 or self.batch_size < 1:
            raise ConfigError(f"need at least 1 client and a batch of 1, got {self.clients} and {self.batch_size}")

    def build(self) -> dict[str, Any]:
        """The model, normalised images, labels, shards and test indices (cached per process)."""
        key = (self.case, self.clients, self.batch_size)
        if key not in _WORLDS:
            cache = ModelCache()
            classes = num_classes(self.case, cache)
            model = cache.model(self.case, num_classes=classes)
            data = cache.dataset(self.case.data, self.case.image_size)
            n = len(data)
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.case.seeds.data))
            test = order[: max(1, int(n * TEST_FRACTION))]
            train = order[len(test) :]
            shard = len(train) // self.clients
            if shard < self.batch_size:
                raise ConfigError(
                    f"{self.clients} clients of {len(train)} training images hold {shard} each, fewer than a batch of "
                    f"{self.batch_size}: lower --clients or --batch-size"
                )
            server = parse_server(
                self.case.server,
                input_shape=tuple(data.images.shape[1:]),
                normalization=data.normalization,
                auxiliary=data.normalization.normalize(data.images[test]),
            )
            _WORLDS[key] = {
                "model": model if server is None else server.modify(model),
                "images": data.images,
                "inputs": data.normalization.normalize(data.images),
                "labels": data.labels,
                "normalization": data.normalization,
                "shards": [train[i * shard : (i + 1) * shard] for i in range(self.clients)],
                "test": test,
            }
        return _WORLDS[key]


_WORLDS: dict[tuple, dict[str, Any]] = {}


def local_training(
    model: nn.Module, state: Mapping[str, Tensor], inputs: Tensor, labels: Tensor, protocol: Protocol, lr: float
) -> dict[str, Tensor]:
    """The client's new state after its round: gradinv's own :func:`~gradinv.fl.protocols.client_update` (the
    code the attacks replay), FedSGD as one SGD step of ``lr``. Buffers are returned unchanged."""
    names = [n for n, _ in model.named_parameters()]
    params = {n: state[n].detach().clone() for n in names}
    buffers = {n: state[n].detach().clone() for n, _ in model.named_buffers()}
    twin = stateless_twin(model, train_mode=False)
    with torch.no_grad():
        update = client_update(protocol, twin, params, buffers, inputs, labels)
    if isinstance(protocol, FedSGD):
        update = {k: -lr * v for k, v in update.items()}
    return {k: (params[k] + update[k]).detach() if k in params else v.detach().clone() for k, v in state.items()}


def truth_path(truth_dir: str | Path, server_round: int, node_id: int) -> Path:
    """Where the example client writes a round's truth (its batch, labels and undefended delta)."""
    return Path(truth_dir) / f"round-{server_round:03d}" / f"node-{node_id}.safetensors"


def make_client_app(
    federation: Federation,
    *,
    defenses: Sequence[Defense | str] = (),
    mods: Sequence[Callable] = (),
    secagg: bool = False,
    truth_dir: str | Path | None = None,
    seed: int = 0,
) -> ClientApp:
    """The example ClientApp: each node trains on its shard (``partition-id`` in simulation) under the protocol
    of the train config, with gradinv's update ``defenses`` as mods. ``mods`` (Flower's own, e.g.
    ``arrays_size_mod``) wrap everything; ``secagg`` adds Flower's ``secaggplus_mod`` outside the defenses (the
    defended update is what gets masked). ``truth_dir``: where each client writes its private batch and
    undefended delta every round, for evaluation afterwards (the audit never reads it). The ``defenses`` act in
    the order given, as in a :class:`~gradinv.fl.Scenario`."""
    chain = list(mods)
    if secagg:
        from flwr.client.mod import secaggplus_mod

        chain.append(secaggplus_mod)
    chain += [defense_mod(d, seed=seed) for d in reversed(defenses)]  # the last mod acts first on the reply
    app = ClientApp(mods=chain)
    truth = None if truth_dir is None else str(truth_dir)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        world = federation.build()
        legacy = LEGACY_INS in msg.content.array_records
        model = world["model"]
        if legacy:
            ins = compat.recorddict_to_fitins(msg.content, keep_input=True)
            sent = ndarrays_to_state(model.state_dict(), parameters_to_ndarrays(ins.parameters))
            config: Mapping[str, Any] = ins.config
        else:
            _, record = _only(msg.content.array_records, "ArrayRecord")
            sent = arrays_to_state(record)
            config = _only(msg.content.config_records, "ConfigRecord")[1]
        protocol, lr = protocol_from_config(config)
        server_round = int(config.get("server-round", 0))
        partition = int(context.node_config.get("partition-id", 0)) % federation.clients
        shard = world["shards"][partition]
        g = torch.Generator().manual_seed(_seed_of(seed, server_round, partition))
        index = shard[torch.randperm(len(shard), generator=g)[: federation.batch_size]]
        inputs, labels = world["inputs"][index], world["labels"][index]
        new = local_training(model, sent, inputs, labels, protocol, lr)
        if truth is not None:
            from gradinv.io import save_update

            tensors = {"images": world["images"][index], "labels": labels}
            tensors.update({f"delta.{k}": new[k] - sent[k] for k in sent if sent[k].is_floating_point()})
            save_update(tensors, truth_path(truth, server_round, context.node_id), metadata={"partition": partition})
        n = int(index.numel())
        if legacy:
            params = ndarrays_to_parameters([v.numpy() for v in new.values()])
            res = FitRes(status=Status(code=Code.OK, message="ok"), parameters=params, num_examples=n, metrics={})
            return Message(content=compat.fitres_to_recorddict(res, keep_input=True), reply_to=msg)
        content = RecordDict({"arrays": state_to_arrays(new), "metrics": MetricRecord({NUM_EXAMPLES: n})})
        return Message(content=content, reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        world = federation.build()
        _, record = _only(msg.content.array_records, "ArrayRecord")
        partition = int(context.node_config.get("partition-id", 0)) % federation.clients
        shard = world["shards"][partition]
        acc = accuracy(world["model"], arrays_to_state(record), world["inputs"][shard], world["labels"][shard])
        metrics = MetricRecord({"accuracy": acc, NUM_EXAMPLES: int(shard.numel())})
        return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)

    return app


def accuracy(model: nn.Module, state: Mapping[str, Tensor], inputs: Tensor, labels: Tensor) -> float:
    """Top-1 accuracy of ``model`` with ``state`` on a labelled set (eval mode, no gradients)."""
    net = copy.deepcopy(model)
    net.load_state_dict({k: v.to(net.state_dict()[k].dtype) for k, v in state.items()})
    net.eval()
    with torch.no_grad():
        predicted = torch.cat([net(inputs[i : i + 256]).argmax(dim=1) for i in range(0, len(inputs), 256)])
    return float((predicted == labels).double().mean())


# -- evaluation: join the truth afterwards -----------------------------------------------------------------------


def _load(path: Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def evaluate_audit(audit_dir: str | Path, truth_dir: str | Path) -> list[dict[str, Any]]:
    """The audit's records scored against the truth the example clients wrote: the mean PSNR of the aligned
    reconstruction, the best-match PSNR per true image and the share above 40 dB, the label accuracy. An
    aggregate's truth is every client's batch of that round."""
    from gradinv.attacks.imprint import score_recovered
    from gradinv.metrics import label_accuracy, score_images

    with Store(audit_dir) as store:
        records = store.records()
    out = []
    for r in records:
        row = {k: r.get(k) for k in ("round", "client", "clients", "num_samples", "attack", "status", "reason")}
        row.update(labels_recovered=r.get("labels_recovered"), cost=r.get("cost"), seconds=r.get("seconds"))
        folder = Path(truth_dir) / f"round-{int(r['round']):03d}"
        if r["client"] == AGGREGATE:
            files = sorted(folder.glob("node-*.safetensors"))
        else:
            files = [truth_path(truth_dir, int(r["round"]), int(r["client"]))]
        truths = [_load(f) for f in files if f.is_file()]
        if truths:
            images = torch.cat([t["images"] for t in truths])
            labels = torch.cat([t["labels"] for t in truths])
            row["labels_true"] = labels.tolist()
            if r.get("labels_recovered") is not None:
                row["label_accuracy"] = label_accuracy(torch.tensor(r["labels_recovered"]), labels)
            if r.get("reconstruction"):
                rec = _load(Path(audit_dir) / r["reconstruction"])["images"]
                found = score_recovered(rec, images)
                row["psnr_best_match"] = float(found.psnr.mean())
                row["recovered_fraction_40db"] = found.fraction
                if rec.shape == images.shape:
                    row["psnr"] = score_images(rec, images).mean_psnr
        out.append(row)
    return out


# -- the demo ----------------------------------------------------------------------------------------------------


def _quiet_flower(verbose: bool) -> None:
    import logging

    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    if not verbose:
        logging.getLogger("flwr").setLevel(logging.WARNING)


def run_flower_demo(
    *,
    out: str | Path,
    clients: int = 2,
    rounds: int = 2,
    model: str = "lenet",
    data: str = "digits",
    image_size: int = 16,
    server: str = "honest",
    batch_size: int = 1,
    local_steps: int = 1,
    lr: float = 0.1,
    defenses: Sequence[Defense | str] = (),
    secagg: bool = False,
    attacks: Sequence[str] = ("idlg",),
    attack_settings: Mapping[str, Mapping[str, Any]] | None = None,
    label_method: str = "auto",
    audit: bool = True,
    audit_rounds: Collection[int] | None = None,
    audit_clients: int | None = None,
    seed: int = 0,
    num_cpus: int | None = None,
    verbose: bool = False,
) -> dict[str, Any]:
    """A simulated Flower federation with the audit on (``gradinv flower-demo``).

    ``clients`` nodes train ``model`` on shards of bundled ``data`` for ``rounds`` rounds; each draws
    ``batch_size`` samples a round and runs FedSGD (``local_steps`` 1: one step of ``lr``) or FedAvg
    (``local_steps`` K > 1, full batch); ``defenses`` (update defenses) run as client mods; ``secagg`` runs
    Flower's SecAgg+ (at least 2 clients), so the audit sees only the aggregate. A malicious ``server``
    (``"imprint:64"``, ``"trap"``) sends its modified model from round 1 (:class:`Federation`); audit it with
    ``rtf`` or ``trap-weights``. The audit runs ``attacks``
    (settings by name in ``attack_settings``) after ``label_method``, on ``audit_rounds`` (None: all) and at most
    ``audit_clients`` clients a round. Writes ``out/audit/`` (the results store and reconstructions),
    ``out/truth/`` (the clients' side record), ``out/audit.json`` (per round and client: attack, PSNR against the
    truth joined afterwards, labels) and ``out/report.md``; returns the summary.
    """
    if secagg and clients < 2:
        raise ConfigError(f"SecAgg+ aggregates 2 clients or more: use --clients 2 or more (got {clients})")
    if rounds < 1 or local_steps < 1:
        raise ConfigError(f"--rounds and --local-steps must be >= 1, got {rounds} and {local_steps}")
    defenses = tuple(_update_only(d) for d in defenses)
    settings = dict(attack_settings or {})
    unknown = sorted(set(settings) - set(attacks))
    if unknown:
        raise ConfigError(f"attack settings given for {unknown}, which the audit does not run: add them to --attacks")
    built = [build_attack(a, **dict(settings.get(a, {}))) for a in attacks]
    case = Case(model=model, data=data, image_size=image_size, server=server, seeds=Seeds.all(seed))
    federation = Federation(case, clients, batch_size)
    world = federation.build()
    protocol: Protocol = FedSGD() if local_steps == 1 else FedAvg(local_steps=local_steps, lr=lr)
    out = Path(out)
    audit_dir, truth_dir = out / "audit", out / "truth"
    for folder in (audit_dir, truth_dir):
        if folder.exists() and any(folder.iterdir()):
            raise ConfigError(f"'{folder}' already holds a run: choose another --out or delete it")
    auditor = Auditor(
        model=world["model"],
        input_shape=tuple(world["inputs"].shape[1:]),
        normalization=world["normalization"],
        attacks=built,
        label_method=label_method,
        defenses=defenses,
        rounds=(set(audit_rounds) if audit_rounds is not None else None) if audit else set(),
        max_clients=audit_clients,
        out=audit_dir,
        seed=seed,
    )
    _quiet_flower(verbose)
    start = time.perf_counter()
    history = simulate(
        federation,
        auditor,
        protocol=protocol,
        lr=lr,
        rounds=rounds,
        defenses=defenses,
        secagg=secagg,
        truth_dir=truth_dir,
        seed=seed,
        num_cpus=num_cpus,
    )
    wall = time.perf_counter() - start
    rows = evaluate_audit(audit_dir, truth_dir) if audit_dir.exists() else []
    summary = {
        "config": {
            "clients": clients,
            "rounds": rounds,
            "model": model,
            "data": data,
            "image_size": image_size,
            "server": server,
            "batch_size": batch_size,
            "protocol": protocol.to_dict() if local_steps > 1 else {"name": "fedsgd", "lr": lr},
            "defenses": [d.spec() for d in defenses],
            "secagg": secagg,
            "attacks": [a.name for a in built],
            "label_method": label_method,
            "seed": seed,
        },
        "accuracy": history["accuracy"],
        "accuracy_initial": history["accuracy_initial"],
        "wall_seconds": wall,
        "audit_seconds_per_round": {str(k): v for k, v in sorted(auditor.seconds.items())},
        "bytes_per_client_per_round": history["bytes"],
        "round_seconds": {str(k): v for k, v in sorted(history["round_seconds"].items())},
        "audit": rows,
    }
    write_json_atomic(summary, out / "audit.json")
    from gradinv._atomic import atomic_path

    with atomic_path(out / "report.md") as tmp:
        Path(tmp).write_text(markdown(summary))
    return summary


def simulate(
    federation: Federation,
    auditor: Auditor,
    *,
    protocol: Protocol,
    lr: float,
    rounds: int,
    defenses: Sequence[Defense],
    secagg: bool,
    truth_dir: Path,
    seed: int,
    num_cpus: int | None,
) -> dict[str, Any]:
    """Run the Flower simulation (Ray backend, one CPU per client, ``num_cpus`` in all) with the audit on the
    server; returns the test accuracy before and after, the mean bytes a client sent a round and the strategy."""
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation

    world = federation.build()
    model, test = world["model"], world["test"]
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    config = train_config(protocol, lr=lr)
    history: dict[str, Any] = {"accuracy": None, "accuracy_initial": None, "bytes": None}

    def test_accuracy(state: Mapping[str, Tensor]) -> float:
        return accuracy(model, state, world["inputs"][test], world["labels"][test])

    history["accuracy_initial"] = test_accuracy(initial)
    n = federation.clients
    server = ServerApp()
    if not secagg:
        from flwr.serverapp.strategy import FedAvg as MessageFedAvg

        strategy = AuditStrategy(
            MessageFedAvg(fraction_evaluate=0.0, min_train_nodes=n, min_available_nodes=n), auditor
        )

        @server.main()
        def main(grid: Grid, context: Context) -> None:
            result = strategy.start(
                grid=grid, initial_arrays=state_to_arrays(initial), train_config=config, num_rounds=rounds
            )
            if len(result.arrays):  # empty when every client failed (the log says why)
                history["accuracy"] = test_accuracy(arrays_to_state(result.arrays))

        sizes = strategy.bytes_received
    else:
        from flwr.server import LegacyContext, ServerConfig
        from flwr.server.strategy import FedAvg as LegacyFedAvg
        from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow

        final: dict[str, Any] = {}

        def legacy_evaluate(server_round: int, ndarrays, _config):
            state = ndarrays_to_state(initial, ndarrays)
            final["state"] = state
            return 0.0, {}

        inner = LegacyFedAvg(
            fraction_fit=1.0,
            fraction_evaluate=0.0,
            min_fit_clients=n,
            min_available_clients=n,
            initial_parameters=ndarrays_to_parameters([v.numpy() for v in initial.values()]),
            on_fit_config_fn=lambda r: {**dict(config), "server-round": r},
            evaluate_fn=legacy_evaluate,
        )
        strategy = LegacyAuditStrategy(inner, auditor, secure_aggregation=True)

        @server.main()
        def main(grid: Grid, context: Context) -> None:
            legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=rounds), strategy=strategy)
            # max_weight: SecAgg+ quantises num_examples / max_weight times the weights, so Flower's default of 1000
            # would blur a client of 1 sample by about 4e-3 per weight; the largest batch keeps it near 4e-6.
            # num_shares: 3 neighbours from 3 clients on; Flower wants an integer above 2, so 2 clients share with
            # each other (1.0: all of them), both needed to unmask
            secure = SecAggPlusWorkflow(
                num_shares=3 if n >= 3 else 1.0, reconstruction_threshold=2, max_weight=float(federation.batch_size)
            )
            workflow = DefaultWorkflow(fit_workflow=secure)
            workflow(grid, legacy)
            history["accuracy"] = test_accuracy(final["state"]) if "state" in final else None

        sizes = {}
    client = make_client_app(federation, defenses=defenses, secagg=secagg, truth_dir=truth_dir, seed=seed)
    cpus = num_cpus or max(1, min(n, os.cpu_count() or 1))
    run_simulation(
        server_app=server,
        client_app=client,
        num_supernodes=n,
        backend_config={
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {"num_cpus": cpus, "include_dashboard": False, "log_to_driver": False},
        },
    )
    if history["accuracy"] is None:
        raise ConfigError(
            "the Flower simulation did not finish its rounds (its clients failed): rerun with verbose=True for its log"
        )
    per_round = [statistics.fmean(v) for v in sizes.values() if v]
    history["bytes"] = statistics.fmean(per_round) if per_round else None
    history["strategy"] = strategy
    history["round_seconds"] = dict(getattr(strategy, "round_seconds", {}))
    return history


def markdown(summary: Mapping[str, Any]) -> str:
    """The demo's report: the federation, its accuracy, and the audit per round and client."""
    c = summary["config"]

    def f(v: Any, fmt: str) -> str:
        return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)

    lines = [
        f"# Flower federation audit: {c['clients']} clients, {c['rounds']} rounds, {c['model']} on {c['data']}",
        "",
        f"Protocol {json.dumps(c['protocol'])}, batch {c['batch_size']} per client and round, defenses: "
        f"{', '.join(c['defenses']) or 'none'}, SecAgg+: {'on' if c['secagg'] else 'off'}, server: "
        f"{c.get('server', 'honest')}.",
        f"Test accuracy {f(summary['accuracy_initial'], '.3f')} -> {f(summary['accuracy'], '.3f')}; wall time "
        f"{summary['wall_seconds']:.1f} s; bytes per client per round "
        f"{f(summary['bytes_per_client_per_round'], ',.0f')}.",
        "",
        "| round | client | samples | attack | status | PSNR dB | best-match PSNR dB | > 40 dB | labels | s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in summary["audit"]:
        status = r["status"] if r["status"] == "ok" else f"{r['status']}: {r['reason']}"
        lines.append(
            f"| {r['round']} | {r['client']} | {r['num_samples']} | {r['attack']} | {status} | "
            f"{f(r.get('psnr'), '.1f')} | {f(r.get('psnr_best_match'), '.1f')} | "
            f"{f(r.get('recovered_fraction_40db'), '.0%')} | "
            f"{f(r.get('label_accuracy'), '.2f')} | {f(r.get('seconds'), '.1f')} |"
        )
    if summary["audit_seconds_per_round"]:
        mean = statistics.fmean(summary["audit_seconds_per_round"].values())
        lines += ["", f"The audit added {mean:.1f} s per audited round on the server."]
    if c["secagg"]:
        lines += [
            "",
            "With SecAgg+ the server holds only the aggregate of all clients' updates: the audit attacks it as one "
            "batch of all their samples, and the PSNR is against every client's batch of the round.",
        ]
    return "\n".join(lines) + "\n"


__all__ = [
    "AGGREGATE",
    "AuditStrategy",
    "Auditor",
    "Federation",
    "LegacyAuditStrategy",
    "accuracy",
    "arrays_to_state",
    "defense_mod",
    "evaluate_audit",
    "local_training",
    "make_client_app",
    "markdown",
    "ndarrays_to_state",
    "observed_update",
    "protocol_from_config",
    "run_flower_demo",
    "simulate",
    "state_to_arrays",
    "train_config",
    "truth_path",
]
