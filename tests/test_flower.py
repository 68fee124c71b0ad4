"""The Flower integration: conversion, defense mods, the audited simulation (Ray), SecAgg+ and the core's isolation.

Two Flower simulations run here (module fixtures, Ray backend): 2 clients x 2 rounds with the audit on, and 3
clients x 1 round under SecAgg+ with a Robbing-the-Fed server. On 2 shared CPU cores each takes about a minute,
most of it Ray and the actors' imports (torch, gradinv) before round 1.
"""

from __future__ import annotations

import copy
import subprocess
import sys
import time
import uuid

import pytest
import torch

flwr = pytest.importorskip("flwr")
pytest.importorskip("ray")

from flwr.app import ConfigRecord, Context, Message, Metadata, MetricRecord, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.clientapp.mod import arrays_size_mod, message_size_mod  # noqa: E402

from gradinv.attacks import build_attack  # noqa: E402
from gradinv.defenses import functional as D  # noqa: E402
from gradinv.errors import ConfigError  # noqa: E402
from gradinv.experiments.case import Case, Seeds  # noqa: E402
from gradinv.fl import FedAvg, FedSGD, Scenario  # noqa: E402
from gradinv.integrations import flower as F  # noqa: E402
from gradinv.metrics import score_images  # noqa: E402
from gradinv.types import Knowledge, Observation, named_state  # noqa: E402

ITERATIONS = 30  # iDLG's L-BFGS steps in the audit (batch 1, LeNet at 16 px converges well before)


def _message(content: RecordDict, *, node: int = 7) -> Message:
    meta = Metadata(
        run_id=1,
        message_id=uuid.uuid4().hex,
        src_node_id=0,
        dst_node_id=node,
        reply_to_message_id="",
        group_id="1",
        created_at=time.time(),
        ttl=600.0,
        message_type="train",
    )
    return Message(metadata=meta, content=content)


def _context(node: int = 7) -> Context:
    return Context(run_id=1, node_id=node, node_config={"partition-id": 0}, state=RecordDict(), run_config={})


# -- framework-light pieces --------------------------------------------------------------------------------------


def test_state_arrays_round_trip_by_name():
    state = {"b.bias": torch.randn(3), "a.weight": torch.randn(3, 4), "bn.num_batches_tracked": torch.tensor(2)}
    back = F.arrays_to_state(F.state_to_arrays(state))
    assert list(back) == list(state)
    for k in state:
        assert torch.equal(back[k], state[k]) and back[k].dtype == state[k].dtype


def test_protocol_travels_in_the_train_config():
    protocol, lr = F.protocol_from_config(F.train_config(FedSGD(), lr=0.05))
    assert isinstance(protocol, FedSGD) and lr == 0.05
    fedavg = FedAvg(local_steps=3, lr=0.2, local_batch_size=4)
    assert F.protocol_from_config(F.train_config(fedavg))[0] == fedavg
    delta = {"w": torch.tensor([0.5, -1.0])}
    assert torch.allclose(F.observed_update(delta, FedSGD(), 0.5)["w"], torch.tensor([-1.0, 2.0]))
    with pytest.raises(ConfigError, match="train config"):
        F.protocol_from_config({"lr": 0.1})


def _delta(v: torch.Tensor) -> torch.Tensor:
    """A delta of distinct magnitudes and mixed signs (no ties for pruning)."""
    n = v.numel()
    return (torch.linspace(0.1, 1.0, n) * (-1.0) ** torch.arange(n)).view_as(v)


def _training_app(mods) -> ClientApp:
    app = ClientApp(mods=list(mods))

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        sent = F.arrays_to_state(msg.content["arrays"])
        new = {k: v + _delta(v) for k, v in sent.items()}
        content = RecordDict({"arrays": F.state_to_arrays(new), "metrics": MetricRecord({"num-examples": 1})})
        return Message(content=content, reply_to=msg)

    return app


