from __future__ import annotations

import pytest
import torch
from torch import nn

import gradinv.attacks.gias  # noqa: F401  (registers "gias")
import gradinv.models.generator as gen
from gradinv.attacks import build_attack
from gradinv.data import load_dataset
from gradinv.errors import AttackError, ConfigError
from gradinv.fl import Scenario
from gradinv.models import build_model
from gradinv.models.generator import DigitsGenerator, GeneratorTraining, digits_generator, digits_split

TINY = GeneratorTraining(steps=3, batch_size=16)


@pytest.fixture(scope="module")
def digits8():
    return load_dataset("digits", image_size=8, channels=1)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GRADINV_CACHE", str(tmp_path))
    return tmp_path / "generators"


def _observation(ds, *, b=2, seed=0, channels=1):
    _, held_out = digits_split(len(ds))
    idx = held_out[seed * b : (seed + 1) * b]
    images = ds.images[idx].expand(-1, channels, -1, -1).clone()
    model = build_model("lenet", num_classes=10, in_channels=channels, image_size=ds.image_size, seed=seed)
    norm = ds.normalization if channels == 1 else type(ds.normalization)((ds.mean[0],) * 3, (ds.std[0],) * 3)
    return Scenario.from_images(model, images, ds.labels[idx], normalization=norm).observe()


def _user_generator(size=8, latent_dim=6, seed=0):
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return DigitsGenerator(latent_dim=latent_dim, image_size=size, width=4)


# -- the generator -----------------------------------------------------------------------------------------------


def test_split_is_disjoint_complete_and_seeded():
    train, held = digits_split(1797)
    assert len(held) == round(1797 * 0.2) and len(train) + len(held) == 1797
    assert not set(train.tolist()) & set(held.tolist())
    assert torch.equal(digits_split(1797)[1], held)
    assert not torch.equal(digits_split(1797, seed=1)[1], held)
    with pytest.raises(ConfigError):
        digits_split(10, held_out=1.5)


def test_generator_trains_caches_and_loads_without_retraining(cache, monkeypatch):
    g = digits_generator(image_size=8, training=TINY)
    files = list(cache.glob("digits-vae-8px-*.safetensors"))
    assert len(files) == 1
    z = torch.randn(5, g.latent_dim, generator=torch.Generator().manual_seed(0))
    x = g(z)
    assert x.shape == (5, 1, 8, 8) and float(x.min()) >= 0 and float(x.max()) <= 1
    assert not g.training and not any(p.requires_grad for p in g.parameters())

    def no_training(*args, **kwargs):
        raise AssertionError("the cached generator should have been loaded")

    monkeypatch.setattr(gen, "train_generator", no_training)
    again = digits_generator(image_size=8, channels=3, training=TINY)
    rgb = again(z)
    assert rgb.shape == (5, 3, 8, 8)
    assert torch.equal(rgb[:, 0], x[:, 0]) and torch.equal(rgb[:, 2], x[:, 0])  # grey repeated, same weights
    # other training settings are another cache entry: it would train (and here raises)
    with pytest.raises(AssertionError, match="cached"):
        digits_generator(image_size=8, training=GeneratorTraining(steps=4, batch_size=16))


def test_generator_training_is_deterministic(digits8):
    images = digits8.images[:64]
    a, record = gen.train_generator(images, training=GeneratorTraining(image_size=8, steps=3, batch_size=16))
    b, _ = gen.train_generator(images, training=GeneratorTraining(image_size=8, steps=3, batch_size=16))
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    assert set(record) == {"reconstruction", "kl", "seconds"}
    with pytest.raises(ConfigError, match="steps"):
        digits_generator(image_size=8, training=GeneratorTraining(steps=0))


# -- the attack ----------------------------------------------------------------------------------------------------


def test_runs_with_the_bundled_generator_and_the_right_shapes(digits8, cache):
    obs = _observation(digits8, b=2)
    seen = []
    attack = build_attack("gias", iterations=8, latent_fraction=0.5, restarts=2, generator_steps=3, log_every=2)
    rec = attack.reconstruct(obs, seed=0, callback=lambda it, s, x: seen.append((it, tuple(x.shape))))
    assert rec.inputs.shape == (2, 1, 8, 8) and rec.labels.shape == (2,)
    assert rec.extras["latent_iterations_run"] == 4 and rec.extras["generator_iterations_run"] == 4
    assert rec.extras["latent"].shape == (2, 16) and len(rec.extras["restart_costs"]) == 2
    assert rec.extras["kept"] in ("latent", "generator")
    its = [p.iteration for p in rec.trace]
    assert its == sorted(its) and its[-1] == 7
    assert seen and all(shape == (2, 1, 8, 8) for _, shape in seen) and seen[-1][0] == 7
    assert float(rec.images.min()) >= 0 and float(rec.images.max()) <= 1
    assert rec.settings["generator"].startswith("bundled digits")
    assert list(cache.glob("*.safetensors"))  # trained on first use, into the cache


