"""Attacks: one paper, one file. Importing this package registers them all in :data:`ATTACKS`."""

from gradinv.attacks import (  # noqa: F401  (registers)
    analytic,
    bayesian,
    copa,
    cpl,
    dlg,
    fedavg_epochs,
    gias,
    gradattack,
    gradinversion,
    idlg,
    imprint,
    inverting_gradients,
    ppdl_spn,
    rgap,
    sapag,
)
from gradinv.attacks.base import ATTACKS, Attack, build_attack, register_attack

__all__ = ["ATTACKS", "Attack", "build_attack", "register_attack"]
