"""A stateless twin of a model, safe to evaluate with ``torch.func`` (``functional_call``, ``grad``, ``vmap``)."""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping

from torch import Tensor, nn
from torch.func import functional_call, replace_all_batch_norm_modules_

from gradinv.errors import ConfigError


def stateless_twin(model: nn.Module, *, train_mode: bool) -> nn.Module:
    """A deep copy of ``model`` in the given mode, evaluated through parameter dictionaries.

    In train mode BatchNorm normalises with the batch's own statistics, as the client's local training does;
    the twin's BatchNorm layers stop tracking running statistics so that no call mutates a buffer (which
    ``vmap`` over restarts forbids and which would leak state between calls). The original is untouched.
    """
    twin = copy.deepcopy(model)
    for p in twin.parameters():
        p.requires_grad_(False)
    if train_mode:
        twin.train()
        replace_all_batch_norm_modules_(twin)
    else:
        twin.eval()
    return twin


def bind_state(model: nn.Module, params: Mapping[str, Tensor], buffers: Mapping[str, Tensor]) -> None:
    """Make ``params`` and ``buffers`` a twin's own tensors, so that calling it evaluates there without
    ``functional_call``'s per-call swapping (about 3% of an Inverting Gradients iteration on the width-64
    ConvNet on a CPU). Tied tensors (one parameter under several names, e.g. a language model's embedding and
    output head) get the given tensor under every name, as ``functional_call`` ties them. Only for a twin of
    :func:`stateless_twin`: the model is changed for good. :func:`is_bound` tells a replay that the same
    dictionaries were bound.
    """
    given = {**params, **buffers}
    slots = {  # every parameter and buffer slot, by name, tied ones under each name (None: a dropped buffer)
        f"{owner}.{attr}" if owner else attr: (table, attr)
        for owner, module in model.named_modules(remove_duplicate=False)
        for table in (module._parameters, module._buffers)
        for attr in table
    }
    unknown = sorted(set(given) - set(slots))
    if unknown:
        raise ConfigError(f"{unknown[0]!r} is neither a parameter nor a buffer of {type(model).__name__}")
    first: dict[int, str] = {}
    for name, (table, attr) in slots.items():
        if table[attr] is not None:
            first.setdefault(id(table[attr]), name)
    for name, (table, attr) in list(slots.items()):
        current = table[attr]
        value = given.get(name, None if current is None else given.get(first[id(current)]))
        if value is not None:  # not given: the twin keeps its own
            table[attr] = value
    model._gradinv_bound = (params, buffers)


def is_bound(model: nn.Module, params: Mapping[str, Tensor], buffers: Mapping[str, Tensor]) -> bool:
    """Whether :func:`bind_state` made exactly these dictionaries ``model``'s own tensors."""
    bound = getattr(model, "_gradinv_bound", None)
    return bound is not None and bound[0] is params and bound[1] is buffers


class _Reached(Exception):
    """Carries a layer's input out of a forward pass that need not go further."""

    def __init__(self, value: Tensor) -> None:
        super().__init__("layer reached")
        self.value = value


def layer_input(
    model: nn.Module, params: Mapping[str, Tensor], buffers: Mapping[str, Tensor], layer: str
) -> Callable[[Tensor], Tensor]:
    """``f(x)``: the input of ``model``'s submodule ``layer`` on inputs ``x``, flattened to (B, D).

    The forward pass stops at that layer. Pure in ``x`` (``torch.func`` transforms apply); ``model`` should be
    a stateless twin (:func:`stateless_twin`): a hook is added to it for the duration of each call.
    """
    module = model.get_submodule(layer)
    state = (dict(params), dict(buffers))

    def raise_input(_module: nn.Module, args: tuple) -> None:
        raise _Reached(args[0])

    def f(x: Tensor) -> Tensor:
        handle = module.register_forward_pre_hook(raise_input)
        try:
            functional_call(model, state, (x,))
        except _Reached as reached:
            return reached.value.flatten(1)
        finally:
            handle.remove()
        raise ConfigError(f"the forward pass never reached layer {layer!r}")

    return f


def batch_statistics(model: nn.Module, modules: list[str]) -> Callable[..., dict[str, tuple[Tensor, Tensor]]]:
    """``stats(params, buffers, x)``: per-channel mean and (biased) variance of the inputs of ``modules``
    (BatchNorm layers of ``model``, a stateless twin) on the batch ``x``."""
    handles_for = {name: model.get_submodule(name) for name in modules}

    def stats(
        params: Mapping[str, Tensor], buffers: Mapping[str, Tensor], x: Tensor
    ) -> dict[str, tuple[Tensor, Tensor]]:
        seen: dict[str, tuple[Tensor, Tensor]] = {}
        handles = []
        for name, module in handles_for.items():

            def hook(_m: nn.Module, args: tuple, name: str = name) -> None:
                a = args[0]
                dims = [0, *range(2, a.dim())]
                seen[name] = (a.mean(dims), a.var(dims, unbiased=False))

            handles.append(module.register_forward_pre_hook(hook))
        try:
            functional_call(model, (dict(params), dict(buffers)), (x,))
        finally:
            for h in handles:
                h.remove()
        return seen

    return stats