def test_defense_mods_compose_with_flowers_own_mods():
    sent = {"w": torch.randn(4, 5), "b": torch.randn(5)}
    delta = {k: _delta(v) for k, v in sent.items()}
    content = RecordDict({"arrays": F.state_to_arrays(sent), "config": ConfigRecord({"server-round": 3})})
    # Flower runs the mods outermost first, so on the way out the last one acts first: prune, then sign
    app = _training_app([message_size_mod, arrays_size_mod, F.defense_mod("sign"), F.defense_mod("prune:0.5")])
    out = F.arrays_to_state(app(_message(content), _context()).content["arrays"])
    expected = D.scaled_sign(D.prune_smallest(delta, 0.5), scaled=True)
    for k in sent:
        assert torch.allclose(out[k] - sent[k], expected[k], atol=1e-6)
    # noise: seeded by the seed, the round and the node, so the same message gives the same reply
    noisy = _training_app([arrays_size_mod, F.defense_mod("noise:0.1", seed=4)])
    a = F.arrays_to_state(noisy(_message(content), _context()).content["arrays"])
    b = F.arrays_to_state(noisy(_message(content), _context()).content["arrays"])
    c = F.arrays_to_state(noisy(_message(content, node=8), _context(node=8)).content["arrays"])
    assert all(torch.equal(a[k], b[k]) for k in a) and not torch.equal(a["w"], c["w"])
    assert 0.05 < float((a["w"] - sent["w"] - delta["w"]).std()) < 0.2


def test_mods_refuse_defenses_that_need_the_client():
    for spec in ("dpsgd", "mixup", "soteria"):
        with pytest.raises(ConfigError, match="cannot be a Flower mod"):
            F.defense_mod(spec)


def test_auditor_limits_rounds_and_clients():
    model = torch.nn.Linear(4, 2)
    auditor = F.Auditor(model=model, input_shape=(4,), normalization=None, rounds={2}, clients={5, 9}, max_clients=1)
    assert auditor.select(1, [5, 9]) == []
    assert auditor.select(2, [9, 3, 5]) == [5]


