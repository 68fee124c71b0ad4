"""Long reproductions of the papers' headline numbers (``make test-slow``)."""

from __future__ import annotations

import pytest

from gradinv.experiment import run_attack


@pytest.mark.slow
def test_dlg_on_lenet_reaches_30db_on_four_of_five_seeds():
    """DLG (Zhu et al. 2019): LeNet, 32x32 bundled photos, batch 1, at most 300 L-BFGS iterations."""
    results = [
        run_attack("dlg", model="lenet", data="photos", image_size=32, batch_size=1, iterations=300, seed=seed)
        for seed in range(5)
    ]
    psnrs = [r.metrics["psnr"] for r in results]
    assert sum(p >= 30 for p in psnrs) >= 4, psnrs


@pytest.mark.slow
def test_invgrad_on_convnet_beats_20db_in_300_iterations():
    """Inverting Gradients on the untrained width-64 ConvNet, 32x32 photos, batch 1 (labels recovered)."""
    psnrs = [
        run_attack("invgrad", model="convnet", data="photos", iterations=300, seed=seed).metrics["psnr"]
        for seed in range(3)
    ]
    assert sum(p >= 20 for p in psnrs) >= 2, psnrs
