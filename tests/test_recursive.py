"""R-GAP and the rank analysis: exact recovery where the analysis says full rank, refusal or failure elsewhere."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from gradinv.analysis import rank_analysis
from gradinv.attacks import build_attack
from gradinv.attacks.components.chain import layer_chain
from gradinv.attacks.rgap import layer_system, solve_layer
from gradinv.cli import main
from gradinv.errors import AttackError
from gradinv.fl import FedAvg, Scenario
from gradinv.metrics import psnr
from gradinv.models import build_model

DEFICIENT_CNN6 = {"channels": (4, 36, 36, 36, 64, 128)}  # first conv: 4 x 17 x 17 outputs for 3,072 pixels


def _rgap_psnr(model, photos32, i: int = 0) -> float:
    sc = Scenario.from_images(
        model, photos32.images[i : i + 1], photos32.labels[i : i + 1], normalization=photos32.normalization
    )
    rec = build_attack("rgap").reconstruct(sc.observe())
    assert len(rec.extras["residuals"]) == len(layer_chain(model, (3, 32, 32)))
    return float(psnr(rec.images, sc.ground_truth().images))


def test_rgap_recovers_a_photo_exactly_through_cnn6(photos32):
    """The issue's setting: CNN6, random weights, 32x32 photo, batch 1: >= 45 dB (a peer reaches 47-50 dB)."""
    assert _rgap_psnr(build_model("cnn6", num_classes=10, seed=0), photos32, 2) >= 45


@pytest.mark.parametrize(("name", "options"), [("mlp", {"activation": "leaky_relu"}), ("lenet", {})])
def test_rgap_on_other_full_rank_chains(name, options, photos32):
    assert _rgap_psnr(build_model(name, num_classes=10, seed=1, **options), photos32, 4) >= 45


def test_rgap_fails_where_the_rank_analysis_says_deficient(photos32):
    model = build_model("cnn6", num_classes=10, seed=0, **DEFICIENT_CNN6)
    report = rank_analysis(model, (3, 32, 32))
    assert not report.recoverable and report.layers[0].deficit > 0
    assert _rgap_psnr(model, photos32, 2) < 30


def test_rgap_refuses_what_it_cannot_invert(photos32, digits32):
    x, y = digits32.images[:2], digits32.labels[:2]
    relu = build_model("mlp", num_classes=10)
    with pytest.raises(AttackError, match="not invertible"):
        build_attack("rgap").reconstruct(
            Scenario.from_images(relu, x[:1], y[:1], normalization=digits32.normalization).observe()
        )
    cnn6 = build_model("cnn6", num_classes=10)
    with pytest.raises(AttackError, match="batch 1"):
        build_attack("rgap").reconstruct(
            Scenario.from_images(cnn6, x, y, normalization=digits32.normalization).observe()
        )
    fedavg = Scenario.from_images(cnn6, x[:1], y[:1], normalization=digits32.normalization, protocol=FedAvg())
    with pytest.raises(AttackError, match="FedSGD"):
        build_attack("rgap").reconstruct(fedavg.observe())
    with pytest.raises(AttackError, match="BatchNorm2d"):
        build_attack("rgap").reconstruct(
            Scenario.from_images(
                build_model("convnet", num_classes=10, width=8), x[:1], y[:1], normalization=digits32.normalization
            ).observe()
        )


def test_solve_layer_is_exact_on_a_strided_conv_with_bias():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=True).double()
    model = nn.Sequential(conv, nn.LeakyReLU(0.2), nn.Flatten(), nn.Linear(8 * 5 * 5, 4)).double()
    layer = layer_chain(model, (3, 10, 10))[0]
    x = torch.randn(1, 3, 10, 10, dtype=torch.float64)
    u = conv(x)[0].detach()
    delta = torch.randn_like(u)
    gw = torch.nn.grad.conv2d_weight(x, conv.weight.shape, delta[None], stride=2, padding=1)
    sol = solve_layer(layer, conv.weight.detach(), conv.bias.detach(), u, delta, gw)
    torch.testing.assert_close(sol.inputs, x[0], rtol=1e-8, atol=1e-8)
    assert sol.forward_residual < 1e-10 and sol.gradient_residual < 1e-10
    normal, _ = layer_system(layer, conv.weight.detach(), conv.bias.detach(), u, delta, gw)
    assert torch.allclose(normal, normal.T)