def test_import_gradinv_loads_no_optional_framework():
    code = (
        "import sys, gradinv, gradinv.attacks, gradinv.defenses, gradinv.fl, gradinv.experiments, gradinv.cli\n"
        "gradinv.Scenario\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('flwr', 'ray', 'opacus', 'tenseal'))\n"
        "print(bad)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


# -- the audited simulation --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    out = tmp_path_factory.mktemp("flower")
    start = time.perf_counter()
    summary = F.run_flower_demo(
        out=out,
        clients=2,
        rounds=2,
        attacks=("idlg",),
        attack_settings={"idlg": {"iterations": ITERATIONS}},
        audit_rounds={1},
        audit_clients=1,
        num_cpus=2,
    )
    return out, summary, time.perf_counter() - start


def test_simulation_with_the_audit_on(federation):
    out, summary, seconds = federation
    assert seconds < 120, f"the 2-client, 2-round simulation took {seconds:.0f} s"
    assert (out / "audit.json").is_file() and (out / "report.md").is_file()
    assert (out / "audit" / "results.sqlite").is_file()
    assert 0 <= summary["accuracy"] <= 1 and summary["bytes_per_client_per_round"] > 0
    # limited to round 1 and one client: one record, the overhead measured for that round only
    rows = summary["audit"]
    assert [(r["round"], r["attack"], r["status"]) for r in rows] == [(1, "idlg", "ok")]
    assert list(summary["audit_seconds_per_round"]) == ["1"]
    assert rows[0]["labels_recovered"] == rows[0]["labels_true"]
    assert rows[0]["psnr"] > 30  # batch-1 FedSGD on LeNet: iDLG rebuilds the digit
    assert len(list((out / "truth").rglob("*.safetensors"))) == 4  # 2 clients x 2 rounds, beside the audit


def test_audit_equals_a_direct_attack(federation):
    """The audit's reconstruction of a batch-1 FedSGD client equals gradinv's own attack, same seed, on the same
    update read from the client's side record (gradient = -delta / lr); and that update is the gradient gradinv's
    Scenario computes for the same batch and sent model, up to float32 rounding of the weight step."""
    out, summary, _ = federation
    row = summary["audit"][0]
    truth = F._load(F.truth_path(out / "truth", 1, int(row["client"])))
    case = Case(model="lenet", data="digits", image_size=16, seeds=Seeds.all(0))
    world = F.Federation(case, 2, 1).build()
    model = copy.deepcopy(world["model"])
    model.load_state_dict(F._load(out / "audit" / "sent" / "round-001.safetensors"))
    params, buffers = named_state(model)
    gradient = {k: -truth[f"delta.{k}"] / 0.1 for k in params}
    knowledge = Knowledge(input_shape=(3, 16, 16), num_samples=1, normalization=world["normalization"])
    observation = Observation(model, params, buffers, gradient, protocol=FedSGD(), knowledge=knowledge)
    rec = build_attack("idlg", iterations=ITERATIONS).reconstruct(observation, seed=0)
    direct = score_images(rec.images, truth["images"]).mean_psnr
    assert abs(direct - row["psnr"]) < 0.1, (direct, row["psnr"])
    assert rec.labels.tolist() == row["labels_recovered"]
    scenario = Scenario.from_images(model, truth["images"], truth["labels"], normalization=world["normalization"])
    simulated = scenario.observe().update
    for k in params:
        assert torch.allclose(gradient[k], simulated[k], rtol=1e-3, atol=1e-5), k


@pytest.fixture(scope="module")
def secure(tmp_path_factory):
    out = tmp_path_factory.mktemp("secagg")
    # a malicious server: its imprinted model (64 bins, gain 1e-5: large against SecAgg+'s quantisation step)
    case = Case(model="lenet", data="digits", image_size=16, server="imprint:bins=64,gain=1e-5", seeds=Seeds.all(0))
    federation = F.Federation(case, 3, 2)
    world = federation.build()
    auditor = F.Auditor(
        model=world["model"],
        input_shape=tuple(world["inputs"].shape[1:]),
        normalization=world["normalization"],
        attacks=(build_attack("rtf"),),
        out=out / "audit",
    )
    F._quiet_flower(False)
    history = F.simulate(
        federation,
        auditor,
        protocol=FedSGD(),
        lr=0.1,
        rounds=1,
        defenses=(),
        secagg=True,
        truth_dir=out / "truth",
        seed=0,
        num_cpus=2,
    )
    return out, history, auditor


def test_secagg_strategy_receives_only_the_aggregate(secure):
    out, history, auditor = secure
    strategy = history["strategy"]
    received = strategy.received[1]
    assert len(received) == 3
    sent = F._load(out / "audit" / "sent" / "round-001.safetensors")
    deltas = [{k: r[k] - sent[k] for k in sent} for r in received]
    for d in deltas[1:]:  # every result carries the same arrays: the aggregate
        assert all(torch.equal(d[k], deltas[0][k]) for k in d)
    own = [
        {k[len("delta.") :]: v for k, v in F._load(p).items() if k.startswith("delta.")}
        for p in sorted((out / "truth" / "round-001").glob("node-*.safetensors"))
    ]
    assert len(own) == 3
    seen = deltas[0]
    mean = {k: sum(o[k] for o in own) / 3 for k in seen}
    err = max(float((seen[k] - mean[k]).abs().max()) for k in seen)  # SecAgg+'s quantisation only
    for o in own:  # no client's own update arrives
        gap = max(float((seen[k] - o[k]).abs().max()) for k in seen)
        assert gap > 100 * err, (gap, err)
    assert err < 1e-4
    # the audit attacked the aggregate once, as one batch of the three clients' 2 samples each
    (record,) = auditor.records
    assert (record["client"], record["clients"], record["num_samples"]) == (F.AGGREGATE, 3, 6)
    assert history["accuracy"] is not None


def test_malicious_server_reads_the_secure_aggregate(secure):
    """The Robbing-the-Fed server's imprinted model, fitted to its held-out digits, is what the clients train (the
    round's arrays); under SecAgg+ the aggregate of 3 clients x 2 samples is one batch of 6 to ``rtf``, and 64
    bins separate most of them (the full measurement: bench/flower_secagg.py)."""
    out, history, auditor = secure
    world = F.Federation(Case(model="lenet", data="digits", image_size=16, seeds=Seeds.all(0)), 3, 2).build()
    sent = F._load(out / "audit" / "sent" / "round-001.safetensors")
    assert sent["imprint.measure.weight"].shape == (64, 3 * 16 * 16)
    assert set(world["model"].state_dict()) == {k.removeprefix("model.") for k in sent if k.startswith("model.")}
    (row,) = F.evaluate_audit(out / "audit", out / "truth")
    assert (row["attack"], row["status"], row["num_samples"]) == ("rtf", "ok", 6)
    assert row["recovered_fraction_40db"] >= 0.5, row