def test_is_deterministic_for_a_seed(digits8):
    obs = _observation(digits8, b=1, seed=1)
    g = _user_generator()
    run = lambda seed: build_attack("gias", generator=g, iterations=6, restarts=2).reconstruct(obs, seed=seed)  # noqa: E731
    a, b, c = run(0), run(0), run(1)
    assert torch.equal(a.inputs, b.inputs)
    assert not torch.equal(a.extras["latent"], c.extras["latent"])


def test_the_generator_stage_lowers_the_matching_cost(digits8):
    obs = _observation(digits8, b=1, seed=2)
    g = _user_generator(seed=3)
    rec = build_attack("gias", generator=g, iterations=60, latent_fraction=0.5, log_every=5).reconstruct(obs)
    stage1 = [p.cost for p in rec.trace if p.iteration < 30]
    assert rec.trace[-1].cost < stage1[0]


def test_leaves_the_model_and_the_generator_unchanged(digits8):
    obs = _observation(digits8, b=2, seed=3)
    g = _user_generator().train()
    model_before = {k: v.clone() for k, v in obs.model.state_dict().items()}
    g_before = {k: v.clone() for k, v in g.state_dict().items()}
    build_attack("gias", generator=g, iterations=4, bn=0.0).reconstruct(obs)
    assert all(torch.equal(v, model_before[k]) for k, v in obs.model.state_dict().items())
    assert all(torch.equal(v, obs.parameters[k]) for k, v in model_before.items() if k in obs.parameters)
    assert all(torch.equal(v, g_before[k]) for k, v in g.state_dict().items())
    assert g.training and all(p.requires_grad for p in g.parameters())
    for m in [*obs.model.modules(), *g.modules()]:
        assert not m._forward_hooks and not m._forward_pre_hooks


def test_declines_a_generator_of_the_wrong_shape(digits8):
    obs = _observation(digits8, b=1)
    wrong = _user_generator(size=16)
    attack = build_attack("gias", generator=wrong, iterations=2)
    reasons = attack.applicable(obs)
    assert len(reasons) == 1 and "(1, 16, 16)" in reasons[0] and "(1, 8, 8)" in reasons[0]
    with pytest.raises(AttackError, match="shape"):
        attack.reconstruct(obs)
    rgb = build_attack("gias", generator=_user_generator(), iterations=2).applicable(_observation(digits8, channels=3))
    assert rgb and "(3, 8, 8)" in rgb[0]

    class NoDim(nn.Module):
        def forward(self, z):
            return z.view(-1, 1, 8, 8)

    assert "latent_dim" in build_attack("gias", generator=NoDim()).applicable(obs)[0]
    assert build_attack("gias", generator=NoDim(), latent_dim=64).applicable(obs) == []
    assert "cannot map" in build_attack("gias", generator=NoDim(), latent_dim=5).applicable(obs)[0]
    blind = obs.with_knowledge(normalization=None)
    assert any("normalisation" in r for r in build_attack("gias").applicable(blind))
    odd = _observation(load_dataset("digits", image_size=12, channels=1), b=1)
    assert "bundled digits generator" in build_attack("gias").applicable(odd)[0]
    assert build_attack("gias").applicable(obs) == []


def test_refuses_bad_settings_in_one_error():
    with pytest.raises(ConfigError) as err:
        build_attack("gias", iterations=0, latent_fraction=0.0, generator_lr=-1.0, generator_output="pixels")
    message = str(err.value)
    for part in ("iterations", "latent_fraction", "generator_lr", "generator_output"):
        assert part in message, part
    with pytest.raises(ConfigError, match="nn.Module"):
        build_attack("gias", generator="dcgan")


def test_one_time_budget_covers_both_stages(digits8):
    obs = _observation(digits8, b=1, seed=4)
    rec = build_attack("gias", generator=_user_generator(), iterations=100_000, time_budget=0.3).reconstruct(obs)
    assert rec.extras["stopped"] == "time_budget" and rec.extras["iterations_run"] < 100_000
    # the latent stage stops at its share of the budget (how many generator iterations the rest buys depends on
    # the machine's load)
    assert 1 <= rec.extras["latent_iterations_run"] < 100_000
