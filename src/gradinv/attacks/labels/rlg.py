"""RLG (Dang et al. 2021, "Revealing and Protecting Labels in Distributed Training", NeurIPS).

The classifier's weight gradient ``dW = (1/B) sum_n g_n h_n^T`` has its column space spanned by the per-sample
vectors ``g_n = p_n - onehot(y_n)``, each with exactly one negative entry, at its label. RLG takes that space
from an SVD (rank ``r``, about the batch size) and, for each class ``c``, solves a linear program: is there a
vector in the space that is negative at ``c`` and positive everywhere else? Such a vector exists for every
class in the batch; for an absent class it generically does not, as long as ``r < K - 1``. The program here
maximises the sign margin ``t`` (``u_c.z <= -t``, ``u_j.z >= t``, ``|z| <= 1``); a class is present when
``t > 0``. Gives the set, not counts; needs no bias and no assumption on the activations.

Most classes are decided without a program, by certificates that give the LP's answer exactly. With ``U`` the
basis and ``M = U U^T`` (the projector onto the space): ``v = -M[:, c]`` lies in the space and has
``v_c = -|u_c|^2 < 0``; if all its other entries are positive it *is* the vector sought (present). If instead
the projection of the all-ones vector onto the orthogonal complement, corrected to vanish at ``c``
(``w = o - (o_c / q_c) q`` with ``o = (I - M) 1`` and ``q = (I - M) e_c``), is non-negative, then by Gordan's
alternative no vector of the space has the sign pattern (absent). Only undecided classes get an LP.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linprog

from gradinv.attacks.labels.base import LabelEstimate, classifier_update, register_label_method
from gradinv.errors import AttackError
from gradinv.types import Observation

RANK_RTOL = 1e-5  # singular values below this fraction of the largest are float32 round-off
MARGIN_TOL = 1e-9


def _margin(basis: np.ndarray, c: int) -> float:
    k, r = basis.shape
    signs = np.ones(k)
    signs[c] = -1.0
    # variables (z_1..z_r, t); maximise t  <=>  minimise -t; constraints: -sign_j * u_j.z + t <= 0
    a_ub = np.hstack([-signs[:, None] * basis, np.ones((k, 1))])
    bounds = [(-1.0, 1.0)] * r + [(0.0, 1.0)]
    result = linprog(c=np.r_[np.zeros(r), -1.0], A_ub=a_ub, b_ub=np.zeros(k), bounds=bounds, method="highs")
    return float(result.x[-1]) if result.status == 0 else 0.0


@register_label_method(
    "rlg",
    summary="RLG (Dang et al. 2021): SVD of the weight gradient + one linear program per class (the set)",
    gives_counts=False,
    iterative=True,
)
def rlg_labels(observation: Observation) -> LabelEstimate:
    cu = classifier_update(observation)
    u, s, _ = torch.linalg.svd(cu.weight, full_matrices=False)
    rank = int((s > RANK_RTOL * s[0]).sum()) if float(s[0]) > 0 else 0
    k = cu.num_classes
    if rank >= k - 1:
        raise AttackError(
            f"RLG needs the gradient's rank below classes - 1, but it is {rank} with {k} classes (a batch this "
            "large spans every label direction): use ilrg or llg"
        )
    basis = u[:, :rank]
    projector = basis @ basis.T
    # witness: -M[:, c] is negative at c; present if positive everywhere else
    witness = -projector.clone()
    witness.fill_diagonal_(torch.inf)
    present = witness.min(dim=0).values > 0
    # Gordan certificate: w = o - (o_c / q_c) q >= 0 off c, with o = (I - M) 1 and q = (I - M) e_c
    complement = torch.eye(k, dtype=projector.dtype) - projector
    ones_perp = complement.sum(dim=1)
    diag = complement.diagonal()
    w = ones_perp[:, None] - (ones_perp / diag)[None, :] * complement
    w.fill_diagonal_(torch.inf)
    absent = (w.min(dim=0).values >= 0) & ~present
    undecided = torch.nonzero(~present & ~absent).flatten().tolist()
    margins = torch.where(present, 1.0, 0.0).double()
    for c in undecided:
        margins[c] = _margin(basis.numpy(), c)
    classes = torch.nonzero(margins > MARGIN_TOL).flatten()
    return LabelEstimate.from_classes(
        "rlg", classes, num_classes=k, scores=-margins, rank=rank, linear_programs=len(undecided)
    )