def test_rank_analysis_predictions():
    shape = (3, 32, 32)
    assert rank_analysis(build_model("cnn6", num_classes=10), shape).recoverable
    assert rank_analysis(build_model("lenet", num_classes=10), shape).recoverable
    assert rank_analysis(build_model("mlp", num_classes=10, activation="leaky_relu"), shape).recoverable
    relu = rank_analysis(build_model("mlp", num_classes=10), shape)
    assert not relu.recoverable and "non-invertible" in relu.reason
    deficient = rank_analysis(build_model("cnn6", num_classes=10, **DEFICIENT_CNN6), shape)
    assert [r.verdict for r in deficient.layers][0] == "deficient by 1724"  # 3072 - (4*289 + 4*48)
    assert "deficient" in deficient.table()


def test_numeric_rank_agrees_with_the_count_on_a_small_chain():
    """The count is an upper bound on the rank: reached where the layer is full, possibly not where deficient."""
    model = build_model("cnn6", num_classes=10, image_size=16, channels=(4, 8, 8, 8, 8, 8))
    report = rank_analysis(model, (3, 16, 16), numeric=True)
    kinds = set()
    for r in report.layers[:-1]:
        assert r.numeric_rank <= r.constraints, r
        if r.constraints == r.unknowns:
            assert r.numeric_rank == r.unknowns, r
        kinds.add(r.constraints == r.unknowns)
    assert kinds == {True, False}  # both kinds of layer were checked


def test_cli_analyze(tmp_path, capsys):
    assert main(["analyze", "--model", "cnn6", "--out", str(tmp_path)]) == 0
    assert "R-GAP prediction: recoverable" in capsys.readouterr().out
    data = json.loads((tmp_path / "analysis.json").read_text())
    assert data["recoverable"] and len(data["layers"]) == 7
    assert main(["analyze", "--model", "convnet"]) == 2
    assert "BatchNorm2d" in capsys.readouterr().err


@pytest.mark.parametrize(("dtype", "floor"), [(torch.float32, 40), (torch.float64, 60)])
def test_ppdl_spn_is_exact_on_its_single_layer_setting(dtype, floor, photos32):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 128, 5, stride=2, padding=2), nn.ReLU(), nn.Flatten(), nn.Linear(128 * 256, 9))
    model = model.to(dtype)
    images = photos32.images[3:4].to(dtype)
    sc = Scenario.from_images(model, images, photos32.labels[3:4], normalization=photos32.normalization)
    rec = build_attack("ppdl-spn").reconstruct(sc.observe())
    assert float(psnr(rec.images, sc.ground_truth().images)) >= floor
    assert rec.extras["gradient_residual"] < 1e-5


def test_ppdl_spn_refuses_deeper_chains(photos32):
    sc = Scenario.from_images(
        build_model("cnn6", num_classes=9),
        photos32.images[:1],
        photos32.labels[:1],
        normalization=photos32.normalization,
    )
    with pytest.raises(AttackError, match="rgap"):
        build_attack("ppdl-spn").reconstruct(sc.observe())


def test_ppdl_ahe_reads_every_fc_layer_and_single_sample_rows_of_a_batch(digits32):
    from gradinv.attacks.imprint import score_recovered
    from gradinv.data import sample_batch

    model = build_model("mlp", num_classes=10, seed=0, hidden=(1024, 256))
    x, y = sample_batch(digits32, batch_size=1, seed=0)
    obs = Scenario.from_images(model, x, y, normalization=digits32.normalization).observe()
    rec = build_attack("analytic").reconstruct(obs)
    assert set(rec.extras["layer_inputs"]) == {"layers.0", "layers.1", "layers.2"}
    with torch.no_grad():  # the classifier's input, read from its own rows, is the true hidden feature
        hidden = model.act(model.layers[1](model.act(model.layers[0](digits32.normalization.normalize(x).flatten(1)))))
    torch.testing.assert_close(rec.extras["layer_inputs"]["layers.2"].float(), hidden[0], rtol=1e-3, atol=1e-4)
    for seed in range(3):  # batches: rows that only one sample activates give it exactly
        x, y = sample_batch(digits32, batch_size=4, seed=seed)
        sc = Scenario.from_images(model, x, y, normalization=digits32.normalization)
        rec = build_attack("analytic").reconstruct(sc.observe())
        assert score_recovered(rec.images, sc.ground_truth().images).fraction == 1.0
