"""GIAS against Inverting Gradients on digits the generator never saw, at the same number of gradient evaluations.

The generator (gradinv.models.generator: the decoder of a small VAE) is trained on the digits' training split, or
loaded from the cache. The clients' images are taken from the held-out split, in order: case i of batch size B
holds held-out digits i*B .. i*B+B-1, against an untrained model of seed i (default: Inverting Gradients'
ConvNet at width 16, eval-mode BatchNorm) at the generator's image size, FedSGD, labels recovered from the update
(label_method=auto) by both attacks, attack seed 0.

Budget: the same number of gradient evaluations (one evaluation = one replay of the client's gradient and its
backward, i.e. one restart's iteration). GIAS runs ``--iterations`` iterations, a quarter of them searching the
latent with ``--restarts`` batched restarts and the rest fitting per-sample generator copies: restarts x latent
+ generator evaluations. Inverting Gradients (1 restart, its paper's settings otherwise) runs that many
iterations. Wall-clock seconds are reported beside: a GIAS iteration also runs the generator.

Also reported: PSNR after GIAS's latent search alone (G(z*)), and how well the generator can represent the
held-out digits at all (each digit's latent fitted to its pixels directly, Adam, 300 steps: the latent search's
ceiling, which the attack does not see).
Writes OUT/NAME.{md,json} (default OUT: bench/results, NAME: gias).
Usage: python bench/gias.py [--digits 8] [--batch-sizes 1,4] [--model convnet] [--iterations 400] [--threads 1]
"""

from __future__ import annotations

import statistics
import time

import torch

import gradinv.attacks.gias  # noqa: F401  (registers "gias" until gradinv.attacks imports it)
from _common import parser, setup, write_results
from gradinv.attacks import build_attack
from gradinv.data import load_dataset
from gradinv.fl import Scenario
from gradinv.metrics import psnr, score_images
from gradinv.models import build_model
from gradinv.models.generator import GeneratorTraining, digits_generator, digits_split


