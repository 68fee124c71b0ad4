"""Reading and writing models and updates as safetensors files keyed by parameter name.

Nothing is unpickled: untrusted files (a client's update, a saved model) load through safetensors only.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from gradinv._atomic import atomic_path
from gradinv.errors import UpdateFileError


def _read(path: str | Path, what: str) -> dict[str, Tensor]:
    p = Path(path)
    if not p.is_file():
        raise UpdateFileError(f"{what} file '{p}' does not exist: pass the path of a .safetensors file")
    try:
        return load_file(str(p))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UpdateFileError(
            f"{what} file '{p}' is not a readable safetensors file ({first}): save it with "
            "safetensors.torch.save_file or `gradinv capture`"
        ) from None


def _check_keys(found: Mapping[str, Tensor], expected: Mapping[str, Tensor], what: str, path: Path) -> None:
    missing = sorted(set(expected) - set(found))
    extra = sorted(set(found) - set(expected))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} parameter(s) such as {missing[:3]}")
        if extra:
            parts.append(f"{len(extra)} unknown name(s) such as {extra[:3]}")
        raise UpdateFileError(
            f"{what} file '{path}' does not match the model ({'; '.join(parts)}): "
            "check --model and its options are the ones the file was saved for"
        )
    for name, t in expected.items():
        if tuple(found[name].shape) != tuple(t.shape):
            raise UpdateFileError(
                f"{what} file '{path}': '{name}' has shape {tuple(found[name].shape)} but the model expects "
                f"{tuple(t.shape)}: check --model, --image-size and the number of classes"
            )
        if (found[name].is_floating_point() or found[name].is_complex()) and not torch.isfinite(found[name]).all():
            raise UpdateFileError(
                f"{what} file '{path}': '{name}' holds NaN or infinite values: the file is corrupt or was saved "
                "from a diverged run; save it again from a healthy one"
            )


def load_update(path: str | Path, params: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A captured update (gradient or weight delta), checked against the parameters it belongs to."""
    tensors = _read(path, "update")
    _check_keys(tensors, params, "update", Path(path))
    return {k: tensors[k].to(params[k].dtype) for k in params}


def update_metadata(path: str | Path) -> dict[str, Any]:
    """The JSON metadata stored with an update by :func:`save_update` (e.g. its protocol); ``{}`` if none."""
    _read(path, "update")  # same checks and messages as loading it
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata() or {}
    out = {}
    for key, value in meta.items():
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def load_state_into(model: nn.Module, path: str | Path) -> None:
    """Load parameters (and buffers, if present) from a safetensors file into ``model``.

    Every parameter must be in the file; buffers (BatchNorm statistics) may be left out, and then keep their
    values. Names, shapes and finite values are checked for parameters and buffers alike before anything is
    copied, so a bad file leaves ``model`` untouched."""
    tensors = _read(path, "weights")
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    _check_keys({k: v for k, v in tensors.items() if k in params or k not in buffers}, params, "weights", Path(path))
    stored_buffers = {k: v for k, v in tensors.items() if k in buffers}
    _check_keys(stored_buffers, {k: buffers[k] for k in stored_buffers}, "weights", Path(path))
    for module_name, module in model.named_modules():
        key = f"{module_name}.running_var" if module_name else "running_var"
        bad = isinstance(module, nn.modules.batchnorm._BatchNorm) and key in stored_buffers
        if bad and (stored_buffers[key] < 0).any():
            raise UpdateFileError(
                f"weights file '{path}': '{key}' holds negative variances: the file is corrupt; save it again "
                "from a healthy run"
            )
    with torch.no_grad():
        for name, t in tensors.items():
            target = params.get(name, buffers.get(name))
            target.copy_(t.to(target.dtype))


def _atomic_save(tensors: Mapping[str, Tensor], path: str | Path, metadata: Mapping[str, str] | None) -> None:
    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)


def save_update(update: Mapping[str, Tensor], path: str | Path, *, metadata: Mapping[str, Any] | None = None) -> None:
    """Write an update keyed by parameter name (atomically); ``metadata`` is stored as JSON strings."""
    meta = {k: json.dumps(v) for k, v in (metadata or {}).items()}
    _atomic_save(update, path, meta)


def save_model(model: nn.Module, path: str | Path) -> None:
    """Write a model's parameters and buffers keyed by name (atomically)."""
    state = {k: v for k, v in model.state_dict().items()}
    _atomic_save(state, path, None)


def write_json_atomic(data: Any, path: str | Path) -> None:
    """Write JSON so that a reader never sees a half-written file."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n")
