"""Label recovery scores, independent of the order of the batch."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

import numpy as np
import torch

__all__ = ["label_accuracy", "label_existence_accuracy"]


def _as_ints(labels: Iterable[int] | torch.Tensor | np.ndarray) -> list[int]:
    if isinstance(labels, torch.Tensor):
        return [int(v) for v in labels.detach().cpu().reshape(-1).tolist()]
    if isinstance(labels, np.ndarray):
        return [int(v) for v in labels.reshape(-1).tolist()]
    return [int(v) for v in labels]


def label_accuracy(
    predicted: Iterable[int] | torch.Tensor | np.ndarray, truth: Iterable[int] | torch.Tensor | np.ndarray
) -> float:
    """Order-free label accuracy: multiset overlap divided by the batch size.

    ``sum over classes of min(count in predicted, count in truth) / len(truth)``, as used to score label
    restoration from gradients (e.g. iDLG, Zhao et al. 2020; Yin et al. 2021). Example: predicted
    ``[1, 1, 2]`` vs truth ``[1, 2, 2]`` gives 2/3. Returns 1.0 if both are empty, 0.0 if only ``truth`` is.
    """
    pred, true = _as_ints(predicted), _as_ints(truth)
    if not true:
        return 1.0 if not pred else 0.0
    overlap = sum((Counter(pred) & Counter(true)).values())
    return overlap / len(true)


def label_existence_accuracy(
    predicted: Iterable[int] | torch.Tensor | np.ndarray, truth: Iterable[int] | torch.Tensor | np.ndarray
) -> float:
    """Which classes are present, ignoring counts: Jaccard overlap of the two label *sets*.

    ``|set(predicted) & set(truth)| / |set(predicted) | set(truth)|``; 1.0 exactly when the same classes
    occur, penalising both missed and spurious classes. Returns 1.0 if both are empty.
    """
    pred, true = set(_as_ints(predicted)), set(_as_ints(truth))
    union = pred | true
    if not union:
        return 1.0
    return len(pred & true) / len(union)


#: The count accuracy of label-recovery papers (iLRG's "instance recall"): multiset overlap over batch size.
label_count_accuracy = label_accuracy
