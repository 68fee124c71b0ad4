"""Reconstruction quality metrics: image scores, batch alignment and label recovery."""

from __future__ import annotations

from gradinv.metrics.image import MSE_FLOOR, mse, psnr, ssim
from gradinv.metrics.labels import label_accuracy, label_count_accuracy, label_existence_accuracy
from gradinv.metrics.matching import align, pairwise_mse
from gradinv.metrics.report import ImageScores, score_images
from gradinv.metrics.text import exact_sequence_rate, match_sequences, rouge_l, rouge_n, score_text, token_accuracy

__all__ = [
    "exact_sequence_rate",
    "match_sequences",
    "rouge_l",
    "rouge_n",
    "score_text",
    "token_accuracy",
    "MSE_FLOOR",
    "ImageScores",
    "align",
    "label_accuracy",
    "label_count_accuracy",
    "label_existence_accuracy",
    "mse",
    "pairwise_mse",
    "psnr",
    "score_images",
    "ssim",
]
