"""DP-SGD's accounting when a local batch repeats samples, its per-sample memory, and pixelate's block check."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gradinv
from gradinv.data import Normalization
from gradinv.defenses import build_defense, dp_epsilon, gaussian_epsilon, parse_defense
from gradinv.defenses import update as update_module
from gradinv.defenses.update import local_uses
from gradinv.errors import ConfigError
from gradinv.fl.protocols import client_update
from gradinv.protocol import FedAvg, FedSGD


def _multiplicities(protocol: FedAvg, n: int) -> torch.Tensor:
    """(K, n): how often each sample is in each local step, read off the protocol's own ``client_update``.

    A bias-free linear model on one-hot inputs with the loss "mean output" has the gradient ``counts / b`` in
    every step, whatever its weights; the delta after t steps minus the delta after t - 1 gives step t's."""
    b = protocol.local_batch_size or n
    model = nn.Linear(n, 1, bias=False)
    params = {"weight": torch.zeros(1, n)}
    inputs, targets = torch.eye(n), torch.zeros(n, dtype=torch.int64)

    def delta(steps: int) -> torch.Tensor:
        if steps == 0:
            return torch.zeros(n)
        p = FedAvg(local_steps=steps, lr=1.0, local_batch_size=protocol.local_batch_size)
        out = client_update(p, model, params, {}, inputs, targets, loss_fn=lambda o, y: o.sum() / o.shape[0])
        return out["weight"][0]

    deltas = [delta(t) for t in range(protocol.local_steps + 1)]
    steps = [-(deltas[t + 1] - deltas[t]) * b for t in range(protocol.local_steps)]
    return torch.stack(steps).round().long()


@pytest.mark.parametrize(
    ("n", "b", "k"), [(4, 6, 1), (4, 6, 2), (3, 7, 2), (4, 2, 3), (5, 5, 3), (4, None, 2), (6, 4, 5), (2, 9, 1)]
)
def test_local_uses_counts_repeats_inside_a_step(n, b, k):
    protocol = FedAvg(local_steps=k, lr=0.1, local_batch_size=b)
    counts = _multiplicities(protocol, n)
    assert counts.sum(dim=1).tolist() == [b or n] * k  # the probe sees every local batch whole
    # a step holding a sample m times has sensitivity m C: under mu-GDP the steps add up as m^2
    assert local_uses(protocol, n) == int(counts.pow(2).sum(dim=0).max())


def test_epsilon_of_a_local_batch_larger_than_the_clients_batch():
    dp = [build_defense("dpsgd", noise_multiplier=1.0)]
    # one step of 6 over 4 samples: samples 0 and 1 appear twice, so the step is (2 / sigma)-GDP
    protocol = FedAvg(local_steps=1, lr=0.1, local_batch_size=6)
    eps = dp_epsilon(dp, protocol=protocol, num_samples=4)
    assert eps == pytest.approx(gaussian_epsilon(1.0, delta=1e-5, rounds=4))
    assert eps == pytest.approx(gaussian_epsilon(0.5, delta=1e-5))
    assert eps > gaussian_epsilon(1.0, delta=1e-5, rounds=1) + 1  # what was reported before
    # local batches within the client's batch are unchanged: ceil(K b / n) steps
    assert dp_epsilon(dp, protocol=FedAvg(local_steps=3, lr=0.1, local_batch_size=2), num_samples=4) == (
        pytest.approx(gaussian_epsilon(1.0, delta=1e-5, rounds=2))
    )
    assert local_uses(FedSGD(), 10) == 1


def _dpsgd_scenario(spec: str, *, batch: int = 6, protocol=None) -> gradinv.Scenario:
    images = torch.rand(batch, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(batch) % 3
    net = gradinv.build_model("mlp", num_classes=3, image_size=8, hidden=(16,), seed=0)
    options = {} if protocol is None else {"protocol": protocol}
    return gradinv.Scenario.from_images(
        net, images, labels, normalization=Normalization.identity(3), defenses=(spec,), **options
    )


@pytest.mark.parametrize("protocol", [None, FedAvg(local_steps=2, lr=0.5, local_batch_size=8)])
def test_dpsgd_in_chunks_of_samples_gives_the_same_update(monkeypatch, protocol):
    spec = "dpsgd:noise_multiplier=0.5,clip=0.1"
    whole = _dpsgd_scenario(spec, protocol=protocol).observe().update
    monkeypatch.setattr(update_module, "PER_SAMPLE_CHUNK_BYTES", 1)  # one sample at a time
    chunked = _dpsgd_scenario(spec, protocol=protocol).observe().update
    assert whole.keys() == chunked.keys()
    assert all(torch.allclose(whole[k], chunked[k], atol=1e-6) for k in whole)


def test_dpsgd_refuses_per_sample_gradients_that_do_not_fit(monkeypatch):
    monkeypatch.setenv("GRADINV_MEMORY_LIMIT", "1kB")
    with pytest.raises(ConfigError) as info:
        _dpsgd_scenario("dpsgd").observe()
    message = str(info.value)
    assert "dpsgd's per-sample gradients" in message and "--batch-size" in message
    assert "GRADINV_MEMORY_LIMIT" in message and "\n" not in message


def test_pixelate_block_larger_than_the_image_is_refused():
    big = parse_defense("pixelate:100")
    with pytest.raises(ConfigError, match=r"block 100 is larger than the 32x32 images: use a block of at most 32"):
        big.check_input_shape((3, 32, 32))
    parse_defense("pixelate:32").check_input_shape((3, 32, 32))  # one cell: allowed
    with pytest.raises(ConfigError, match="block 100"):
        _dpsgd_scenario("pixelate:100").observe()  # 8x8 images


def test_gaussian_epsilon_stays_finite_for_tiny_noise():
    """eps above ~709 overflowed e^eps; the privacy curve is evaluated in log space."""
    small, tiny = gaussian_epsilon(0.05, delta=1e-5), gaussian_epsilon(0.01, delta=1e-5)
    assert 200 < small < tiny < float("inf")
