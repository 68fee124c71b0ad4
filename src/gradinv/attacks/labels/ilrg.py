"""iLRG (Ma et al. 2023, "Instance-wise Batch Label Restoration via Gradients in Federated Learning", ICLR).

Per class ``i``, the ratio of the classifier's weight-gradient row to its bias gradient,
``e_i = dW[i] / db[i] = sum_n g_ni h_n / sum_n g_ni``, is a weighted mean of the batch's features dominated
by class ``i``'s own samples. Feeding it through the classifier gives ``P_i = softmax(W e_i + b)``, the
probabilities of a typical sample of class ``i``. With ``k_i`` samples of class ``i`` the bias gradient obeys
``B * db_j = sum_i k_i P_ij - k_j`` for every class ``j``; with ``sum_i k_i = B`` this is a linear system in
the counts, solved by least squares and rounded to integers summing to ``B``. One SVD-sized solve, no
iterations; it needs a bias, not non-negative features.
"""

from __future__ import annotations

import torch

from gradinv.attacks.labels.base import (
    LabelEstimate,
    classifier_update,
    num_samples,
    register_label_method,
    round_counts,
)
from gradinv.errors import AttackError
from gradinv.types import Observation

ILL_CONDITIONED = 5.0  # an embedding this many times longer than the median comes from a vanishing db


def class_embeddings(weight: torch.Tensor, db: torch.Tensor) -> torch.Tensor:
    """``dW[i] / db[i]`` per class. When a class's share of the batch matches its mean probability, ``db[i]``
    nearly vanishes and the ratio is noise divided by noise (e.g. balanced batches of 10 classes on an
    untrained model); such rows (norm above ``ILL_CONDITIONED`` times the median) get the ``|db|``-weighted
    mean of the well-conditioned ones instead, the batch's typical embedding."""
    safe = db.abs() > 1e-12 * float(db.abs().max())
    ratio = torch.where(safe[:, None], weight / torch.where(safe, db, 1.0)[:, None], 0.0)
    norms = ratio.norm(dim=1)
    good = safe & (norms <= ILL_CONDITIONED * norms[safe].median())
    if bool(good.any()) and not bool(good.all()):
        w = db.abs() * good
        typical = (w[:, None] * ratio).sum(dim=0) / w.sum()
        ratio = torch.where(good[:, None], ratio, typical)
    return ratio


@register_label_method(
    "ilrg",
    summary="iLRG (Ma et al. 2023): per-class counts from a linear system on the bias gradient",
    gives_counts=True,
)
def ilrg_labels(observation: Observation) -> LabelEstimate:
    b = num_samples(observation, "ilrg")
    cu = classifier_update(observation)
    db = cu.require_bias("ilrg")
    weight = observation.parameters[f"{cu.layer}.weight"].detach().double()
    bias = observation.parameters[f"{cu.layer}.bias"].detach().double()
    k = cu.num_classes
    embeddings = class_embeddings(cu.weight, db)
    probs = torch.softmax(embeddings @ weight.T + bias, dim=1)  # row i: probabilities of class i's samples
    system = torch.cat([probs.T - torch.eye(k, dtype=probs.dtype), torch.ones(1, k, dtype=probs.dtype)])
    target = torch.cat([b * db, torch.tensor([float(b)], dtype=db.dtype)])
    if not (bool(torch.isfinite(system).all()) and bool(torch.isfinite(target).all())):
        raise AttackError(
            "ilrg: the classifier's update gives no finite class embeddings (a vanishing or non-finite bias "
            "gradient); use a label method that reads the weight gradient's signs, or give the labels"
        )
    solution = torch.linalg.lstsq(system, target[:, None], driver="gelsd").solution.flatten()
    residual = float((system @ solution - target).norm() / target.norm())
    return LabelEstimate.from_counts("ilrg", round_counts(solution, b), scores=solution, residual=residual)
