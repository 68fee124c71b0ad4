"""GradInversion (Yin et al. 2021) and GradAttack (Huang et al. 2021) presets."""

from __future__ import annotations

import pytest
import torch

import gradinv.attacks.gradattack  # noqa: F401  (registers "gradattack")
import gradinv.attacks.gradinversion  # noqa: F401  (registers "gradinversion")
from gradinv.attacks.base import build_attack
from gradinv.attacks.components.priors import bn_targets
from gradinv.attacks.gradinversion import batchnorm_prior, label_groups, register_restarts, running_statistics
from gradinv.data import load_dataset, sample_batch
from gradinv.errors import AttackError, ConfigError
from gradinv.fl import Scenario
from gradinv.models import build_model, train_model
from gradinv.types import ThreatModel


@pytest.fixture(scope="module")
def digits16():
    return load_dataset("digits", image_size=16, channels=3)


def _convnet(seed: int = 0):
    return build_model("convnet", num_classes=10, in_channels=3, image_size=16, width=8, seed=seed)


def _scenario(ds, model, *, b=4, seed=0, distinct=True, **kw):
    images, labels = sample_batch(ds, batch_size=b, seed=seed, distinct_labels=distinct)
    return Scenario.from_images(model, images, labels, normalization=ds.normalization, **kw)


# -- settings ---------------------------------------------------------------------------------------------------


def test_bad_settings_are_named_in_one_error():
    with pytest.raises(ConfigError) as err:
        build_attack("gradinversion", registration="ransac", max_shift=-1, output="mean", optimizer="lbfgs", group=-1.0)
    message = str(err.value)
    for part in ("registration", "'shift'", "max_shift must be >= 0", "output", "first-order", "group must be >= 0"):
        assert part in message, part
    assert "\n" not in message
    with pytest.raises(ConfigError) as err:
        build_attack("gradattack", bn_statistics="exactt", tv=-1.0, lr=0.0)
    message = str(err.value)
    for part in ("bn_statistics", "did you mean 'exact'", "tv must be >= 0", "lr must be > 0"):
        assert part in message, part
    build_attack("gradinversion")  # the defaults are valid
    build_attack("gradattack", tv=0.1, bn=0.01)


# -- GradInversion ------------------------------------------------------------------------------------------------


def test_gradinversion_runs_with_yin_labels_at_batch_4(digits16):
    sc = _scenario(digits16, _convnet())
    rec = build_attack("gradinversion", iterations=4, restarts=2, log_every=1).reconstruct(sc.observe(), seed=0)
    assert rec.inputs.shape == (4, 3, 16, 16) and rec.images.shape == (4, 3, 16, 16)
    assert rec.settings["label_source"] == "yin"
    assert sorted(rec.labels.tolist()) == sorted(sc.labels.tolist())
    assert len(rec.extras["restart_costs"]) == 2 and rec.extras["bn_prior"] == "on"
    assert rec.extras["output"] in ("consensus", "restart 0", "restart 1")
    assert len(rec.trace) == 4


def test_gradinversion_is_deterministic(digits16):
    obs = _scenario(digits16, _convnet()).observe()
    attack = build_attack("gradinversion", iterations=3, restarts=2)
    a, b = attack.reconstruct(obs, seed=3), attack.reconstruct(obs, seed=3)
    assert torch.equal(a.inputs, b.inputs)
    assert not torch.equal(a.inputs, attack.reconstruct(obs, seed=4).inputs)


def test_yin_labels_decline_a_batch_larger_than_the_classes(digits16):
    obs = _scenario(digits16, _convnet(), b=12, distinct=False).observe()
    reasons = build_attack("gradinversion").applicable(obs)
    assert any("distinct labels" in r for r in reasons), reasons
    assert build_attack("gradinversion", label_method="ilrg").applicable(obs) == []


def test_repeated_labels_make_yin_refuse_at_run_time(digits16):
    images, _ = sample_batch(digits16, batch_size=4, seed=0)
    sc = Scenario.from_images(_convnet(), images, torch.tensor([3, 3, 5, 5]), normalization=digits16.normalization)
    with pytest.raises(AttackError, match="labels repeat"):
        build_attack("gradinversion", iterations=1).reconstruct(sc.observe())


def test_batch_48_runs_with_given_labels(digits16):
    sc = _scenario(digits16, _convnet(), b=48, distinct=False, threat=ThreatModel(known_labels=True))
    rec = build_attack("gradinversion", iterations=2, restarts=2).reconstruct(sc.observe())
    assert rec.inputs.shape == (48, 3, 16, 16) and rec.settings["label_source"] == "knowledge"


def test_registration_undoes_shifts_and_swaps_within_a_label_group():
    gen = torch.Generator().manual_seed(0)
    base = torch.rand(3, 3, 12, 12, generator=gen)
    labels = torch.tensor([1, 1, 2])
    groups = label_groups(labels)
    assert [g.tolist() for g in groups] == [[0, 1]]
    moved = base.roll(shifts=(1, -1), dims=(-2, -1))  # restart 1: every image moved by (1, -1) pixels
    second = moved[[1, 0, 2]]  # ... and its two samples of label 1 in the other order
    x = torch.stack([base, second])
    reg = register_restarts(x, max_shift=2, groups=groups)
    assert reg.slots[1].tolist() == [1, 0, 2] and reg.slots[0].tolist() == [0, 1, 2]
    assert reg.shifts[1].tolist() == [[-1, 1]] * 3  # the move back onto the consensus
    assert reg.shifts[0].tolist() == [[0, 0]] * 3
    inner = (..., slice(2, -2), slice(2, -2))  # away from the rolled-in border
    assert torch.allclose(reg.consensus[inner], base[inner], atol=1e-6)
    assert torch.allclose(reg.targets[1][inner], second[inner], atol=1e-6)


