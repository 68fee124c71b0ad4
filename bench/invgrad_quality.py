"""Inverting Gradients quality at a budget: PSNR after N iterations and time-to-PSNR curves.

Cases (batch 1, 32x32 bundled photo, eval-mode BatchNorm, labels recovered by iDLG, attack seed 0): an
untrained width-64 ConvNet and a ResNet-18 trained for a few hundred SGD steps (batch 8) on the bundled digits.
For each budget the attack runs with its schedule scaled to the budget; PSNR against the truth is logged along
the way (the attack never sees the truth) to draw time-to-PSNR curves. A timing benchmark, not a grid: the
curves need the truth at every logged iteration, which a grid's record does not keep.
Writes OUT/NAME.{md,json} and OUT/NAME_time_to_psnr.png (default OUT: bench/results); the published runs are
--models convnet:0 --name invgrad_quality_convnet and --models resnet18:300 --name invgrad_quality_resnet18.
Usage: python bench/invgrad_quality.py [--budgets 1000,4000] [--photos chelsea] [--models convnet:0] [--threads 2]
"""

from __future__ import annotations

import ast

from _common import parser, photo_case, setup, write_results
from gradinv.attacks import build_attack
from gradinv.metrics import psnr
from gradinv.viz import save_curves


def run_case(model_name, trained_steps, photo, budget, *, restarts, log_every, extra):
    ds, sc = photo_case(model=model_name, photo=photo, trained_steps=trained_steps)
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
    p = parser(__doc__)
    p.add_argument("--budgets", default="1000,4000")
    p.add_argument("--photos", default="chelsea")
    p.add_argument("--models", default="convnet:0,resnet18:300", help="MODEL:TRAINED_STEPS,...")
    p.add_argument("--restarts", type=int, default=1)
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--name", default="invgrad_quality")
    p.add_argument(
        "--settings", default="{}", help="extra invgrad settings as a Python dict literal, e.g. \"{'tv': 1e-3}\""
    )
    args = p.parse_args()
    run = setup(args)
    extra = ast.literal_eval(args.settings)
    budgets = [int(b) for b in args.budgets.split(",")]
    if args.quick:
        budgets, args.log_every = [min(b, 4) for b in budgets[:1]], 1
    rows = []
    for spec in args.models.split(","):
        model_name, steps = spec.split(":")
        steps = min(int(steps), 5) if args.quick else int(steps)
        for photo in args.photos.split(","):
            for budget in budgets:
                row = run_case(
                    model_name, steps, photo, budget, restarts=args.restarts, log_every=args.log_every, extra=extra
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
    save_curves(
        args.out / f"{args.name}_time_to_psnr.png",
        curves=curves,
        xlabel="seconds",
        ylabel="PSNR (dB)",
        title=f"Inverting Gradients: time to PSNR ({run['threads']} threads)",
    )
    write_results(args.out, args.name, run, {"settings": extra, "rows": rows}, "\n".join(lines))


if __name__ == "__main__":
    main()
