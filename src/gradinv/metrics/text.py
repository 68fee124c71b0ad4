"""Text reconstruction scores: ROUGE-N, ROUGE-L, token accuracy and exact-sequence rate.

ROUGE follows Lin, "ROUGE: A Package for Automatic Evaluation of Summaries" (ACL workshop 2004), reported as
the F1 score of precision (over the reconstruction) and recall (over the truth), as gradient-inversion papers
on text do (TAG, Deng et al., EMNLP Findings 2021; LAMP, Balunović et al., NeurIPS 2022; DAGER, Petrov et
al., NeurIPS 2024) and as the ``rouge_score`` package computes it:

* ROUGE-N: ``overlap = sum over n-grams g of min(count_recon(g), count_truth(g))``,
  ``P = overlap / #n-grams(recon)``, ``R = overlap / #n-grams(truth)``, ``F1 = 2PR / (P + R)`` (Lin 2004, eq. 1
  for the recall).
* ROUGE-L: ``P = LCS / len(recon)``, ``R = LCS / len(truth)`` with LCS the longest common subsequence,
  ``F1 = 2PR / (P + R)`` (Lin 2004, eqs. 2-4 with beta = 1).

F1 is 0 when there is no overlap, including when a sequence is shorter than ``n`` (as in ``rouge_score``).

A sequence is a 1-D tensor or array of token ids, a list of ids or of string tokens, or a ``str`` (split at
whitespace). A batch is a 2-D tensor or array, or a list of sequences; batch ROUGE pairs ``recon[i]`` with
``truth[i]`` and averages over the pairs. A gradient reveals a batch only up to its order, so
:func:`token_accuracy`, :func:`exact_sequence_rate` and :func:`score_text` first match reconstructions to true
sequences one-to-one (Hungarian algorithm, ``scipy.optimize.linear_sum_assignment``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable, Sequence

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from gradinv.errors import ConfigError, ShapeError

__all__ = [
    "exact_sequence_rate",
    "lcs_length",
    "match_sequences",
    "rouge_l",
    "rouge_n",
    "score_text",
    "token_accuracy",
]

Token = Hashable
TextSequence = Tensor | np.ndarray | Sequence[int] | Sequence[str] | str
TextBatch = Tensor | np.ndarray | Sequence[TextSequence]


# --- inputs --------------------------------------------------------------------------------------------------------


def _is_token(value: object) -> bool:
    return isinstance(value, (str, int, np.integer)) or (isinstance(value, Tensor) and value.dim() == 0)


def _token(value: object) -> Token:
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        raise ShapeError("a token must be an integer id or a string, got a bool")
    return int(value)  # int, numpy integer or 0-d tensor


def _as_sequence(x: object, what: str) -> tuple[Token, ...]:
    if isinstance(x, str):
        return tuple(x.split())
    if isinstance(x, (Tensor, np.ndarray)):
        if x.ndim != 1:
            raise ShapeError(f"{what} must be one sequence (1-D), got shape {tuple(x.shape)}")
        values = x.detach().cpu().tolist() if isinstance(x, Tensor) else x.tolist()
        return tuple(_token(v) for v in values)
    if isinstance(x, Sequence) and all(_is_token(v) for v in x):
        return tuple(_token(v) for v in x)
    raise ShapeError(f"{what} must be a sequence of token ids or strings, or a str, got {type(x).__name__}")


def _is_batch(x: object) -> bool:
    if isinstance(x, (Tensor, np.ndarray)):
        if x.ndim not in (1, 2):
            raise ShapeError(f"expected one sequence (1-D) or a batch (2-D), got shape {tuple(x.shape)}")
        return x.ndim == 2
    if isinstance(x, str) or not isinstance(x, Sequence):
        return False
    return len(x) > 0 and all(isinstance(v, (list, tuple, Tensor, np.ndarray)) for v in x)


def _as_batch(x: object, what: str) -> list[tuple[Token, ...]]:
    if isinstance(x, (Tensor, np.ndarray)):
        if x.ndim != 2:
            raise ShapeError(f"{what} must be a batch of sequences (B, L), got shape {tuple(x.shape)}")
        return [_as_sequence(row, f"a row of {what}") for row in x]
    if isinstance(x, str) or not isinstance(x, Sequence):
        raise ShapeError(f"{what} must be a (B, L) tensor or a list of sequences, got {type(x).__name__}")
    return [_as_sequence(row, f"a sequence of {what}") for row in x]


def _pairs(recon: object, truth: object) -> list[tuple[tuple[Token, ...], tuple[Token, ...]]]:
    """``(recon, truth)`` sequence pairs: one pair, or one per row of two batches."""
    batch_r, batch_t = _is_batch(recon), _is_batch(truth)
    if batch_r != batch_t:
        raise ShapeError(
            "pass either two sequences or two batches of sequences, got a "
            f"{'batch' if batch_r else 'sequence'} and a {'batch' if batch_t else 'sequence'}"
        )
    if not batch_r:
        return [(_as_sequence(recon, "the reconstruction"), _as_sequence(truth, "the truth"))]
    rows_r, rows_t = _as_batch(recon, "the reconstruction"), _as_batch(truth, "the truth")
    if not rows_t:
        raise ShapeError("the true batch is empty: give at least one true sequence")
    if len(rows_r) != len(rows_t):
        raise ShapeError(
            f"batches of {len(rows_r)} reconstructed and {len(rows_t)} true sequences: ROUGE pairs them row by "
            "row, so give as many of each (use score_text to match them first)"
        )
    return list(zip(rows_r, rows_t, strict=True))


# --- ROUGE ---------------------------------------------------------------------------------------------------------


def _f1(overlap: int, n_recon: int, n_truth: int) -> float:
    if overlap == 0 or n_recon == 0 or n_truth == 0:
        return 0.0
    precision, recall = overlap / n_recon, overlap / n_truth
    return 2.0 * precision * recall / (precision + recall)


def _ngrams(seq: Sequence[Token], n: int) -> Counter[tuple[Token, ...]]:
    return Counter(tuple(seq[i : i + n]) for i in range(len(seq) - n + 1))


def _rouge_n_pair(recon: Sequence[Token], truth: Sequence[Token], n: int) -> float:
    grams_r, grams_t = _ngrams(recon, n), _ngrams(truth, n)
    overlap = sum((grams_r & grams_t).values())
    return _f1(overlap, max(len(recon) - n + 1, 0), max(len(truth) - n + 1, 0))


def lcs_length(a: Sequence[Token], b: Sequence[Token]) -> int:
    """Length of the longest common subsequence of ``a`` and ``b`` (dynamic programming, O(len(a) len(b)))."""
    if len(a) < len(b):
        a, b = b, a
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def _rouge_l_pair(recon: Sequence[Token], truth: Sequence[Token]) -> float:
    return _f1(lcs_length(recon, truth), len(recon), len(truth))


def rouge_n(recon: TextSequence | TextBatch, truth: TextSequence | TextBatch, *, n: int) -> float:
    """ROUGE-N F1 of one reconstructed sequence against the true one, or the mean over the rows of two batches
    (row ``i`` against row ``i``; no matching)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"ROUGE-N needs a positive integer n (1 for unigrams, 2 for bigrams), got {n!r}")
    pairs = _pairs(recon, truth)
    return float(np.mean([_rouge_n_pair(r, t, n) for r, t in pairs]))


