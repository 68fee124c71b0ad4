"""Attacks: one paper, one file. Importing this package registers them all in :data:`ATTACKS`."""

from gradinv.attacks import (  # noqa: F401  (registers)
    analytic,
    april,
    bayesian,
    copa,
    cpl,
    dager,
    dlg,
    fedavg_epochs,
    gias,
    gradattack,
    gradinversion,
    idlg,
    imprint,
    inverting_gradients,
    lamp,
    ppdl_spn,
    rgap,
    sapag,
    tag,
    token_leak,
)
from gradinv.attacks.base import ATTACKS, Attack, build_attack, register_attack

__all__ = ["ATTACKS", "Attack", "build_attack", "register_attack"]
