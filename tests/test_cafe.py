"""CAFE (Jin et al., NeurIPS 2021) and the vertical-FL protocol it attacks."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from gradinv.attacks.cafe import TABLE1, Cafe, incidence, recover_layer_inputs, recover_output_gradients
from gradinv.data import load_dataset, sample_batch
from gradinv.errors import AttackError, ConfigError, ShapeError
from gradinv.fl.vertical import (
    FeatureSplit,
    VerticalFL,
    VerticalObservation,
    VerticalScenario,
    build_vertical_models,
    first_layer_terms,
)
from gradinv.metrics import score_images

FAST = {"lr": 0.1, "epochs": 8}  # step III: a larger step than the paper's 0.01, fewer passes (tests stay fast)


@pytest.fixture(scope="module")
def digits16():
    return load_dataset("digits", image_size=16, channels=1)


def _scenario(ds, *, n: int = 12, seed: int = 0, **protocol) -> VerticalScenario:
    images, labels = sample_batch(ds, batch_size=n, seed=seed)
    settings = {"parties": 4, "batch_size": 4, "iterations": 4 * n, "seed": seed, **protocol}
    return VerticalScenario.from_images(
        images, labels, normalization=ds.normalization, protocol=VerticalFL(**settings), num_classes=10
    )


@pytest.fixture(scope="module")
def small(digits16):
    scenario = _scenario(digits16)
    return scenario, scenario.observe()


def _tensors(value, seen=None):
    """Every tensor reachable from an observation (dataclass fields, mappings, sequences, modules' state)."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, nn.Module):
        yield from value.state_dict().values()
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):
            yield from _tensors(getattr(value, f.name))
    elif isinstance(value, dict) or hasattr(value, "items"):
        for v in value.values():
            yield from _tensors(v)
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _tensors(v)


def test_a_small_vertical_federation_is_recovered(small):
    scenario, obs = small
    truth = scenario.ground_truth()
    rec = Cafe(**FAST).reconstruct(obs, seed=0)
    by_index = score_images(rec.images, truth.images, align_batch=False)
    matched = score_images(rec.images, truth.images)
    assert rec.inputs.shape == truth.inputs.shape == (12, 1, 16, 16)
    assert by_index.mean_psnr >= 30, by_index.psnr
    assert matched.mean_psnr >= by_index.mean_psnr - 1e-6
    assert matched.order == list(range(12))  # the indices the server knows are the right ones
    assert torch.equal(rec.labels, truth.labels) and rec.settings["label_source"] == "server"
    assert rec.attack == "cafe" and rec.trace and rec.trace[-1].iteration == FAST["epochs"] * obs.iterations - 1


def test_steps_one_and_two_are_exact_on_a_frozen_model(digits16):
    scenario = _scenario(digits16, lr=0.0)
    obs = scenario.observe()
    h_true, v_true = first_layer_terms(obs, scenario.inputs)
    rec = Cafe(epochs=0).reconstruct(obs)
    for v, h, vt, ht in zip(
        rec.extras["first_layer_output_gradients"], rec.extras["first_layer_inputs"], v_true, h_true, strict=True
    ):
        assert float((v - vt).norm() / vt.norm()) < 1e-4
        assert float((h - ht).norm() / ht.norm()) < 1e-4


def test_least_squares_steps_on_synthetic_values():
    g = torch.Generator().manual_seed(0)
    n, t, b = 10, 30, 3
    batches = torch.stack([torch.randperm(n, generator=g)[:b] for _ in range(t)])
    v = torch.randn(n, 5, generator=g, dtype=torch.float64)
    h = torch.randn(n, 7, generator=g, dtype=torch.float64)
    bias = torch.stack([v[s].sum(0) for s in batches])
    weight = torch.stack([v[s].T @ h[s] for s in batches])
    a = incidence(batches, n)
    v_hat, r1 = recover_output_gradients(a, bias)
    h_hat, r2 = recover_layer_inputs(a, batches, v_hat, weight)
    assert torch.allclose(v_hat, v, atol=1e-8) and torch.allclose(h_hat, h, atol=1e-8)
    assert r1 < 1e-10 and r2 < 1e-10


def test_an_fc_first_bottom_model_is_recovered(digits16):
    images, labels = sample_batch(digits16, batch_size=12, seed=1)
    scenario = VerticalScenario.from_images(
        images,
        labels,
        normalization=digits16.normalization,
        protocol=VerticalFL(batch_size=4, iterations=48, split="columns"),
        conv_channels=(),
    )
    rec = Cafe(**FAST).reconstruct(scenario.observe())
    assert score_images(rec.images, scenario.ground_truth().images, align_batch=False).mean_psnr >= 35


def test_the_observation_never_holds_the_data(small):
    scenario, obs = small
    names = {f.name for f in dataclasses.fields(VerticalObservation)}
    assert not names & {"inputs", "images", "data", "truth", "ground_truth"}
    slices = [p.reshape(p.shape[0], -1) for p in obs.split.parts(scenario.inputs)]
    width = slices[0].shape[1]
    for tensor in _tensors(obs):
        assert tensor.shape != scenario.inputs.shape
        if tensor.is_floating_point() and tensor.numel() % width == 0:
            rows = tensor.reshape(-1, width)
            for part in slices:
                assert not bool((torch.cdist(rows.float(), part.float()) < 1e-6).any())
    with pytest.raises(TypeError, match="never the GroundTruth"):
        Cafe().reconstruct(scenario.ground_truth())


