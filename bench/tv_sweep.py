"""Inverting Gradients' total-variation weight per architecture, chosen on held-out photos.

The best TV weight differs between architectures: a deep network with strided downsampling (ResNet-18 at 32 px)
passes less of an image's fine structure into its gradient than a shallow one (ConvNet-64), so its inversion needs
a stronger smoothness prior. This benchmark measures it on photos that no peer comparison or published case uses
(``--photos``, default astronaut, rocket, retina; the peer comparison scores chelsea and coffee), untrained models
(model seed 0), batch 1, 32 px, FedSGD, labels recovered from the update, ``--iterations`` of invgrad at each TV
weight, everything else at invgrad's defaults. :data:`gradinv.attacks.inverting_gradients.TV_BY_ARCHITECTURE` is
what it chose (published: ``--models resnet18 --tvs 1e-4,1e-3,1e-2,5e-2 --name tv_sweep_resnet18`` and
``--models convnet --tvs 1e-4,1e-2 --name tv_sweep_convnet``). Writes OUT/NAME.{json,md}. Usage:
    python bench/tv_sweep.py [--threads 2] [--iterations 300] [--models resnet18,convnet] [--tvs 1e-4,1e-2,...]
        [--name tv_sweep]
"""

from __future__ import annotations

import statistics
import time

from _common import fmt, parser, setup, write_results
from gradinv import Scenario, build_attack
from gradinv.data.builtin import load_photos
from gradinv.metrics import psnr
from gradinv.models import build_model


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--iterations", type=int, default=300, help="invgrad iterations per run (default 300)")
    p.add_argument("--models", default="resnet18,convnet", help="registered models (default resnet18,convnet)")
    p.add_argument("--photos", default="astronaut,rocket,retina", help="held-out photos")
    p.add_argument("--tvs", default="1e-4,1e-3,1e-2,5e-2,0.2", help="TV weights (default 1e-4,1e-3,1e-2,5e-2,0.2)")
    p.add_argument("--name", default="tv_sweep", help="results file name (default tv_sweep)")
    args = p.parse_args()
    run = setup(args)
    iterations = 3 if args.quick else args.iterations
    models = [m for m in args.models.split(",") if m]
    tvs = [float(t) for t in args.tvs.split(",") if t]
    photos = [ph for ph in args.photos.split(",") if ph]
    data = load_photos(image_size=32, names=photos)
    rows, start = [], time.perf_counter()
    for name in models:
        model = build_model(name, num_classes=len(data), seed=0).eval()
        for index, photo in enumerate(data.class_names):
            scenario = Scenario.from_images(
                model, data.images[index : index + 1], data.labels[index : index + 1], normalization=data.normalization
            )
            observation, truth = scenario.observe(), scenario.ground_truth().images
            for tv in tvs:
                t0 = time.perf_counter()
                rec = build_attack("invgrad", iterations=iterations, tv=tv).reconstruct(observation, seed=0)
                value = float(psnr(rec.images, truth))
                rows.append(
                    {"model": name, "photo": photo, "tv": tv, "psnr": value, "seconds": time.perf_counter() - t0}
                )
                print(f"{name} {photo} tv {tv:g}: {value:.2f} dB", flush=True)
    total = time.perf_counter() - start
    lines = [
        f"invgrad PSNR (dB) by TV weight, held-out photos ({', '.join(photos)}), untrained models (seed 0), batch 1, "
        f"32 px, {iterations} iterations, {run['threads']} thread(s), {total:.0f} s in all.",
        "",
        "| model | " + " | ".join(f"tv {t:g}" for t in tvs) + " | best |",
        "| --- | " + " | ".join("---" for _ in tvs) + " | --- |",
    ]
    best = {}
    for name in models:
        cells, means = [], {}
        for tv in tvs:
            values = [r["psnr"] for r in rows if r["model"] == name and r["tv"] == tv]
            means[tv] = statistics.fmean(values)
            cells.append(f"{fmt(means[tv], '.2f')} ({' / '.join(f'{v:.1f}' for v in values)})")
        best[name] = max(means, key=means.get)
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {best[name]:g} |")
    lines += ["", "Each cell: the mean over the photos, then each photo in the order above."]
    write_results(args.out, args.name, run, {"iterations": iterations, "rows": rows, "best": best}, "\n".join(lines))


if __name__ == "__main__":
    main()
