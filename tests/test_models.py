"""Tests of the model zoo (gradinv.models) and of brief training."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gradinv.errors import ConfigError, ShapeError
from gradinv.models import (
    MODEL_INFO,
    MODELS,
    LeNet,
    build_model,
    classifier_layer,
    list_models,
    register_model,
    train_model,
)

NAMES = ["cnn6", "convnet", "lenet", "mlp", "resnet18", "resnet20", "resnet32", "vit-tiny"]
CLASSIFIER = {
    "mlp": "layers.2",
    "lenet": "fc",
    "convnet": "model.linear",
    "resnet18": "fc",
    "resnet20": "fc",
    "resnet32": "fc",
    "cnn6": "fc",
    "vit-tiny": "head",
}


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_registry_lists_every_model():
    assert sorted(MODELS) == NAMES
    listed = list_models()
    assert [name for name, _ in listed] == NAMES
    assert all(isinstance(summary, str) and summary for _, summary in listed)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(("channels", "size"), [(3, 32), (1, 28)])
def test_builds_and_forwards(name, channels, size):
    model = build_model(name, num_classes=7, in_channels=channels, image_size=size)
    assert model.training
    out = model(torch.randn(3, channels, size, size))
    assert out.shape == (3, 7)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", NAMES)
def test_seed_fixes_weights(name):
    a = _state(build_model(name, num_classes=10, seed=3))
    b = _state(build_model(name, num_classes=10, seed=3))
    c = _state(build_model(name, num_classes=10, seed=4))
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_build_model_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(5)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    build_model("lenet", num_classes=10, seed=9)
    build_model("convnet", num_classes=10, seed=9, width=4)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(torch.rand(5), expected)


def test_dummy_forward_does_not_touch_batchnorm_statistics():
    model = build_model("convnet", num_classes=10, width=4)
    bn = model.model.bn0
    assert model.training
    assert torch.equal(bn.running_mean, torch.zeros_like(bn.running_mean))
    assert int(bn.num_batches_tracked) == 0


def test_unknown_name_lists_known_models():
    with pytest.raises(ConfigError) as info:
        build_model("vgg16", num_classes=10)
    for name in NAMES:
        assert name in str(info.value)


def test_unknown_option_is_a_config_error():
    with pytest.raises(ConfigError, match="width"):
        build_model("convnet", num_classes=10, depth=3)
    with pytest.raises(ConfigError):
        build_model("mlp", num_classes=10, activation="gelu")
    with pytest.raises(ConfigError):
        build_model("cnn6", num_classes=10, activation="relu")
    with pytest.raises(ConfigError):
        build_model("lenet", num_classes=0)


@pytest.mark.parametrize(
    ("name", "size", "hint"),
    [
        ("lenet", 30, "multiple of 4"),
        ("convnet", 8, "9"),
        ("cnn6", 0, "positive"),
        ("resnet18", -1, "positive"),
    ],
)
def test_bad_image_size_is_a_shape_error(name, size, hint):
    with pytest.raises(ShapeError, match=hint):
        build_model(name, num_classes=10, image_size=size)


def test_dummy_forward_failure_becomes_shape_error():
    def build_fixed(*, in_channels, num_classes, image_size):
        return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * 32 * 32, num_classes))

    register_model("fixed32", summary="test only", sizes="exactly 32 pixels")(build_fixed)
    try:
        assert build_model("fixed32", num_classes=3) is not None
        with pytest.raises(ShapeError, match="exactly 32 pixels"):
            build_model("fixed32", num_classes=3, image_size=16)
    finally:
        MODELS.pop("fixed32", None)
        MODEL_INFO.pop("fixed32", None)


@pytest.mark.parametrize("name", NAMES)
def test_classifier_layer(name):
    model = build_model(name, num_classes=10)
    layer_name, layer = classifier_layer(model)
    assert layer_name == CLASSIFIER[name]
    assert isinstance(layer, nn.Linear)
    assert layer.out_features == 10
    assert dict(model.named_modules())[layer_name] is layer


def test_classifier_layer_by_type_not_position():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3), nn.LayerNorm(3))
    assert classifier_layer(model)[0] == "2"
    with pytest.raises(ConfigError):
        classifier_layer(nn.Sequential(nn.Conv2d(3, 3, 1)))


def test_lenet_matches_dlg():
    model = build_model("lenet", num_classes=10)
    params = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert params.min() >= -0.5 and params.max() <= 0.5
    assert params.min() < -0.45 and params.max() > 0.45  # really U(-0.5, 0.5), not PyTorch's default
    assert classifier_layer(model)[1].in_features == 768
    assert classifier_layer(LeNet(image_size=64))[1].in_features == 12 * 16 * 16


def test_convnet_and_cnn6_feature_sizes():
    assert classifier_layer(build_model("convnet", num_classes=10))[1].in_features == 2304
    assert classifier_layer(build_model("convnet", num_classes=10, width=8))[1].in_features == 36 * 8
    cnn6 = build_model("cnn6", num_classes=10)
    assert classifier_layer(cnn6)[1].in_features == 3200
    convs = [m for m in cnn6.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 6 and all(c.bias is None for c in convs)
    assert cnn6.fc.bias is not None


def test_resnet_depths():
    def convs(model):
        return [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]

    # Weighted layers: 3x3 convs + the final linear layer.
    assert len(convs(build_model("resnet18", num_classes=10))) + 1 == 18
    assert len(convs(build_model("resnet20", num_classes=10))) + 1 == 20
    assert len(convs(build_model("resnet32", num_classes=10))) + 1 == 32


def test_mlp_layers_and_options():
    model = build_model("mlp", num_classes=4, in_channels=1, image_size=8, hidden=(16,), activation="tanh")
    assert [name for name, _ in model.named_parameters()] == [
        "layers.0.weight",
        "layers.0.bias",
        "layers.1.weight",
        "layers.1.bias",
    ]
    linear = build_model("mlp", num_classes=4, in_channels=1, image_size=8, hidden=(), bias=False)
    assert [name for name, _ in linear.named_parameters()] == ["layers.0.weight"]
    with pytest.raises(ShapeError):
        model(torch.randn(2, 1, 9, 9))


def _separable_problem(n: int = 96) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    images = torch.randn(n, 1, 4, 4, generator=g)
    direction = torch.randn(16, generator=g)
    labels = (images.flatten(1) @ direction > 0).long()
    return images, labels


def test_train_model_lowers_loss_and_is_deterministic():
    images, labels = _separable_problem()
    model_a = build_model("mlp", num_classes=2, in_channels=1, image_size=4, hidden=(32,))
    model_b = build_model("mlp", num_classes=2, in_channels=1, image_size=4, hidden=(32,))
    state = torch.get_rng_state()
    losses_a = train_model(model_a, images=images, labels=labels, steps=60, lr=0.1, batch_size=16, seed=5)
    assert torch.equal(torch.get_rng_state(), state)
    losses_b = train_model(model_b, images=images, labels=labels, steps=60, lr=0.1, batch_size=16, seed=5)
    assert len(losses_a) == 60
    assert losses_a == losses_b
    assert all(torch.equal(p, q) for p, q in zip(model_a.parameters(), model_b.parameters(), strict=True))
    assert sum(losses_a[-10:]) / 10 < 0.5 * sum(losses_a[:10]) / 10
    with torch.no_grad():
        accuracy = (model_a(images).argmax(1) == labels).float().mean()
    assert accuracy > 0.9

    model_c = build_model("mlp", num_classes=2, in_channels=1, image_size=4, hidden=(32,))
    losses_c = train_model(model_c, images=images, labels=labels, steps=60, lr=0.1, batch_size=16, seed=6)
    assert losses_c != losses_a


def test_train_model_zero_steps_and_mode():
    images = torch.randn(8, 1, 9, 9, generator=torch.Generator().manual_seed(1))
    labels = torch.arange(8) % 2
    model = build_model("convnet", num_classes=2, in_channels=1, image_size=9, width=2)
    before = _state(model)
    assert train_model(model, images=images, labels=labels, steps=0) == []
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    model.eval()
    losses = train_model(model, images=images, labels=labels, steps=2)
    assert len(losses) == 2
    assert not model.training
    assert int(model.model.bn0.num_batches_tracked) == 2


def test_train_model_rejects_bad_input():
    images, labels = _separable_problem(8)
    model = build_model("mlp", num_classes=2, in_channels=1, image_size=4)
    with pytest.raises(ShapeError):
        train_model(model, images=images, labels=labels[:5], steps=1)
    with pytest.raises(ConfigError):
        train_model(model, images=images, labels=labels, steps=-1)
    with pytest.raises(ConfigError):
        train_model(model, images=images, labels=labels, steps=1, batch_size=0)


# -- options checked with their types; image sizes a model is built for ----------------------------------------


@pytest.mark.parametrize(
    ("name", "options", "expected"),
    [
        (
            "convnet",
            {"width": "abc"},
            "option 'width' must be an integer, got 'abc': pass e.g. --model-option width=64",
        ),
        ("convnet", {"width": 2.5}, "option 'width' must be an integer, got 2.5"),
        ("mlp", {"hidden": "wide"}, "option 'hidden' must be a comma-separated list of integers, got 'wide'"),
        ("mlp", {"bias": "maybe"}, "option 'bias' must be true or false, got 'maybe'"),
        ("cnn6", {"activation": 3}, "option 'activation' must be a string, got 3"),
    ],
)
def test_model_options_of_the_wrong_type_are_one_line_config_errors(name, options, expected):
    with pytest.raises(ConfigError) as info:
        build_model(name, num_classes=10, **options)
    message = str(info.value)
    assert expected in message and "\n" not in message
    assert "not supported" not in message


def test_model_options_are_converted_to_their_types():
    model = build_model("mlp", num_classes=3, in_channels=1, image_size=4, hidden=16, bias="false")
    assert [layer.out_features for layer in model.layers] == [16, 3]  # one width: a list of one
    assert all(layer.bias is None for layer in model.layers)


@pytest.mark.parametrize(("name", "size"), [("cnn6", 2), ("mlp", 3), ("resnet20", 1), ("convnet", 8)])
def test_images_smaller_than_a_model_takes_are_refused(name, size):
    with pytest.raises(ShapeError, match=r"--image-size \d+ or more") as info:
        build_model(name, num_classes=10, image_size=size)
    assert "\n" not in str(info.value)


def test_analysis_refuses_images_no_model_takes(tmp_path, capsys):
    from gradinv.analysis import analyze_model
    from gradinv.cli import main

    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 2 * 2, 10))
    with pytest.raises(ShapeError, match="--image-size 4 or more"):
        analyze_model(model, (3, 2, 2))
    assert main(["analyze", "--image-size", "2"]) == 2
    err = capsys.readouterr().err
    assert "--image-size 4 or more" in err and "Traceback" not in err
    assert main(["analyze", "--model", "convnet", "--model-option", "width=abc"]) == 2
    err = capsys.readouterr().err
    assert "option 'width' must be an integer, got 'abc'" in err and "not supported" not in err


def test_one_class_is_refused_with_the_reason_and_the_fix(tmp_path):
    from PIL import Image

    from gradinv.data import load_dataset

    for i in range(3):
        Image.new("RGB", (10, 10), (40 * i, 0, 0)).save(tmp_path / f"{i}.png")
    flat = load_dataset(tmp_path, image_size=8)  # a flat folder is one class: fine as data ...
    assert flat.num_classes == 1
    with pytest.raises(ConfigError, match=r"at least 2 classes.*cross-entropy is 0.*--num-classes") as info:
        build_model("mlp", num_classes=flat.num_classes, image_size=8)  # ... but not for a classifier
    assert "\n" not in str(info.value)