def projection_psnr(generator, images: torch.Tensor, *, steps: int = 300) -> float:
    """Mean PSNR of the generator's best fit to ``images`` over its latent (pixel loss, Adam from z = 0)."""
    z = torch.zeros(images.shape[0], generator.latent_dim, requires_grad=True)
    opt = torch.optim.Adam([z], lr=0.05)
    for _ in range(steps):
        loss = (generator(z) - images).pow(2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return float(psnr(generator(z), images).mean())


def duplicates(train: torch.Tensor, held: torch.Tensor) -> int:
    """How many held-out images also appear, pixel for pixel, in the training split."""
    flat = train.flatten(1)
    return sum(bool((flat == h.flatten()).all(1).any()) for h in held)


def run_case(ds, images, labels, *, model, width, seed, gias, invgrad, generator):
    options = {"width": width} if model == "convnet" else {}
    net = build_model(model, num_classes=10, in_channels=1, image_size=ds.image_size, seed=seed, **options)
    sc = Scenario.from_images(net, images, labels, normalization=ds.normalization)
    obs, truth = sc.observe(), sc.ground_truth().images
    row = {"seed": seed, "labels": labels.tolist()}
    for name, attack in (("gias", gias), ("invgrad", invgrad)):
        rec = attack.reconstruct(obs, seed=0)
        scores = score_images(rec.images, truth)
        row[name] = {
            "psnr": scores.mean_psnr,
            "ssim": scores.mean_ssim,
            "seconds": rec.seconds,
            "iterations": rec.extras.get("iterations_run"),
            "labels_right": sorted(rec.labels.tolist()) == sorted(labels.tolist()),
        }
        if name == "gias":
            row[name]["kept"] = rec.extras["kept"]
            with torch.no_grad():
                latent_only = generator(rec.extras["latent"]).clamp(0, 1)
            row[name]["latent_psnr"] = score_images(latent_only, truth).mean_psnr
    return row


def mean(rows, attack, key):
    return statistics.fmean(r[attack][key] for r in rows)


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--digits", type=int, default=8, help="held-out digits per batch size (default 8)")
    p.add_argument("--batch-sizes", default="1,4")
    p.add_argument("--model", default="convnet", choices=("convnet", "lenet"))
    p.add_argument("--width", type=int, default=16, help="ConvNet width (default 16)")
    p.add_argument("--image-size", type=int, default=16)
    p.add_argument("--iterations", type=int, default=400, help="GIAS iterations, both stages (default 400)")
    p.add_argument("--restarts", type=int, default=3, help="GIAS latent restarts (default 3, the paper's)")
    p.add_argument("--name", default="gias")
    args = p.parse_args()
    run = setup(args)
    training = GeneratorTraining(image_size=args.image_size)
    if args.quick:
        args.digits, args.iterations, args.batch_sizes = 1, 8, "1"
        training = GeneratorTraining(image_size=args.image_size, steps=20)

    start = time.perf_counter()
    generator = digits_generator(image_size=args.image_size, training=training, progress=True)
    generator_seconds = time.perf_counter() - start
    ds = load_dataset("digits", image_size=args.image_size, channels=1)
    train, held = digits_split(len(ds), held_out=training.held_out, seed=training.split_seed)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    shown = held[: args.digits]
    gias_options = dict(iterations=args.iterations, restarts=args.restarts, generator_steps=training.steps)
    gias = build_attack("gias", **gias_options)
    evaluations = gias.settings.restarts * gias.settings.latent_iterations + gias.settings.generator_iterations
    invgrad = build_attack("invgrad", iterations=evaluations)
    info = {
        "generator_seconds": generator_seconds,
        "train_images": len(train),
        "held_out_images": len(held),
        "held_out_also_in_train": duplicates(ds.images[train], ds.images[shown]),
        "projection_psnr": projection_psnr(generator, ds.images[shown]),
        "gradient_evaluations": evaluations,
    }
    print(info, flush=True)

    results = {}
    for b in batch_sizes:
        rows = []
        for i in range(max(1, args.digits // b)):
            idx = held[i * b : (i + 1) * b]
            row = run_case(
                ds,
                ds.images[idx],
                ds.labels[idx],
                model=args.model,
                width=args.width,
                seed=i,
                gias=gias,
                invgrad=invgrad,
                generator=generator,
            )
            rows.append(row)
            print(
                f"batch {b} case {i}: gias {row['gias']['psnr']:.2f} dB ({row['gias']['seconds']:.0f} s), "
                f"invgrad {row['invgrad']['psnr']:.2f} dB ({row['invgrad']['seconds']:.0f} s)",
                flush=True,
            )
        results[b] = rows

    model = f"{args.model}" + (f" (width {args.width})" if args.model == "convnet" else "")
    lines = [
        f"GIAS vs Inverting Gradients on held-out digits ({args.image_size} px, grey), untrained {model}, FedSGD, "
        f"labels recovered; both at {evaluations} gradient evaluations (GIAS: {args.iterations} iterations, "
        f"{gias.settings.latent_iterations} latent x {args.restarts} restarts + {gias.settings.generator_iterations} "
        f"generator; invgrad: {evaluations} iterations, 1 restart). {run['threads']} thread(s).",
        "",
        "| batch | digits | GIAS PSNR | invgrad PSNR | diff (dB) | GIAS SSIM | invgrad SSIM | diff | GIAS wins | "
        "GIAS latent-only PSNR | GIAS s | invgrad s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for b, rows in results.items():
        gp, ip = mean(rows, "gias", "psnr"), mean(rows, "invgrad", "psnr")
        gs, is_ = mean(rows, "gias", "ssim"), mean(rows, "invgrad", "ssim")
        wins = sum(r["gias"]["psnr"] > r["invgrad"]["psnr"] for r in rows)
        lines.append(
            f"| {b} | {len(rows) * b} | {gp:.2f} | {ip:.2f} | {gp - ip:+.2f} | {gs:.3f} | {is_:.3f} | "
            f"{gs - is_:+.3f} | "
            f"{wins}/{len(rows)} | {mean(rows, 'gias', 'latent_psnr'):.2f} | {mean(rows, 'gias', 'seconds'):.1f} | "
            f"{mean(rows, 'invgrad', 'seconds'):.1f} |"
        )
    lines += [
        "",
        f"Generator: VAE decoder trained on {info['train_images']} training digits ({info['generator_seconds']:.0f} s "
        f"to train or load); {info['held_out_also_in_train']} of the {len(shown)} attacked held-out digits also "
        f"appear pixel for pixel in the training split; fitting its latent to them directly reaches "
        f"{info['projection_psnr']:.2f} dB (the latent search's ceiling).",
    ]
    payload = {
        "settings": {
            **vars(args),
            "out": str(args.out),
            "gias": gias.settings_dict(),
            "invgrad_iterations": evaluations,
        },
        "generator": info,
        "results": {str(b): rows for b, rows in results.items()},
    }
    write_results(args.out, args.name, run, payload, "\n".join(lines))


if __name__ == "__main__":
    main()
