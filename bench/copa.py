"""COPA against R-GAP where the rank analysis says a layer is deficient (CNN6 variants, random weights, batch 1,
32x32 bundled photos; photo i against model seed i).

Each row: the rank analysis' verdict (before any attack), then the median PSNR of R-GAP, COPA as in the paper,
and COPA with a smooth start (``smooth=SMOOTH``: a first stage with a pixel-difference prior, then the paper's
objective from there), COPA's seconds and the cost (sum of squared relative residuals) its joint least squares
ended at; per-photo values are in copa.json.
Usage: python bench/copa.py [--photos 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

from _common import write_results
from gradinv.analysis import rank_analysis
from gradinv.attacks import build_attack
from gradinv.data import load_dataset
from gradinv.fl import Scenario
from gradinv.metrics import psnr
from gradinv.models import build_model

CASES = (
    ("CNN6, sigmoid, 4-channel third conv", {"activation": "sigmoid", "channels": (12, 36, 4, 36, 64, 128)}),
    ("CNN6, LeakyReLU, 4-channel third conv", {"channels": (12, 36, 4, 36, 64, 128)}),
    ("CNN6, LeakyReLU, 4-channel second conv", {"channels": (12, 4, 36, 36, 64, 128)}),
    ("CNN6, LeakyReLU, 4-channel first conv", {"channels": (4, 36, 36, 36, 64, 128)}),
    ("CNN6 (full rank)", {}),
)
SMOOTH = 0.1


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--photos", type=int, default=2)
    args = parser.parse_args()
    ds = load_dataset("photos", image_size=32, channels=3)
    lines = [
        "## COPA vs R-GAP, CNN6 variants (random weights), batch 1, 32x32 photos",
        "",
        f"| architecture | rank analysis | R-GAP | COPA | COPA, smooth start {SMOOTH} | COPA s | COPA joint cost |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    rows = []
    for label, options in CASES:
        report = rank_analysis(build_model("cnn6", num_classes=10, **options), (3, 32, 32))
        record: dict = {"architecture": label, "options": options, "prediction": report.reason, "photos": []}
        for i in range(min(args.photos, len(ds))):
            model = build_model("cnn6", num_classes=10, seed=i, **options)
            sc = Scenario.from_images(model, ds.images[i : i + 1], ds.labels[i : i + 1], normalization=ds.normalization)
            obs, truth = sc.observe(), sc.ground_truth().images
            rgap = build_attack("rgap").reconstruct(obs)
            start = time.perf_counter()
            copa = build_attack("copa").reconstruct(obs)
            seconds = time.perf_counter() - start
            smooth = build_attack("copa", smooth=SMOOTH).reconstruct(obs)
            record["photos"].append(
                {
                    "photo": ds.class_names[i],
                    "rgap_psnr": float(psnr(rgap.images, truth)),
                    "copa_psnr": float(psnr(copa.images, truth)),
                    "smooth_psnr": float(psnr(smooth.images, truth)),
                    "copa_seconds": seconds,
                    "copa_cost": copa.extras.get("joint_cost"),
                    "deficient_layer": copa.extras["deficient_layer"],
                    "steps": copa.extras.get("steps"),
                }
            )
            print(label, record["photos"][-1], flush=True)
        photos = record["photos"]
        keys = ("rgap_psnr", "copa_psnr", "smooth_psnr", "copa_seconds")
        med = {key: statistics.median(p[key] for p in photos) for key in keys}
        costs = [p["copa_cost"] for p in photos if p["copa_cost"] is not None]
        cost = f"{statistics.median(costs):.1e}" if costs else "- (no deficient layer)"
        lines.append(
            f"| {label} | {report.reason} | {med['rgap_psnr']:.1f} dB | {med['copa_psnr']:.1f} dB | "
            f"{med['smooth_psnr']:.1f} dB | {med['copa_seconds']:.0f} | {cost} |"
        )
        rows.append(record)
    write_results("copa", {"cases": rows}, "\n".join(lines))


if __name__ == "__main__":
    main()
