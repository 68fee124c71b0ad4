from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gradinv.data import sample_batch
from gradinv.errors import ConfigError, ShapeError
from gradinv.fl import FedAvg, FedSGD, Scenario
from gradinv.fl.protocols import protocol_from_dict
from gradinv.models import build_model
from gradinv.types import GroundTruth, Observation, ThreatModel


def _batch(ds, b=4, seed=0):
    images, labels = sample_batch(ds, batch_size=b, seed=seed)
    return ds.normalization.normalize(images), labels


@pytest.mark.parametrize("name", ["mlp", "lenet", "convnet"])
def test_fedsgd_matches_plain_autograd(name, digits32):
    model = build_model(name, num_classes=10, seed=1)
    x, y = _batch(digits32)
    obs = Scenario(model, x, y, train_mode=(name != "convnet")).observe()
    ref = build_model(name, num_classes=10, seed=1)
    ref.train(name != "convnet")
    loss = F.cross_entropy(ref(x), y)
    grads = torch.autograd.grad(loss, list(ref.parameters()))
    for (pname, _), g in zip(ref.named_parameters(), grads, strict=True):
        torch.testing.assert_close(obs.update[pname], g, rtol=1e-4, atol=1e-6)


def test_fedsgd_train_mode_batchnorm_uses_batch_statistics(digits32):
    model = build_model("convnet", num_classes=10, seed=0, width=8)
    x, y = _batch(digits32, b=3)
    obs = Scenario(model, x, y, train_mode=True).observe()
    ref = build_model("convnet", num_classes=10, seed=0, width=8).train()
    grads = torch.autograd.grad(F.cross_entropy(ref(x), y), list(ref.parameters()))
    for (pname, _), g in zip(ref.named_parameters(), grads, strict=True):
        torch.testing.assert_close(obs.update[pname], g, rtol=1e-4, atol=1e-6)


def test_fedavg_steps_match_a_manual_sgd_loop(digits32):
    model = build_model("mlp", num_classes=10, seed=0)
    x, y = _batch(digits32, b=6)
    proto = FedAvg(local_steps=3, lr=0.05, local_batch_size=2)
    obs = Scenario(model, x, y, protocol=proto).observe()
    ref = build_model("mlp", num_classes=10, seed=0)
    start = {k: v.detach().clone() for k, v in ref.named_parameters()}
    opt = torch.optim.SGD(ref.parameters(), lr=0.05)
    for step in range(3):
        idx = torch.arange(step * 2, step * 2 + 2) % 6
        opt.zero_grad()
        F.cross_entropy(ref(x[idx]), y[idx]).backward()
        opt.step()
    for k, v in ref.named_parameters():
        torch.testing.assert_close(obs.update[k], v.detach() - start[k], rtol=1e-4, atol=1e-7)
    assert obs.update_kind == "weight_delta"


def test_fedavg_one_full_batch_step_is_scaled_gradient(digits32):
    model = build_model("mlp", num_classes=10, seed=0)
    x, y = _batch(digits32)
    g = Scenario(model, x, y).observe().update
    d = Scenario(model, x, y, protocol=FedAvg(local_steps=1, lr=0.5)).observe().update
    for k in g:
        torch.testing.assert_close(d[k], -0.5 * g[k])