def rouge_l(recon: TextSequence | TextBatch, truth: TextSequence | TextBatch) -> float:
    """ROUGE-L (longest common subsequence) F1 of one sequence pair, or the mean over the rows of two batches."""
    pairs = _pairs(recon, truth)
    return float(np.mean([_rouge_l_pair(r, t) for r, t in pairs]))


# --- batch matching ------------------------------------------------------------------------------------------------


def _grid(recon: object, truth: object) -> tuple[Tensor, Tensor]:
    """Both batches as int64 tensors ``(Br, L)`` and ``(Bt, L)``; string tokens are numbered consistently."""
    rows_r, rows_t = _as_batch(recon, "the reconstruction"), _as_batch(truth, "the truth")
    if not rows_t:
        raise ShapeError("the true batch is empty: give at least one true sequence")
    lengths = {len(row) for row in rows_r + rows_t}
    if len(lengths) != 1:
        raise ShapeError(
            f"token accuracy compares positions, so every sequence needs the same length, got lengths "
            f"{sorted(lengths)}: pad or cut them to one length"
        )
    if len(rows_r) < len(rows_t):
        raise ShapeError(
            f"cannot match {len(rows_t)} true sequences with only {len(rows_r)} reconstructions; the "
            "reconstruction needs at least as many sequences as the truth"
        )
    ids: dict[Token, int] = {}
    if any(isinstance(tok, str) for row in rows_r + rows_t for tok in row):
        for row in rows_r + rows_t:
            for tok in row:
                ids.setdefault(tok, len(ids))
        rows_r = [tuple(ids[t] for t in row) for row in rows_r]
        rows_t = [tuple(ids[t] for t in row) for row in rows_t]
    length = lengths.pop()

    def as_tensor(rows: list[tuple[Token, ...]]) -> Tensor:
        return torch.tensor(rows, dtype=torch.int64).reshape(len(rows), length)

    return as_tensor(rows_r), as_tensor(rows_t)


def _pad_mask(truth: Tensor, pad_id: int | None) -> Tensor:
    return torch.ones_like(truth, dtype=torch.bool) if pad_id is None else truth != int(pad_id)


