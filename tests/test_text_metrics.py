"""Tests for gradinv.metrics.text: ROUGE on hand-computed cases and against rouge_score, matched batch scores."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from gradinv.errors import ConfigError, ShapeError
from gradinv.metrics.text import (
    exact_sequence_rate,
    lcs_length,
    match_sequences,
    rouge_l,
    rouge_n,
    score_text,
    token_accuracy,
)

RECON = "the cat sat on the mat"
TRUTH = "the cat is on the mat"


def test_rouge_by_hand() -> None:
    # unigrams: recon {the:2, cat, sat, on, mat}, truth {the:2, cat, is, on, mat}; clipped overlap
    # the 2 + cat + on + mat = 5 of 6 each: P = R = 5/6, F1 = 5/6
    assert rouge_n(RECON, TRUTH, n=1) == pytest.approx(5 / 6)
    # bigrams: recon (the cat)(cat sat)(sat on)(on the)(the mat), truth (the cat)(cat is)(is on)(on the)(the mat):
    # overlap 3 of 5 each, F1 = 3/5
    assert rouge_n(RECON, TRUTH, n=2) == pytest.approx(3 / 5)
    # LCS "the cat on the mat" = 5: P = R = 5/6
    assert rouge_l(RECON, TRUTH) == pytest.approx(5 / 6)
    # recon "a b c" vs truth "a b c d e": unigram overlap 3, P = 1, R = 3/5, F1 = 2 * 0.6 / 1.6 = 0.75;
    # bigrams ab bc vs ab bc cd de: P = 1, R = 1/2, F1 = 2/3; LCS 3 gives the unigram numbers, 0.75
    assert rouge_n(["a", "b", "c"], ["a", "b", "c", "d", "e"], n=1) == pytest.approx(0.75)
    assert rouge_n(["a", "b", "c"], ["a", "b", "c", "d", "e"], n=2) == pytest.approx(2 / 3)
    assert rouge_l("a b c", "a b c d e") == pytest.approx(0.75)


def test_rouge_on_token_ids_by_hand() -> None:
    # reversed order: every unigram shared (F1 1), no bigram shared, LCS 1 of 4 (F1 1/4)
    assert rouge_n([1, 2, 3, 4], [4, 3, 2, 1], n=1) == 1.0
    assert rouge_n(torch.tensor([1, 2, 3, 4]), np.array([4, 3, 2, 1]), n=2) == 0.0
    assert rouge_l(torch.tensor([1, 2, 3, 4]), [4, 3, 2, 1]) == pytest.approx(0.25)
    # clipping: recon 7 7 7 vs truth 7 5 6 shares one 7: P = R = 1/3
    assert rouge_n([7, 7, 7], [7, 5, 6], n=1) == pytest.approx(1 / 3)
    # shorter than n: no bigram at all, 0 (as rouge_score); empty sequences score 0
    assert rouge_n([1], [1], n=2) == 0.0
    assert rouge_n([], [1, 2], n=1) == 0.0 and rouge_l([], []) == 0.0
    assert lcs_length([1, 3, 4, 1, 2], [3, 1, 2, 4]) == 3  # "3 1 2" (or "3 4"... the longest has 3)
    assert lcs_length("ABCBDAB", "BDCABA") == 4  # the textbook example (CLRS): "BCBA"


def test_rouge_batch_averages_row_by_row() -> None:
    recon = torch.tensor([[1, 2, 3], [4, 5, 6]])
    truth = torch.tensor([[1, 2, 3], [7, 8, 9]])
    # pair 0 identical (1.0), pair 1 disjoint (0.0): mean 0.5
    assert rouge_n(recon, truth, n=1) == 0.5
    assert rouge_n(recon, truth, n=2) == 0.5
    assert rouge_l(recon, truth) == 0.5
    # lists of token lists are batches too; a list of strings is one sequence
    assert rouge_l([["a", "b"], ["c"]], [["a", "b"], ["d"]]) == 0.5
    assert rouge_n(["a", "b"], ["a", "c"], n=1) == 0.5


def test_rouge_errors() -> None:
    with pytest.raises(ConfigError, match="positive integer n"):
        rouge_n([1], [1], n=0)
    with pytest.raises(ShapeError, match="two sequences or two batches"):
        rouge_l(torch.tensor([[1, 2]]), [1, 2])
    with pytest.raises(ShapeError, match="as many of each"):
        rouge_l(torch.tensor([[1, 2]]), torch.tensor([[1, 2], [3, 4]]))
    with pytest.raises(ShapeError, match="1-D\\) or a batch"):
        rouge_l(torch.zeros(1, 2, 3, dtype=torch.long), torch.zeros(1, 2, 3, dtype=torch.long))
    with pytest.raises(ShapeError, match="token ids or strings"):
        rouge_l([1.5, 2.5], [1, 2])
    with pytest.raises(ShapeError, match="empty"):
        rouge_l(torch.zeros(0, 3, dtype=torch.long), torch.zeros(0, 3, dtype=torch.long))


def test_rouge_matches_rouge_score_package() -> None:
    rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=False)
    rng = random.Random(0)
    for _ in range(60):
        words = [f"w{i}" for i in range(rng.randint(2, 8))]  # a small vocabulary, so n-grams repeat
        truth = " ".join(rng.choices(words, k=rng.randint(1, 15)))
        recon = " ".join(rng.choices(words, k=rng.randint(1, 15)))
        ref = scorer.score(truth, recon)  # (target, prediction)
        assert rouge_n(recon, truth, n=1) == pytest.approx(ref["rouge1"].fmeasure, abs=1e-12)
        assert rouge_n(recon, truth, n=2) == pytest.approx(ref["rouge2"].fmeasure, abs=1e-12)
        assert rouge_l(recon, truth) == pytest.approx(ref["rougeL"].fmeasure, abs=1e-12)


def test_token_accuracy_matches_the_batch_by_hand() -> None:
    truth = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    recon = torch.tensor([[5, 6, 7, 0], [1, 2, 9, 9]])
    # in order: 0 matches; matched (recon 1 -> truth 0: 2, recon 0 -> truth 1: 3): 5 of 8
    assert token_accuracy(recon, truth) == pytest.approx(5 / 8)
    assert match_sequences(recon, truth).tolist() == [1, 0]
    # an extra reconstruction is left out if it matches worse
    extra = torch.cat([recon, torch.tensor([[1, 2, 3, 0]])])
    assert token_accuracy(extra, truth) == pytest.approx(6 / 8)  # 3 (row 2 -> truth 0) + 3 (row 0 -> truth 1)
    assert match_sequences(extra, truth).tolist() == [2, 0]
    # padding in the truth is not counted: truth 0 has 2 real tokens, truth 1 four; 2 + 3 of 6
    padded = torch.tensor([[1, 2, 0, 0], [5, 6, 7, 8]])
    assert token_accuracy(recon, padded, pad_id=0) == pytest.approx(5 / 6)
    # string tokens work too
    assert token_accuracy([["a", "b"], ["c", "d"]], [["c", "x"], ["a", "b"]]) == pytest.approx(3 / 4)


def test_exact_sequence_rate_by_hand() -> None:
    truth = torch.tensor([[1, 2], [3, 4]])
    assert exact_sequence_rate(torch.tensor([[3, 4], [1, 2]]), truth) == 1.0
    # one reconstruction counts for one true sequence at most
    assert exact_sequence_rate(torch.tensor([[1, 2], [1, 2]]), truth) == 0.5
    assert exact_sequence_rate(torch.tensor([[1, 3], [2, 4]]), truth) == 0.0
    # with padding only the real tokens must agree
    assert exact_sequence_rate(torch.tensor([[1, 9], [3, 4]]), torch.tensor([[1, 0], [3, 4]]), pad_id=0) == 1.0


def test_score_text_by_hand() -> None:
    truth = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    recon = torch.tensor([[5, 6, 8, 7], [1, 2, 3, 4]])
    scores = score_text(recon, truth)
    assert set(scores) == {"rouge1", "rouge2", "rougeL", "token_accuracy", "exact"}
    # matched: truth 0 <- recon 1 (identical: all 1.0); truth 1 <- recon 0 = 5 6 8 7 vs 5 6 7 8:
    # rouge1 1.0; bigrams 56 68 87 vs 56 67 78 share 1 of 3 -> 1/3; LCS 3 ("5 6 8" or "5 6 7") of 4 -> 3/4;
    # tokens 2 of 4 right; not exact.
    assert scores["rouge1"] == pytest.approx(1.0)
    assert scores["rouge2"] == pytest.approx((1 + 1 / 3) / 2)
    assert scores["rougeL"] == pytest.approx((1 + 3 / 4) / 2)
    assert scores["token_accuracy"] == pytest.approx(6 / 8)
    assert scores["exact"] == pytest.approx(0.5)
    # a perfect reconstruction in another order scores 1 everywhere
    assert score_text(truth.flip(0), truth) == {k: 1.0 for k in scores}
    # pad tokens are dropped before ROUGE: truth 1 2 <pad> <pad> vs recon 1 2 9 9 -> rouge1 P 2/4, R 2/2 -> 2/3
    one = score_text(torch.tensor([[1, 2, 9, 9]]), torch.tensor([[1, 2, 0, 0]]), pad_id=0)
    assert one["rouge1"] == pytest.approx(2 / 3) and one["token_accuracy"] == 1.0 and one["exact"] == 1.0


def test_matching_ties_break_toward_exact_and_shared_tokens() -> None:
    # both assignments give 4 position matches; only one recovers a sequence exactly
    truth = torch.tensor([[1, 2, 3, 4], [1, 2, 8, 9]])
    recon = torch.tensor([[0, 0, 3, 4], [1, 2, 3, 4]])
    assert match_sequences(recon, truth).tolist() == [1, 0]
    assert score_text(recon, truth)["exact"] == 0.5
    # no position matches at all (shifted by one): the shared tokens decide
    truth = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    recon = torch.tensor([[8, 5, 6, 7], [4, 1, 2, 3]])
    assert match_sequences(recon, truth).tolist() == [1, 0]
    # each matched pair, e.g. 4 1 2 3 vs 1 2 3 4: bigrams 41 12 23 vs 12 23 34 share 2 of 3 -> 2/3
    assert score_text(recon, truth)["rouge2"] == pytest.approx(2 / 3)
    assert score_text(recon, truth)["token_accuracy"] == 0.0


def test_score_text_exact_agrees_with_the_exact_rate() -> None:
    # The position-matching optimum can always keep every exact pair (Hamming triangle inequality), so the two
    # numbers agree without padding; checked on random batches over a tiny vocabulary with repeats.
    gen = torch.Generator().manual_seed(0)
    for _ in range(50):
        truth = torch.randint(0, 3, (4, 3), generator=gen)
        recon = torch.randint(0, 3, (5, 3), generator=gen)
        keep = int(torch.randint(0, 5, (1,), generator=gen))  # copy some true rows, shuffled, into the recon
        recon[:keep] = truth[torch.randperm(4, generator=gen)[:keep]]
        brute = max(sum(int(torch.equal(recon[p[i]], truth[i])) for i in range(4)) for p in _injections(5, 4))
        assert exact_sequence_rate(recon, truth) == brute / 4
        assert score_text(recon, truth)["exact"] == exact_sequence_rate(recon, truth)
        best = max(sum(int((recon[p[i]] == truth[i]).sum()) for i in range(4)) for p in _injections(5, 4))
        assert token_accuracy(recon, truth) == best / 12


def _injections(n: int, k: int) -> list[tuple[int, ...]]:
    from itertools import permutations

    return list(permutations(range(n), k))


def test_batch_score_errors() -> None:
    with pytest.raises(ShapeError, match="only 1 reconstructions"):
        token_accuracy(torch.tensor([[1, 2]]), torch.tensor([[1, 2], [3, 4]]))
    with pytest.raises(ShapeError, match="same length"):
        score_text(torch.tensor([[1, 2, 3]]), torch.tensor([[1, 2]]))
    with pytest.raises(ShapeError, match="empty"):
        exact_sequence_rate(torch.zeros(1, 2, dtype=torch.long), torch.zeros(0, 2, dtype=torch.long))
    with pytest.raises(ShapeError, match="\\(B, L\\)"):
        token_accuracy(torch.tensor([1, 2]), torch.tensor([1, 2]))
