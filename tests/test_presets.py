"""The CPL, SAPAG and Bayesian presets of the gradient-matching engine: settings, shapes, determinism, each
paper's distinctive part, and a run through the experiments layer."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

import gradinv.attacks.bayesian as bayesian
import gradinv.attacks.cpl  # noqa: F401  (registers "cpl")
import gradinv.attacks.sapag  # noqa: F401  (registers "sapag")
from gradinv.attacks import ATTACKS, build_attack
from gradinv.attacks.components.objectives import euclidean
from gradinv.data import load_dataset, sample_batch
from gradinv.errors import ConfigError
from gradinv.fl import Scenario
from gradinv.models import build_model
from gradinv.types import ThreatModel

PRESETS = ("cpl", "sapag", "bayesian")


@pytest.fixture(scope="module")
def digits16():
    return load_dataset("digits", image_size=16, channels=1)


@pytest.fixture(scope="module")
def lenet16():
    return build_model("lenet", num_classes=10, in_channels=1, image_size=16, seed=0)


def _scenario(ds, model, *, b=1, seed=0, **kw):
    x, y = sample_batch(ds, batch_size=b, seed=seed)
    return Scenario.from_images(model, x, y, normalization=ds.normalization, seed=seed, **kw)


def _with_defenses(observation, *defenses):
    """The same observed update, as if the client had run ``defenses`` (to compare objectives on one update)."""
    return dataclasses.replace(observation, defenses=defenses)


def _numel(update):
    return sum(v.numel() for v in update.values())


# -- registry and settings -------------------------------------------------------------------------------------


def test_presets_are_registered_with_their_table1_row():
    for name in PRESETS:
        assert name in ATTACKS
        assert set(ATTACKS[name].table1) == {"initialisation", "objective", "optimiser", "priors"}
    cpl, sapag, bayes = (build_attack(n).settings for n in PRESETS)
    assert (cpl.init, cpl.objective, cpl.optimizer, cpl.label_method) == ("pattern", "euclidean", "lbfgs", "auto")
    assert cpl.label > 0
    assert (sapag.init, sapag.objective, sapag.optimizer) == ("constant", "gaussian_kernel", "adam")
    assert bayes.noise_model and bayes.image_prior == "tv_squared"


@pytest.mark.parametrize(
    ("name", "bad", "words"),
    [
        ("cpl", {"pattern_tiles": 0, "label_form": "huber"}, ("pattern_tiles", "label_form")),
        ("sapag", {"kernel_width": 0.0, "iterations": 0}, ("kernel_width", "iterations")),
        (
            "bayesian",
            {"image_prior": "gan", "prior_weight": -1.0, "sign_temperature": 0.0, "noise_model": "yes"},
            ("image_prior", "prior_weight", "sign_temperature", "noise_model"),
        ),
    ],
)
def test_bad_settings_are_all_named_in_one_error(name, bad, words):
    with pytest.raises(ConfigError) as err:
        build_attack(name, **bad)
    for word in words:
        assert word in str(err.value)


# -- shapes and determinism ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", PRESETS)
def test_shapes_determinism_and_a_lower_cost(name, digits16, lenet16):
    sc = _scenario(digits16, lenet16, b=2, defenses=("noise:0.01",) if name == "bayesian" else ())
    obs = sc.observe()
    options = {"iterations": 2, "inner_iterations": 10} if name == "cpl" else {"iterations": 30}
    attack = build_attack(name, log_every=1, **options)
    a, b = attack.reconstruct(obs, seed=3), attack.reconstruct(obs, seed=3)
    assert a.inputs.shape == sc.inputs.shape and a.labels.shape == (2,)
    assert torch.equal(a.inputs, b.inputs)
    assert a.trace[-1].cost < a.trace[0].cost
    assert torch.isfinite(a.inputs).all()


# -- CPL -------------------------------------------------------------------------------------------------------


def test_cpl_starts_from_a_tiled_random_patch(digits16, lenet16):
    obs = _scenario(digits16, lenet16).observe()
    shape = (2, 1, 1, 16, 16)
    x0 = build_attack("cpl")._initial(obs, shape, torch.Generator().manual_seed(0))
    assert x0.shape == shape
    patch = x0[..., :8, :8]  # the default: a half-size patch repeated 2 x 2, as the authors' notebooks
    for i in (0, 8):
        for j in (0, 8):
            assert torch.equal(x0[..., i : i + 8, j : j + 8], patch)
    assert patch.flatten().unique().numel() > 100  # random inside the patch
    assert not torch.equal(x0[0], x0[1])  # one patch per restart
    four = build_attack("cpl", init_scale=4.0)._initial(obs, shape, torch.Generator().manual_seed(0))
    assert torch.equal(four[..., 4:8, 12:16], four[..., :4, :4])
    lo = (0 - obs.knowledge.normalization.mean[0]) / obs.knowledge.normalization.std[0]
    hi = (1 - obs.knowledge.normalization.mean[0]) / obs.knowledge.normalization.std[0]
    assert lo - 1e-6 <= float(x0.min()) and float(x0.max()) <= hi + 1e-6  # drawn in image space


def test_cpl_label_regulariser_is_the_prediction_distance(digits16, lenet16):
    obs = _scenario(digits16, lenet16, b=2).observe()
    labels = torch.tensor([3, 7])
    x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    probs = torch.softmax(lenet16.eval()(x), dim=-1)
    expected = (probs - F.one_hot(labels, 10)).pow(2).sum(-1).mean()
    prior = build_attack("cpl", label=2.0)._prior(obs, labels)
    assert torch.allclose(prior(x), 2.0 * expected, atol=1e-6)
    ce = build_attack("cpl", label_form="cross_entropy")._prior(obs, labels)
    assert torch.allclose(ce(x), F.cross_entropy(lenet16(x), labels), atol=1e-6)
    assert build_attack("cpl", label=0.0)._prior(obs, labels) is None


# -- SAPAG -----------------------------------------------------------------------------------------------------


def test_sapag_distance_is_zero_at_the_target_and_below_the_layer_count(digits16, lenet16):
    obs = _scenario(digits16, lenet16).observe()
    target = obs.update
    distance = build_attack("sapag")._objective(obs)(target)
    assert float(distance(target)) == 0.0
    layers = len(target)
    g = torch.Generator().manual_seed(0)
    for scale in (1e-3, 1.0, 1e3):
        other = {k: scale * torch.randn(v.shape, generator=g) for k, v in target.items()}
        value = float(distance(other))
        assert 0.0 < value <= layers  # each term is below 1 (in float32 a far candidate's term rounds to 1)
        if scale == 1e-3:
            assert value < layers
    near = {k: v * 1.01 for k, v in target.items()}
    far = {k: v * 3.0 for k, v in target.items()}
    assert float(distance(near)) < float(distance(far))
    wide = build_attack("sapag", kernel_width=10.0)._objective(obs)(target)
    assert float(wide(far)) < float(distance(far))  # a wider kernel: a smaller term for the same distance


def test_sapag_starts_from_a_constant_grey_image(digits16, lenet16):
    obs = _scenario(digits16, lenet16).observe()
    x0 = build_attack("sapag")._initial(obs, (1, 1, 1, 16, 16), torch.Generator().manual_seed(0))
    grey = obs.knowledge.normalization.normalize(torch.full((1, 16, 16), 0.5))
    assert torch.allclose(x0, grey.expand_as(x0))


# -- Bayesian --------------------------------------------------------------------------------------------------


def test_bayesian_gaussian_likelihood_reads_the_noise_std(digits16, lenet16):
    clean = _scenario(digits16, lenet16).observe()
    noisy = _scenario(digits16, lenet16, defenses=("noise:0.01",)).observe()
    attack = build_attack("bayesian")
    channel = attack.channel(noisy)
    assert (channel.likelihood, channel.scale) == ("gaussian", pytest.approx(0.01))
    nll = attack._objective(noisy)(noisy.update)
    # at the client's true update the negative log-likelihood is ||z||^2 / 2 with z ~ N(0, I): about n / 2
    n = _numel(noisy.update)
    assert abs(float(nll(clean.update)) - n / 2) < 5 * math.sqrt(n / 2)
    # the same observed update under twice the std: the likelihood weighs the distance 4 times less
    doubled = attack._objective(_with_defenses(noisy, "noise:0.02"))(noisy.update)
    candidate = {k: torch.zeros_like(v) for k, v in noisy.update.items()}
    assert float(nll(candidate)) == pytest.approx(4 * float(doubled(candidate)), rel=1e-5)
    assert float(nll(candidate)) == pytest.approx(float(euclidean(noisy.update)(candidate)) / (2 * 0.01**2), rel=1e-5)


def test_bayesian_laplace_clients_and_dpsgd_scales(digits16, lenet16):
    obs = _scenario(digits16, lenet16, b=2).observe()
    laplace = bayesian.defense_channel(_with_defenses(obs, "noise:std=0.02,distribution=laplace"))
    assert (laplace.likelihood, laplace.scale) == ("laplace", pytest.approx(0.02 / math.sqrt(2)))
    candidate = {k: torch.zeros_like(v) for k, v in obs.update.items()}
    nll = bayesian.channel_objective(laplace)(obs.update)(candidate)
    l1 = sum(v.abs().sum() for v in obs.update.values())
    assert float(nll) == pytest.approx(float(l1) / laplace.scale, rel=1e-5)
    two = dataclasses.replace(obs, clients=2, defenses=("noise:0.02",))  # the mean of two clients' noisy updates
    assert bayesian.defense_channel(two).scale == pytest.approx(0.02 / math.sqrt(2))
    dp = bayesian.defense_channel(_with_defenses(obs, "dpsgd:noise_multiplier=0.5,clip=2"))
    assert (dp.likelihood, dp.scale) == ("gaussian", pytest.approx(0.5 * 2 / 2))  # sigma C / batch
    one = bayesian.defense_channel(_with_defenses(_scenario(digits16, lenet16).observe(), "dpsgd:0.5"))
    assert one.transforms == (("clip", 1.0),)  # one sample: per-sample clipping is the update's clipping


def test_bayesian_sign_defense_uses_the_sign_likelihood(digits16, lenet16):
    clean = _scenario(digits16, lenet16).observe()
    signed = _scenario(digits16, lenet16, defenses=("sign:scaled=false",)).observe()
    attack = build_attack("bayesian")
    assert attack.channel(signed).likelihood == "sign"
    nll = attack._objective(signed)(signed.update)
    right, wrong = clean.update, {k: -v for k, v in clean.update.items()}
    assert float(nll(right)) < float(nll(wrong))
    assert float(nll({k: 7.0 * v for k, v in right.items()})) == pytest.approx(float(nll(right)), rel=1e-4)
    scaled = _scenario(digits16, lenet16, defenses=("sign",)).observe()
    scaled_nll = attack._objective(scaled)(scaled.update)
    assert float(scaled_nll({k: 7.0 * v for k, v in right.items()})) > float(scaled_nll(right))  # magnitude sent
    probit = attack.channel(_with_defenses(signed, "noise:0.01", "sign"))
    assert (probit.likelihood, probit.scale) == ("probit_sign", pytest.approx(0.01))


def test_bayesian_pruning_composes_with_noise(digits16, lenet16):
    obs = _scenario(digits16, lenet16, defenses=("prune:0.5", "noise:0.01")).observe()
    channel = bayesian.defense_channel(obs)
    assert channel.likelihood == "gaussian" and channel.transforms == (("prune", 0.5),)
    candidate = {k: torch.randn(v.shape, generator=torch.Generator().manual_seed(0)) for k, v in obs.update.items()}
    pruned = bayesian._transform(candidate, channel.transforms)
    for v in pruned.values():
        assert int((v == 0).sum()) == pytest.approx(v.numel() / 2, abs=1)
    after = bayesian.defense_channel(_with_defenses(obs, "noise:0.01", "prune:0.5"))
    assert after.transforms == ()  # zeros seen exactly: the engine's adaptive mask compares the sent entries


def test_bayesian_without_noise_model_or_noise(digits16, lenet16):
    clean = _scenario(digits16, lenet16).observe()
    noisy = _scenario(digits16, lenet16, defenses=("noise:0.01",)).observe()
    labels = torch.tensor([0])
    off = build_attack("bayesian", noise_model=False)
    assert off._objective(noisy) is euclidean
    assert off._prior(noisy, labels) is not None  # the same prior as with the noise model
    exact = build_attack("bayesian")
    assert exact.channel(clean).likelihood == "none" and exact._prior(clean, labels) is None
    x = torch.zeros(1, 1, 16, 16)
    x[..., 8:, :] = 1.0  # one edge of height 1 across 16 columns
    prior = build_attack("bayesian", prior_weight=2.0)._prior(noisy, labels)
    assert float(prior(x)) == pytest.approx(2.0 * 16)
    absolute = build_attack("bayesian", image_prior="tv")._prior(noisy, labels)
    assert float(absolute(3 * x)) == pytest.approx(3 * 16)


def test_bayesian_records_its_likelihood(digits16, lenet16):
    sc = _scenario(digits16, lenet16, defenses=("noise:0.02",), threat=ThreatModel(known_labels=True))
    rec = build_attack("bayesian", iterations=3).reconstruct(sc.observe())
    assert rec.extras["likelihood"].startswith("gaussian") and rec.extras["noise_scale"] == pytest.approx(0.02)
    rec = build_attack("bayesian", iterations=3, noise_model=False).reconstruct(sc.observe())
    assert rec.extras["likelihood"].startswith("none: plain euclidean with the image prior")


# -- the experiments layer -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", PRESETS)
def test_presets_run_under_the_experiments_layer(name):
    from gradinv.experiments import Case, Cell, run_cell

    case = Case(model="lenet", data="digits", defenses=("noise:0.01",) if name == "bayesian" else ())
    r = run_cell(Cell(case, name, (("iterations", 2),)), raise_errors=True)
    assert r.record.status == "ok", r.record.reason
    assert r.record.attack_settings["iterations"] == 2 and r.record.psnr is not None
    assert r.reconstruction.attack == name