def _scores(r: Tensor, t: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per pair (Br, Bt): position matches (counted where the truth is not padding), exact matches, and the
    multiset overlap of the two sequences' tokens."""
    equal = (r[:, None, :] == t[None, :, :]) & mask[None, :, :]
    matches = equal.sum(-1)
    exact = matches == mask.sum(-1)[None, :]
    recon_counts = [Counter(row.tolist()) for row in r]
    truth_counts = [Counter(row[keep].tolist()) for row, keep in zip(t, mask, strict=True)]
    overlap = torch.tensor(
        [[sum((rc & tc).values()) for tc in truth_counts] for rc in recon_counts], dtype=torch.int64
    ).reshape(matches.shape)
    return matches, exact, overlap


def _assign(score: Tensor) -> Tensor:
    """``perm`` (Bt,) maximising ``sum_i score[perm[i], i]`` over one-to-one assignments."""
    rows, cols = linear_sum_assignment(score.T.to(torch.float64).numpy(), maximize=True)
    perm = np.empty(score.shape[1], dtype=np.int64)
    perm[rows] = cols
    return torch.from_numpy(perm)


def _match(r: Tensor, t: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    matches, exact, overlap = _scores(r, t, mask)
    length = t.shape[1]
    # Lexicographic: most position matches, then most exact sequences, then most shared tokens. Each
    # tie-breaker is below one unit of the level above: exact * (L + 1) + overlap <= 2L + 1 < 2L + 2.
    score = matches * (2 * length + 2) + exact.long() * (length + 1) + overlap
    return _assign(score), matches, exact


def match_sequences(recon: TextBatch, truth: TextBatch, *, pad_id: int | None = None) -> Tensor:
    """Optimal one-to-one matching of reconstructed to true sequences; returns ``perm`` (LongTensor, ``Bt``).

    ``recon[perm[i]]`` is matched with ``truth[i]``. The matching maximises the number of positions where the
    tokens agree (positions where the truth is ``pad_id`` are not counted), then the number of exactly
    recovered sequences, then the number of shared tokens regardless of position. Extra reconstructions are
    left unmatched.
    """
    r, t = _grid(recon, truth)
    perm, _, _ = _match(r, t, _pad_mask(t, pad_id))
    return perm


def token_accuracy(recon: TextBatch, truth: TextBatch, *, pad_id: int | None = None) -> float:
    """Fraction of true tokens recovered at their position, after the optimal matching of
    :func:`match_sequences` (which maximises exactly this number); ``pad_id`` positions of the truth are not
    counted."""
    r, t = _grid(recon, truth)
    mask = _pad_mask(t, pad_id)
    perm, matches, _ = _match(r, t, mask)
    total = int(mask.sum())
    if total == 0:
        return 1.0
    return float(matches[perm, torch.arange(t.shape[0])].sum()) / total


def exact_sequence_rate(recon: TextBatch, truth: TextBatch, *, pad_id: int | None = None) -> float:
    """Fraction of true sequences recovered exactly (every non-``pad_id`` position right), each reconstruction
    counting for one true sequence at most (optimal matching for this number)."""
    r, t = _grid(recon, truth)
    mask = _pad_mask(t, pad_id)
    equal = ((r[:, None, :] == t[None, :, :]) | ~mask[None, :, :]).all(-1)
    perm = _assign(equal.long())
    return float(equal[perm, torch.arange(t.shape[0])].sum()) / t.shape[0]


def score_text(recon: TextBatch, truth: TextBatch, *, pad_id: int | None = None) -> dict[str, float]:
    """All text scores of a reconstructed batch, computed on one matching.

    Sequences are matched with :func:`match_sequences`, then each matched pair is scored and the scores are
    averaged over the true sequences: ``rouge1``, ``rouge2``, ``rougeL`` (F1; ``pad_id`` tokens are removed
    from both sequences first), ``token_accuracy`` (as :func:`token_accuracy`) and ``exact`` (fraction of true
    sequences recovered exactly by their matched reconstruction). Without ``pad_id``, ``exact`` equals
    :func:`exact_sequence_rate` (a matching with the most position matches can always keep every exact pair,
    by the triangle inequality of the Hamming distance, and ties go to exact pairs); with padding it can be
    lower.
    """
    r, t = _grid(recon, truth)
    mask = _pad_mask(t, pad_id)
    perm, matches, exact = _match(r, t, mask)
    index = torch.arange(t.shape[0])
    pad = None if pad_id is None else int(pad_id)
    rouge1, rouge2, rougel = [], [], []
    for i in range(t.shape[0]):
        rec = [tok for tok in r[perm[i]].tolist() if tok != pad]
        tru = [tok for tok in t[i].tolist() if tok != pad]
        rouge1.append(_rouge_n_pair(rec, tru, 1))
        rouge2.append(_rouge_n_pair(rec, tru, 2))
        rougel.append(_rouge_l_pair(rec, tru))
    total = int(mask.sum())
    return {
        "rouge1": float(np.mean(rouge1)),
        "rouge2": float(np.mean(rouge2)),
        "rougeL": float(np.mean(rougel)),
        "token_accuracy": float(matches[perm, index].sum()) / total if total else 1.0,
        "exact": float(exact[perm, index].float().mean()),
    }
