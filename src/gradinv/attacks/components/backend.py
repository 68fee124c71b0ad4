"""Which CPU convolution kernels an attack runs on.

PyTorch runs a CPU convolution through oneDNN (``mkldnn``) when it is available. For very small convolutions its
fixed cost per call outweighs its speed. One DLG evaluation (forward, replayed gradient, its gradient with respect to
the candidate; ``python bench/engine.py --backends``, 2 threads, bench/results/engine_backends.md) took, with
PyTorch's native kernels instead, 0.63x as long on DLG's LeNet at batch 1 (three 12-channel 5x5 convolutions, 0.69
million multiply-accumulates per forward pass) and 0.62x at batch 2, 1.01x at batch 4 (2.8 million), and 1.1-2.1x
from there on (LeNet at batch 8, the 6-layer CNN from 4.7 million, ResNet-20). :func:`convolution_backend`
therefore switches oneDNN off while an attack runs on a CPU when one forward pass of the client's batch costs at
most :data:`NATIVE_CONV_MACS` multiply-accumulates in convolutions.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from itertools import chain

import torch
from torch import nn
from torch.func import functional_call

from gradinv.types import Observation

#: at most this many multiply-accumulates in one forward pass's convolutions: PyTorch's native CPU kernels
NATIVE_CONV_MACS = 2_500_000


def convolution_macs(model: nn.Module, input_shape: tuple[int, ...], batch: int) -> int | None:
    """Multiply-accumulates of ``model``'s convolutions in one forward pass of a ``(batch, *input_shape)`` input,
    from shapes alone (the pass runs on the ``meta`` device; the model and its buffers are not touched); None
    when the model cannot run there."""
    convs = [m for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)]
    if not convs:
        return 0
    total = 0

    def count(module: nn.modules.conv._ConvNd, _inputs: object, output: torch.Tensor) -> None:
        nonlocal total
        total += output.numel() * (module.in_channels // module.groups) * math.prod(module.kernel_size)

    handles = [m.register_forward_hook(count) for m in convs]
    try:
        named = chain(model.named_parameters(), model.named_buffers())
        state = {k: torch.empty_like(v, device="meta") for k, v in named}
        with torch.no_grad():
            functional_call(model, state, (torch.empty((batch, *input_shape), device="meta"),))
    except Exception:  # noqa: BLE001 - a model that needs real values (e.g. token ids) keeps the default kernels
        return None
    finally:
        for handle in handles:
            handle.remove()
    return total


def native_convolutions(observation: Observation) -> bool:
    """Whether an attack on ``observation`` should run PyTorch's native convolution kernels (see the module)."""
    k = observation.knowledge
    if observation.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    if k.input_shape is None or k.num_samples is None:
        return False
    macs = convolution_macs(observation.model, tuple(k.input_shape), int(k.num_samples))
    return macs is not None and 0 < macs <= NATIVE_CONV_MACS


@contextlib.contextmanager
def convolution_backend(observation: Observation) -> Iterator[None]:
    """Run the body with oneDNN switched off when :func:`native_convolutions` says so (restored afterwards)."""
    if not native_convolutions(observation):
        yield
        return
    enabled = torch.backends.mkldnn.enabled  # set directly: mkldnn.flags() also sets (and warns about) TF32
    torch.backends.mkldnn.enabled = False
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = enabled