# -- BatchNorm statistics -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("train_mode", [False, True])
def test_exact_statistics_are_the_batch_s_and_the_prior_vanishes_on_the_batch(digits16, train_mode):
    sc = _scenario(digits16, _convnet(), threat=ThreatModel(known_bn_statistics=True), train_mode=train_mode)
    obs = sc.observe()
    targets = bn_targets(obs)
    truth = sc.bn_statistics()
    assert set(targets) == set(truth) and len(targets) == 8
    for name, (mean, var) in truth.items():
        assert torch.equal(targets[name][0], mean) and torch.equal(targets[name][1], var)
    running = running_statistics(obs)
    assert torch.equal(running["model.bn0"][0], obs.buffers["model.bn0.running_mean"])
    prior = batchnorm_prior(obs, targets)  # measured in the client's mode: zero on the client's batch
    assert float(prior(sc.inputs)) < 1e-4
    assert float(prior(torch.randn_like(sc.inputs))) > 0.1


def test_gradattack_declines_exact_without_the_statistics(digits16):
    plain = _scenario(digits16, _convnet(), train_mode=True).observe()
    reasons = build_attack("gradattack", bn_statistics="exact").applicable(plain)
    assert reasons and "known_bn_statistics" in reasons[0]
    with pytest.raises(AttackError, match="known_bn_statistics"):
        build_attack("gradattack", bn_statistics="exact", iterations=1).reconstruct(plain)
    known = _scenario(digits16, _convnet(), train_mode=True, threat=ThreatModel(known_bn_statistics=True)).observe()
    assert build_attack("gradattack", bn_statistics="exact").applicable(known) == []
    rec = build_attack("gradattack", iterations=2).reconstruct(known)
    assert rec.settings["bn_statistics"] == "exact" and (rec.settings["tv"], rec.settings["bn"]) == (0.1, 0.005)
    rec = build_attack("gradattack", iterations=2, bn=0.01).reconstruct(plain)
    assert rec.settings["bn_statistics"] == "infer" and (rec.settings["tv"], rec.settings["bn"]) == (0.05, 0.01)
    assert rec.inputs.shape == (4, 3, 16, 16)


def test_gradattack_on_a_model_without_batchnorm(digits16):
    lenet = build_model("lenet", num_classes=10, in_channels=3, image_size=16, seed=0)
    obs = _scenario(digits16, lenet, b=2).observe()
    rec = build_attack("gradattack", iterations=3).reconstruct(obs)
    assert rec.inputs.shape == (2, 3, 16, 16) and rec.settings["bn_statistics"] == "infer"


def test_the_bn_prior_pulls_the_candidate_to_the_batch_statistics(digits16):
    """At equal budget, the prior brings the candidate's BatchNorm statistics clearly closer to the batch's than the
    same attack without it (its mechanism; whether that lifts PSNR depends on the budget, see the report)."""
    model = _convnet(seed=1)
    images = digits16.normalization.normalize(digits16.images)
    train_model(model, images=images, labels=digits16.labels, steps=50, batch_size=16, seed=0)
    threat = ThreatModel(known_labels=True, known_bn_statistics=True)
    obs = _scenario(digits16, model, seed=2, threat=threat).observe()
    distance = batchnorm_prior(obs, obs.knowledge.bn_statistics)
    gap = {}
    for mode in ("exact", "none"):
        rec = build_attack("gradattack", iterations=60, bn_statistics=mode, bn=0.05).reconstruct(obs, seed=0)
        assert rec.settings["bn_statistics"] == mode
        gap[mode] = float(distance(rec.inputs))
    assert gap["exact"] < 0.75 * gap["none"], gap


def test_restarts_are_registered_every_register_every_iterations(digits16, monkeypatch):
    from gradinv.attacks.gradinversion import GradInversion

    calls = []
    original = GradInversion._register
    monkeypatch.setattr(GradInversion, "_register", lambda self, *a: calls.append(1) or original(self, *a))
    obs = _scenario(digits16, _convnet()).observe()
    build_attack("gradinversion", iterations=7, restarts=2, register_every=3).reconstruct(obs, seed=0)
    assert len(calls) == 3 + 1  # iterations 0, 3, 6, then the output's registration
    calls.clear()
    build_attack("gradinversion", iterations=7, restarts=2, register_every=1).reconstruct(obs, seed=0)
    assert len(calls) == 7 + 1
    with pytest.raises(ConfigError, match="register_every"):
        build_attack("gradinversion", register_every=0)


def test_gradinversion_weighs_the_batchnorm_prior_by_what_the_statistics_are(digits16):
    """GradAttack's weights: 0.005 against the client batch's own statistics, 0.001 against running ones."""
    known = _scenario(digits16, _convnet(), train_mode=True, threat=ThreatModel(known_bn_statistics=True)).observe()
    plain = _scenario(digits16, _convnet()).observe()
    quick = {"iterations": 2, "restarts": 2}
    assert build_attack("gradinversion", **quick).reconstruct(known).settings["bn"] == 0.005
    rec = build_attack("gradinversion", **quick).reconstruct(plain)
    assert rec.settings["bn"] == 0.001 and rec.extras["bn_prior"] == "on"
    rec = build_attack("gradinversion", bn=0.0, **quick).reconstruct(known)
    assert rec.settings["bn"] == 0.0 and rec.extras["bn_prior"] == "off"