def test_same_seeds_give_the_same_numbers(digits16, small):
    scenario, obs = small
    again = _scenario(digits16).observe()
    assert torch.equal(obs.batches, again.batches)
    for m in range(obs.parties):
        assert torch.equal(obs.layer_gradients[m]["weight"], again.layer_gradients[m]["weight"])
        assert torch.equal(obs.output_gradients[m], again.output_gradients[m])
    attack = Cafe(lr=0.1, epochs=1)
    assert torch.equal(attack.reconstruct(obs, seed=3).inputs, attack.reconstruct(again, seed=3).inputs)
    assert not torch.equal(attack.reconstruct(obs, seed=3).inputs, attack.reconstruct(obs, seed=4).inputs)
    other = _scenario(digits16, seed=1)
    assert not torch.equal(other.batch_indices(), scenario.batch_indices())


def test_the_models_are_left_unchanged(digits16):
    scenario = _scenario(digits16, n=8, iterations=16, lr=1e-3)
    before = [{k: v.clone() for k, v in m.state_dict().items()} for m in (*scenario.bottoms, scenario.top)]
    obs = scenario.observe()
    after = [m.state_dict() for m in (*scenario.bottoms, scenario.top)]
    assert all(torch.equal(b[k], a[k]) for b, a in zip(before, after, strict=True) for k in b)
    # the model trains while the server watches: every iteration's parameters are kept
    fc1 = obs.parameters[0]["fc1.weight"]
    assert fc1.shape[0] == 16 and not torch.equal(fc1[0], fc1[-1])
    assert torch.equal(fc1[0], scenario.bottoms[0].fc1.weight)
    kept = [t.clone() for t in _tensors(obs)]
    Cafe(lr=0.1, epochs=1, gradient_weight=1.0).reconstruct(obs)
    assert all(torch.equal(k, t) for k, t in zip(kept, _tensors(obs), strict=True))
    for model in (*obs.bottoms, obs.top):
        for module in model.modules():
            assert not module._forward_pre_hooks and not module._forward_hooks


def test_bad_settings_name_every_problem(digits16):
    with pytest.raises(ConfigError) as err:
        VerticalFL(parties=0, split="diagonal", batch_size=0, iterations=0, lr=-1.0, optimizer="rmsprop")
    for word in ("parties", "split", "batch_size", "iterations", "lr", "optimizer"):
        assert word in str(err.value)
    with pytest.raises(ConfigError) as err:
        Cafe(lr=0.0, epochs=-1, tv_weight=-1.0, beta1=1.0, init="zeros", colour=1)
    for word in ("lr", "epochs", "tv_weight", "beta1", "init", "colour"):
        assert word in str(err.value)
    images, labels = sample_batch(digits16, batch_size=6, seed=0)
    split = FeatureSplit.make((1, 16, 16), 4, "grid")
    bottoms, top = build_vertical_models(split, num_classes=10)
    with pytest.raises(ConfigError) as err:
        VerticalScenario(bottoms[:3], top, images, labels, digits16.normalization, VerticalFL(batch_size=8))
    assert "batch_size 8" in str(err.value) and "3" in str(err.value)
    with pytest.raises(ConfigError, match="no layer 'dense'"):
        VerticalScenario(bottoms, top, images, labels, digits16.normalization, VerticalFL(batch_size=4), layer="dense")
    with pytest.raises(ShapeError):
        FeatureSplit.make((1, 4, 4), 25, "grid")


def test_too_few_iterations_are_refused_with_the_reason(digits16):
    obs = _scenario(digits16, iterations=2).observe()
    reasons = Cafe().applicable(obs)
    assert reasons and "none of the 2 observed batches" in reasons[0]
    with pytest.raises(AttackError, match="observe more iterations"):
        Cafe().reconstruct(obs)
    whole = _scenario(digits16, n=6, batch_size=6, iterations=20).observe()  # every batch is the whole set
    assert "full column rank" in Cafe().applicable(whole)[0]


@pytest.mark.parametrize("how", ["grid", "columns", "rows"])
def test_feature_splits_cover_the_image_once(how):
    split = FeatureSplit.make((3, 10, 9), 4, how)
    x = torch.randn(2, 3, 10, 9)
    assert torch.equal(split.assemble(split.parts(x)), x)
    covered = torch.zeros(10, 9)
    for t, b, l, r in split.regions:
        covered[t:b, l:r] += 1
    assert bool((covered == 1).all())
    if how == "grid":  # CAFE's code: four parties hold the quadrants
        assert split.regions == ((0, 5, 0, 5), (0, 5, 5, 9), (5, 10, 0, 5), (5, 10, 5, 9))


def test_table1_row():
    assert set(TABLE1) == {"initialisation", "objective", "optimiser", "priors"}
    assert all(isinstance(v, str) and v for v in TABLE1.values())


@pytest.mark.slow
@pytest.mark.parametrize("n", [40])
def test_forty_digits_are_recovered_at_25_db_with_the_defaults(n):
    ds = load_dataset("digits", image_size=28, channels=1)
    images, labels = sample_batch(ds, batch_size=n, seed=0)
    scenario = VerticalScenario.from_images(
        images, labels, normalization=ds.normalization, protocol=VerticalFL(iterations=5 * n), num_classes=10
    )
    rec = Cafe().reconstruct(scenario.observe())
    truth = scenario.ground_truth().images
    assert score_images(rec.images, truth).mean_psnr >= 25
    assert score_images(rec.images, truth, align_batch=False).mean_psnr >= 25