def test_observation_has_no_private_data_and_model_is_untouched(digits32):
    model = build_model("convnet", num_classes=10, seed=0, width=8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = _batch(digits32)
    sc = Scenario(model, x, y, threat=ThreatModel(known_labels=False))
    obs = sc.observe()
    assert isinstance(obs, Observation)
    assert obs.knowledge.labels is None and obs.knowledge.num_samples == 4
    assert set(obs.update) == {k for k, _ in model.named_parameters()}
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert not any(torch.equal(t, x) for t in obs.update.values())
    truth = sc.ground_truth()
    assert isinstance(truth, GroundTruth) and torch.equal(truth.labels, y)
    assert obs.model is not model


def test_known_labels_threat_model(digits32):
    x, y = _batch(digits32)
    obs = Scenario(build_model("mlp", num_classes=10), x, y, threat=ThreatModel(known_labels=True)).observe()
    assert torch.equal(obs.knowledge.labels, y)
    assert obs.knowledge.missing(["labels", "num_samples"]) == []
    obs2 = Scenario(build_model("mlp", num_classes=10), x, y).observe()
    assert obs2.knowledge.missing(["labels", "num_samples"]) == ["labels"]


def test_scenario_validates_shapes():
    model = build_model("mlp", num_classes=10)
    with pytest.raises(ShapeError):
        Scenario(model, torch.zeros(2, 3, 32, 32), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ConfigError):
        FedAvg(local_steps=0)


def test_protocol_round_trip():
    for p in (FedSGD(), FedAvg(local_steps=4, lr=0.01, local_batch_size=8)):
        assert protocol_from_dict(p.to_dict()) == p


# -- protocols in the core layer, and their specs -------------------------------------------------------------


def test_protocols_live_in_the_core_layer_and_fl_re_exports_them():
    import gradinv.fl.protocols as fl_protocols
    import gradinv.protocol as core

    assert FedAvg is core.FedAvg is fl_protocols.FedAvg and FedSGD is core.FedSGD
    assert protocol_from_dict is core.protocol_from_dict


def test_protocol_specs_parse_and_round_trip():
    from gradinv.registry import PROTOCOLS

    assert PROTOCOLS.parse("fedsgd") == FedSGD()
    assert PROTOCOLS.parse("fedavg:local_steps=5,lr=0.1") == FedAvg(local_steps=5, lr=0.1)
    assert PROTOCOLS.parse("fedavg:5") == FedAvg(local_steps=5)
    assert PROTOCOLS.parse("FedAvg:local_batch_size=none") == FedAvg()
    for p in (FedSGD(), FedAvg(local_steps=4, lr=0.01, local_batch_size=8), FedAvg(lr=1e-3)):
        assert PROTOCOLS.parse(p.spec()) == p
    assert FedSGD().spec() == "fedsgd"
    with pytest.raises(ConfigError, match="unknown protocol 'fedavgg' \\(did you mean 'fedavg'\\?\\): choose one of"):
        PROTOCOLS.parse("fedavgg:5")
    with pytest.raises(ConfigError, match="no setting 'steps'.*its settings are local_steps, lr, local_batch_size"):
        PROTOCOLS.parse("fedavg:steps=5")
    with pytest.raises(ConfigError, match="fedavg local_steps must be an integer, got 'five'"):
        PROTOCOLS.parse("fedavg:five")
    with pytest.raises(ConfigError, match="write KEY=VALUE"):
        PROTOCOLS.parse("fedsgd:5")
    with pytest.raises(ConfigError, match="local_steps must be int"):
        FedAvg(local_steps="5")
    with pytest.raises(ConfigError, match="unknown protocol 'sgd'"):
        protocol_from_dict({"name": "sgd"})


# -- the Python API refuses mistakes in one line --------------------------------------------------------------


def _mlp_case(digits32, b=2):
    images, labels = sample_batch(digits32, batch_size=b, seed=0)
    return build_model("mlp", num_classes=10, image_size=32, seed=0), images, labels


def test_defenses_as_one_bare_string_are_refused_with_the_fix(digits32):
    model, images, labels = _mlp_case(digits32)
    norm = digits32.normalization
    with pytest.raises(ConfigError, match="got the string 'prune:0.9': write \\('prune:0.9',\\)"):
        Scenario.from_images(model, images, labels, normalization=norm, defenses="prune:0.9")
    with pytest.raises(ConfigError, match="a defense must be a Defense"):
        Scenario.from_images(model, images, labels, normalization=norm, defenses=(0.9,))
    sc = Scenario.from_images(model, images, labels, normalization=norm, defenses=["prune:0.9"])
    assert isinstance(sc.defenses, tuple) and sc.defenses[0].name == "prune"


def test_images_outside_the_unit_range_and_non_finite_inputs_are_refused(digits32):
    from gradinv.errors import DataError

    model, images, labels = _mlp_case(digits32)
    norm = digits32.normalization
    with pytest.raises(DataError, match="images must lie in \\[0, 1\\].*divide 0-255 images by 255"):
        Scenario.from_images(model, images * 255, labels, normalization=norm)
    with pytest.raises(DataError, match="images must be floating point.*float\\(\\) / 255"):
        Scenario.from_images(model, (images * 255).to(torch.uint8), labels, normalization=norm)
    bad = norm.normalize(images).clone()
    for value in (float("nan"), float("inf")):
        bad[0, 0, 0, 0] = value
        with pytest.raises(DataError, match="inputs hold NaN or infinite values"):
            Scenario(model, bad, labels)
    with pytest.raises(DataError, match="labels must be integer class indices"):
        Scenario(model, norm.normalize(images), labels.float())


class _TupleNet(torch.nn.Module):
    def __init__(self, wrap):
        super().__init__()
        self.inner = build_model("mlp", num_classes=10, image_size=32, seed=0)
        self.wrap = wrap

    def forward(self, x):
        return self.wrap(self.inner(x))


@pytest.mark.parametrize("wrap", [lambda z: (z, z.sum()), lambda z: {"logits": z}])
def test_a_model_that_does_not_return_logits_gets_a_clear_error(digits32, wrap):
    _, images, labels = _mlp_case(digits32)
    sc = Scenario.from_images(_TupleNet(wrap), images, labels, normalization=digits32.normalization)
    with pytest.raises(ConfigError, match="forward returned a (tuple|dict), not a tensor of logits: wrap the model"):
        sc.observe()


def test_observation_carries_defense_objects_and_with_knowledge_keeps_them(digits32, tmp_path):
    from gradinv.defenses import Defense, parse_defense
    from gradinv.fl import observation_from_files
    from gradinv.io import save_model, save_update

    model, images, labels = _mlp_case(digits32)
    sc = Scenario.from_images(model, images, labels, normalization=digits32.normalization, defenses=("noise:0.01",))
    obs = sc.observe()
    assert all(isinstance(d, Defense) for d in obs.defenses) and obs.defenses == sc.defenses
    assert obs.with_knowledge(labels=labels).defenses == obs.defenses
    assert [d.spec() for d in obs.defenses] == ["noise:std=0.01,clip=none,distribution=gaussian"]
    save_model(model, tmp_path / "model.safetensors")
    save_update(obs.update, tmp_path / "update.safetensors")
    again = observation_from_files(
        model,
        update_path=tmp_path / "update.safetensors",
        weights_path=tmp_path / "model.safetensors",
        defenses=[d.spec() for d in obs.defenses],
    )
    assert [type(d) for d in again.defenses] == [type(parse_defense("noise"))]
    assert again.defenses[0].settings == obs.defenses[0].settings


def test_bind_state_evaluates_like_functional_call_with_tied_weights():
    """A bound twin evaluates at the given tensors, tied parameters included (one tensor under two names)."""
    from torch import nn
    from torch.func import functional_call

    from gradinv.fl.functional import bind_state, is_bound, stateless_twin

    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(7, 4)
            self.head = nn.Linear(4, 7, bias=False)
            self.head.weight = self.embed.weight

        def forward(self, ids):
            return self.head(self.embed(ids))

    torch.manual_seed(0)
    model = Tied()
    twin = stateless_twin(model, train_mode=False)
    params = {k: v.detach() + 0.5 for k, v in model.named_parameters()}
    assert list(params) == ["embed.weight"]  # the tie: one name
    ids = torch.tensor([[1, 2, 3]])
    buffers: dict = {}
    expected = functional_call(twin, (params, buffers), (ids,))
    bind_state(twin, params, buffers)
    assert is_bound(twin, params, buffers) and not is_bound(twin, dict(params), buffers)
    torch.testing.assert_close(twin(ids), expected)
    torch.testing.assert_close(model(ids), functional_call(model, (dict(model.named_parameters()), {}), (ids,)))
