"""A stateless twin of a model, safe to evaluate with ``torch.func`` (``functional_call``, ``grad``, ``vmap``)."""

from __future__ import annotations

import copy

from torch import nn
from torch.func import replace_all_batch_norm_modules_


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
