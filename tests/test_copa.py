"""COPA: joint least squares from R-GAP's deficient layer down, with the pull-back constraints of the layers below."""

from __future__ import annotations

import json
import statistics

import pytest
import torch
from torch import nn

from gradinv.analysis import rank_analysis
from gradinv.attacks import build_attack
from gradinv.attacks.copa import pixel_differences
from gradinv.cli import main
from gradinv.data import load_dataset
from gradinv.errors import ConfigError
from gradinv.fl import Scenario
from gradinv.metrics import psnr
from gradinv.models import build_model


@pytest.fixture(scope="module")
def photos16():
    return load_dataset("photos", image_size=16, channels=3)


def _both(model, ds, i: int, **settings) -> tuple[float, float, dict]:
    """R-GAP's and COPA's PSNR on photo ``i`` of ``ds``, and COPA's extras."""
    sc = Scenario.from_images(model, ds.images[i : i + 1], ds.labels[i : i + 1], normalization=ds.normalization)
    obs, truth = sc.observe(), sc.ground_truth().images
    rgap = build_attack("rgap").reconstruct(obs)
    copa = build_attack("copa", **settings).reconstruct(obs)
    return float(psnr(rgap.images, truth)), float(psnr(copa.images, truth)), dict(copa.extras)


def test_the_rank_analysis_calls_the_test_chain_deficient(deficient_chain):
    report = rank_analysis(deficient_chain(), (3, 16, 16))
    assert not report.recoverable
    assert [r.deficit > 0 for r in report.layers] == [False, True, False]
    assert report.copa_count == "COPA: layers 0..2 jointly give 1264 constraints for 768 image values (enough)"
    first = rank_analysis(build_model("cnn6", num_classes=10, channels=(4, 36, 36, 36, 64, 128)), (3, 32, 32))
    assert "nothing below it" in first.copa_count
    assert rank_analysis(build_model("cnn6", num_classes=10), (3, 32, 32)).copa_count is None


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_copa_is_exact_where_rgap_fails_on_a_deficient_sigmoid_chain(seed, deficient_chain, photos16):
    rgap, copa, extras = _both(deficient_chain("sigmoid", seed=seed), photos16, seed + 3)
    assert extras["deficient_layer"] == "2" and extras["joint_layers"] == ["0", "2"]
    assert [r["full_rank"] for r in extras["residuals"]] == [True, False]
    assert rgap < 20
    assert copa >= 60


def test_copa_gains_on_a_deficient_leaky_relu_chain(deficient_chain, photos16):
    """LeakyReLU makes the joint problem piecewise quadratic: COPA stops in a local minimum, but above R-GAP;
    a smooth start (a pixel-difference prior in a first stage) lands in a better one."""
    gains, smooth_gains = [], []
    for seed in range(3):
        model = deficient_chain("leaky_relu", seed=seed)
        rgap, copa, _ = _both(model, photos16, seed)
        _, smooth, _ = _both(model, photos16, seed, smooth=0.1)
        gains.append(copa - rgap)
        smooth_gains.append(smooth - copa)
    assert statistics.median(gains) >= 2, gains
    assert statistics.median(smooth_gains) >= 2, smooth_gains


def test_copa_is_rgap_where_every_layer_is_full_rank(photos32):
    sc = Scenario.from_images(
        build_model("cnn6", num_classes=10, seed=0),
        photos32.images[2:3],
        photos32.labels[2:3],
        normalization=photos32.normalization,
    )
    obs = sc.observe()
    rgap, copa = build_attack("rgap").reconstruct(obs), build_attack("copa").reconstruct(obs)
    assert copa.extras["deficient_layer"] is None and not copa.trace
    assert torch.equal(copa.extras["float64_inputs"], rgap.extras["float64_inputs"])


def test_copa_has_nothing_to_pull_back_below_a_deficient_first_layer(photos16):
    """With the first layer deficient, no constraint below it remains: COPA returns a least-squares solution of
    that layer alone, as R-GAP does (it starts from zero, where R-GAP's minimum-norm answer also sits)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 2, 3, stride=2, padding=1, bias=False), nn.Sigmoid(), nn.Flatten(), nn.Linear(2 * 64, 10)
    )
    rgap, copa, extras = _both(model, photos16, 0)
    assert extras["joint_layers"] == ["0"]
    assert abs(copa - rgap) < 1.0


def test_copa_is_deterministic_and_checks_its_settings(deficient_chain, photos16):
    sc = Scenario.from_images(
        deficient_chain(), photos16.images[:1], photos16.labels[:1], normalization=photos16.normalization
    )
    obs = sc.observe()
    a, b = (build_attack("copa", iterations=3).reconstruct(obs) for _ in range(2))
    assert torch.equal(a.inputs, b.inputs) and a.extras["steps"] == 3
    assert a.trace[-1].cost < a.trace[0].cost
    with pytest.raises(ConfigError, match="init"):
        build_attack("copa", init="random").reconstruct(obs)
    start = build_attack("copa", init="rgap", iterations=1).reconstruct(obs)
    assert start.trace[0].cost != a.trace[0].cost  # a different starting point
    with pytest.raises(ConfigError, match="smooth"):
        build_attack("copa", smooth=-1.0).reconstruct(obs)
    smooth = build_attack("copa", smooth=0.1).reconstruct(obs)  # the prior stage does not cost exactness
    assert float(psnr(smooth.images, sc.ground_truth().images)) >= 60
    iterations = [p.iteration for p in smooth.trace]
    assert iterations == sorted(iterations) and iterations[-1] >= smooth.extras["steps"]


def test_smooth_start_needs_images():
    with pytest.raises(ConfigError, match="C, H, W"):
        pixel_differences((784,))
    d = pixel_differences((1, 3, 3))(torch.arange(9.0))  # rows differ by 3, columns by 1; 12 pairs
    assert torch.allclose(d, torch.tensor([3.0] * 6 + [1.0] * 6) / 12**0.5)


def test_cli_copa_with_model_options(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["attack", "copa", "--model", "cnn6", "--model-option", "activation=sigmoid", "--quiet", "--out", str(out)]
    assert main([*args, "--attack-option", "smooth=0.5", "--attack-option", "init=rgap"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["model_options"] == {"activation": "sigmoid"} and metrics["psnr"] >= 40
    assert metrics["attack_settings"]["smooth"] == 0.5 and metrics["attack_settings"]["init"] == "rgap"
    assert main(["attack", "copa", "--model", "cnn6", "--attack-option", "restarts=2"]) == 2
    assert "copa: no setting(s) ['restarts']" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:  # argparse's own usage error
        main(["attack", "copa", "--model", "cnn6", "--model-option", "width"])
    assert exc.value.code == 2 and "KEY=VALUE" in capsys.readouterr().err
    assert main(["attack", "copa", "--model", "cnn6", "--model-option", "width=8"]) == 2
    assert "no option 'width'" in capsys.readouterr().err


@pytest.mark.slow
def test_copa_on_cnn6_with_a_deficient_third_conv(photos32):
    """CNN6, sigmoid, 4-channel third conv (deficient by 1,296 for R-GAP), 32x32 photo."""
    model = build_model("cnn6", num_classes=10, seed=1, activation="sigmoid", channels=(12, 36, 4, 36, 64, 128))
    rgap, copa, extras = _both(model, photos32, 1)
    assert extras["deficient_layer"] == "body.4"
    assert rgap < 20 and copa >= 45
