"""Weights files: names, shapes and finite values of parameters and buffers are checked (gradinv.io)."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from gradinv.errors import UpdateFileError
from gradinv.io import load_state_into, save_model


def _net(seed: int = 0) -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 2 * 2, 3))


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _saved(tmp_path, **changes) -> tuple[str, dict[str, torch.Tensor]]:
    source = _net(seed=1)
    with torch.no_grad():
        source[1].running_var.mul_(2.0)
    state = _state(source)
    state.update(changes)
    path = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return str(path), state


def test_a_good_file_loads_parameters_and_buffers(tmp_path):
    path, state = _saved(tmp_path)
    model = _net()
    load_state_into(model, path)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    # buffers may be left out: they keep their values
    params_only = tmp_path / "params.safetensors"
    save_file({k: v for k, v in state.items() if "running" not in k and "batches" not in k}, str(params_only))
    fresh = _net()
    load_state_into(fresh, params_only)
    assert torch.equal(fresh[1].running_var, torch.ones(4))


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("1.running_var", torch.tensor([1.0, math.nan, 1.0, 1.0]), "'1.running_var' holds NaN or infinite"),
        ("1.running_mean", torch.tensor([0.0, math.inf, 0.0, 0.0]), "'1.running_mean' holds NaN or infinite"),
        ("3.bias", torch.tensor([0.0, -math.inf, 0.0]), "'3.bias' holds NaN or infinite"),
        ("1.running_var", torch.ones(5), "'1.running_var' has shape (5,) but the model expects (4,)"),
        ("1.running_var", torch.tensor([1.0, -1.0, 1.0, 1.0]), "'1.running_var' holds negative variances"),
        ("3.weight", torch.zeros(3, 20), "'3.weight' has shape (3, 20) but the model expects (3, 16)"),
    ],
)
def test_bad_tensors_are_one_line_errors_naming_file_and_tensor(tmp_path, name, value, expected):
    path, _ = _saved(tmp_path, **{name: value})
    model = _net()
    before = _state(model)
    with pytest.raises(UpdateFileError) as info:
        load_state_into(model, path)
    message = str(info.value)
    assert expected in message and "weights.safetensors" in message and "\n" not in message
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())  # nothing half-loaded


def test_unknown_and_missing_names_are_refused(tmp_path):
    path, state = _saved(tmp_path, **{"9.weight": torch.zeros(2)})
    with pytest.raises(UpdateFileError, match=r"unknown name.*9\.weight"):
        load_state_into(_net(), path)
    missing = tmp_path / "missing.safetensors"
    save_file({k: v for k, v in state.items() if k not in ("3.bias", "9.weight")}, str(missing))
    with pytest.raises(UpdateFileError, match=r"missing 1 parameter.*3\.bias"):
        load_state_into(_net(), missing)


def test_save_model_round_trips(tmp_path):
    source = _net(seed=2)
    path = tmp_path / "model.safetensors"
    save_model(source, path)
    target = _net(seed=3)
    load_state_into(target, path)
    assert all(torch.equal(target.state_dict()[k], v) for k, v in source.state_dict().items())
