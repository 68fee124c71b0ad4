"""The README's main job: Inverting Gradients on a bundled photo against a ResNet.

Runs in about a minute on two CPU cores and writes ``reconstruction.png`` (truth above reconstruction) and
``metrics.json`` to ``runs/demo/``.
"""

from __future__ import annotations

from pathlib import Path

from gradinv.experiment import run_attack, save_run

DEMO = {
    "attack": "invgrad",
    "model": "resnet20",
    "data": "photos",
    "image_size": 32,
    "batch_size": 1,
    "iterations": 1000,
    "seed": 2,
}


def run_demo(*, out: str | Path = "runs/demo", progress: bool = True) -> dict:
    """Run the demo attack and save its picture and metrics; returns the metrics."""
    settings = dict(DEMO)
    result = run_attack(settings.pop("attack"), **settings, progress=progress)
    save_run(result, out)
    m = result.metrics
    print(
        f"Inverting Gradients on {m['model']}, {m['data']} #{m['seed']}: PSNR {m['psnr']:.2f} dB, "
        f"SSIM {m['ssim']:.3f}, label {m['labels_recovered']} (true {m['labels_true']}), "
        f"{m['seconds']:.0f} s -> {out}/reconstruction.png"
    )
    return m
