"""Inverting Gradients quality at a budget: PSNR after N iterations and time-to-PSNR curves.

Cases (batch 1, 32x32 bundled photo, eval-mode BatchNorm, labels recovered by iDLG): an untrained width-64
ConvNet and a ResNet-18 trained for a few hundred SGD steps (batch 8) on the bundled digits. For each budget
the attack runs with its schedule scaled to the budget; PSNR against the truth is logged along the way (the
attack never sees the truth) to draw time-to-PSNR curves.
Usage: python bench/invgrad_quality.py [--budgets 1000,4000] [--photos chelsea,astronaut] [--models convnet:0]
"""

from __future__ import annotations

import argparse

import torch

from _common import RESULTS, write_results
from gradinv.attacks import build_attack
from gradinv.data import load_dataset
from gradinv.experiment import prepare_model
from gradinv.fl import Scenario
from gradinv.metrics import psnr
from gradinv.viz import save_curves


def run_case(model_name, trained_steps, photo, budget, *, restarts, log_every, extra):
    ds = load_dataset("photos", image_size=32, channels=3)
    train = load_dataset("digits", image_size=32, channels=3) if trained_steps else None
    net = prepare_model(model_name, num_classes=10, image_size=32, seed=0, trained_steps=trained_steps, dataset=train)
    i = ds.class_names.index(photo)
    sc = Scenario.from_images(net, ds.images[i : i + 1], ds.labels[i : i + 1], normalization=ds.normalization)
    truth = sc.ground_truth().images
    curve = []

    def log(it, seconds, x):
        curve.append((it, seconds, float(psnr(ds.normalization.denormalize(x).clamp(0, 1), truth))))

    attack = build_attack("invgrad", iterations=budget, restarts=restarts, log_every=log_every, **extra)
    rec = attack.reconstruct(sc.observe(), seed=0, callback=log)
    final = float(psnr(rec.images, truth))
    return {
        "model": model_name,
        "trained_steps": trained_steps,
        "photo": photo,
        "budget": budget,
        "restarts": restarts,
        "psnr": final,
        "seconds": rec.seconds,
        "curve": curve,
        "settings": dict(rec.settings),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--budgets", default="1000,4000")
    parser.add_argument("--photos", default="chelsea")
    parser.add_argument("--models", default="convnet:0,resnet18:300")
    parser.add_argument("--restarts", type=int, default=1)
    parser.add_argument("--log-every", type=int, default=25)
    parser.add_argument("--name", default="invgrad_quality")
    parser.add_argument("--settings", default="{}", help="extra invgrad settings as a Python dict literal")
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    extra = eval(args.settings, {})  # noqa: S307 - a benchmark's own command line
    rows = []
    for spec in args.models.split(","):
        model_name, steps = spec.split(":")
        for photo in args.photos.split(","):
            for budget in (int(b) for b in args.budgets.split(",")):
                row = run_case(
                    model_name,
                    int(steps),
                    photo,
                    budget,
                    restarts=args.restarts,
                    log_every=args.log_every,
                    extra=extra,
                )
                rows.append(row)
                print(
                    f"{model_name} trained {steps} {photo} {budget} it: {row['psnr']:.2f} dB in {row['seconds']:.0f} s",
                    flush=True,
                )
    lines = [
        "| model | trained steps | photo | iterations | PSNR (dB) | seconds |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['trained_steps']} | {r['photo']} | {r['budget']} | {r['psnr']:.2f} | "
            f"{r['seconds']:.0f} |"
        )
    curves = {
        f"{r['model']}/{r['trained_steps']} {r['photo']} N={r['budget']}": (
            [c[1] for c in r["curve"]],
            [c[2] for c in r["curve"]],
        )
        for r in rows
    }
    RESULTS.mkdir(exist_ok=True)
    save_curves(
        RESULTS / f"{args.name}_time_to_psnr.png",
        curves=curves,
        xlabel="seconds",
        ylabel="PSNR (dB)",
        title="Inverting Gradients: time to PSNR",
    )
    write_results(args.name, {"settings": extra, "rows": rows}, "\n".join(lines))


if __name__ == "__main__":
    main()
