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
