"""Reconstruction quality metrics: image scores, batch alignment and label recovery."""

from __future__ import annotations

from gradinv.metrics.image import MSE_FLOOR, mse, psnr, ssim
from gradinv.metrics.labels import label_accuracy, label_count_accuracy, label_existence_accuracy
from gradinv.metrics.matching import align, pairwise_mse
from gradinv.metrics.report import ImageScores, score_images

__all__ = [
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
