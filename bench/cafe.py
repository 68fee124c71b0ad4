"""CAFE (Jin et al., NeurIPS 2021) in vertical FL: every sample of a data set of N recovered from T iterations.

Four parties hold the quadrants of every image (CAFE's code splits 28x28 MNIST this way). Each has a bottom model
(one conv 5x5 block with ReLU and max-pool, then fc1 with 32 outputs: the attacked layer, ReLU, fc2 to 10); the
server's top model is one dense layer. The conv block has 16 channels for digits (fc1 sees 16x7x7 = 784 values of
a 196-pixel quadrant) and 32 for photos (32x8x8 = 2,048 values of a 768-value quadrant, the paper's 2,048): with
16 channels a photo quadrant's max-pooled ReLU features do not determine it (23 dB even with exact fc1 inputs).
Training runs T = 5N iterations of batch 8 with Adam at learning rate 1e-6 on every model (the paper's code), so
the model changes while the server observes it. Cases: bundled digits (1x28x28) and photo patches (3x32x32: the
9 bundled photos at 96x96, each cut into 3x3 tiles; 81 patches), N = 40 and 64; data, batch order and models all
of seed 0. CAFE runs with its defaults (step III: Adam lr 0.01, 20 passes over the T batches).

Reported: mean PSNR over the N samples matched by optimal assignment (gradinv.metrics.score_images) and by the
indices the server knows, mean SSIM (by index), the worst sample's PSNR, steps I and II's relative errors
(recovered V and H against their values under the first iteration's model) and fit residuals, and seconds
(the T training iterations; the attack's least squares; the whole attack). One extra row runs the N = 40 digits
with the model frozen (learning rate 0: the paper's nested-loop setting) to show what the model's drift costs, and
one the N = 40 photos with step III at lr 0.1 for 10 passes (the paper's 0.01 is tied to its 20,000 iterations).
Writes OUT/cafe.{json,md} (default OUT: bench/results). ``--quick``: 12 digits of 16x16, 2 passes.
Usage: python bench/cafe.py [--threads 1] [--quick]
"""

from __future__ import annotations

import statistics
import time

import torch

from _common import parser, setup, write_results
from gradinv.attacks.cafe import Cafe
from gradinv.data import ImageDataset, load_dataset, sample_batch
from gradinv.fl.vertical import VerticalFL, VerticalScenario, first_layer_terms
from gradinv.metrics import score_images


def photo_patches(*, size: int = 32, tiles: int = 3) -> ImageDataset:
    """The bundled photos at ``size * tiles`` px, each cut into ``tiles x tiles`` patches of ``size`` px
    (label: the photo)."""
    ds = load_dataset("photos", image_size=size * tiles, channels=3)
    patches, labels = [], []
    for i in range(len(ds)):
        for r in range(tiles):
            for c in range(tiles):
                patches.append(ds.images[i, :, r * size : (r + 1) * size, c * size : (c + 1) * size])
                labels.append(int(ds.labels[i]))
    return ImageDataset.from_tensors(
        "photo-patches", torch.stack(patches), torch.tensor(labels), class_names=ds.class_names
    )


def _relative(found: tuple[torch.Tensor, ...], truth: tuple[torch.Tensor, ...]) -> float:
    return statistics.mean(float((f - t).norm() / t.norm()) for f, t in zip(found, truth, strict=True))


def run_case(ds: ImageDataset, *, n: int, lr: float, conv: int, attack: Cafe, seed: int = 0) -> dict:
    images, labels = sample_batch(ds, batch_size=n, seed=seed)
    protocol = VerticalFL(parties=4, split="grid", batch_size=8, iterations=5 * n, lr=lr, seed=seed)
    scenario = VerticalScenario.from_images(
        images,
        labels,
        normalization=ds.normalization,
        protocol=protocol,
        num_classes=10,
        model_seed=seed,
        conv_channels=(conv,),
    )
    start = time.perf_counter()
    observation = scenario.observe()
    observe_seconds = time.perf_counter() - start
    truth = scenario.ground_truth()
    rec = attack.reconstruct(observation, seed=seed)
    matched = score_images(rec.images, truth.images)
    indexed = score_images(rec.images, truth.images, align_batch=False)
    h_true, v_true = first_layer_terms(observation, truth.inputs, iteration=0)
    residuals = rec.extras["residuals"]
    return {
        "data": ds.name,
        "input_shape": list(observation.input_shape),
        "n": n,
        "batch": protocol.batch_size,
        "iterations": protocol.iterations,
        "model_lr": lr,
        "conv_channels": conv,
        "epochs": attack.settings.epochs,
        "attack_lr": attack.settings.lr,
        "psnr_matched": matched.mean_psnr,
        "psnr_indexed": indexed.mean_psnr,
        "ssim_indexed": indexed.mean_ssim,
        "psnr_min": min(indexed.psnr),
        "matched_is_identity": matched.order == list(range(n)),
        "step1_error": _relative(rec.extras["first_layer_output_gradients"], v_true),
        "step2_error": _relative(rec.extras["first_layer_inputs"], h_true),
        "step1_residual": statistics.mean(r["step1"] for r in residuals),
        "step2_residual": statistics.mean(r["step2"] for r in residuals),
        "observe_seconds": observe_seconds,
        "algebra_seconds": rec.extras["algebra_seconds"],
        "attack_seconds": rec.seconds,
        "psnr_per_sample": indexed.psnr,
    }


def main() -> None:
    args = parser(__doc__).parse_args()
    run = setup(args)
    start = time.perf_counter()
    if args.quick:
        digits = load_dataset("digits", image_size=16, channels=1)
        cases = [(digits, 12, 1e-6, 16, Cafe(epochs=2))]
    else:
        digits = load_dataset("digits", image_size=28, channels=1)
        patches = photo_patches()
        cases = [
            (digits, 40, 1e-6, 16, Cafe()),
            (digits, 64, 1e-6, 16, Cafe()),
            (patches, 40, 1e-6, 32, Cafe()),
            (patches, 64, 1e-6, 32, Cafe()),
            (digits, 40, 0.0, 16, Cafe()),
            (patches, 40, 1e-6, 32, Cafe(lr=0.1, epochs=10)),
        ]
    rows = []
    for ds, n, lr, conv, attack in cases:
        row = run_case(ds, n=n, lr=lr, conv=conv, attack=attack)
        rows.append(row)
        print(
            f"{row['data']} N={n} lr={lr:g}: PSNR {row['psnr_indexed']:.2f} dB, {row['attack_seconds']:.0f} s",
            flush=True,
        )
    seconds = time.perf_counter() - start
    lines = [
        "CAFE (Jin et al. 2021) against vertical FL: 4 parties (image quadrants), batch 8, T = 5N iterations, "
        "model trained by Adam at the learning rate shown (the paper's 1e-6; 0: frozen); step III of CAFE runs "
        "the passes over the T batches shown at the Adam learning rate shown (defaults: "
        f"{Cafe().settings.epochs} passes, lr {Cafe().settings.lr}, the paper's); "
        f"seed 0; {run['threads']} thread(s).",
        "",
        "| data | conv | N | T | model lr | step III passes, lr | PSNR matched (dB) | PSNR by index (dB) | SSIM | "
        "worst PSNR | step I error | step II error | step I / II residual | training s | least squares s | attack s |",
        "| --- " * 16 + "|",
    ]
    for r in rows:
        shape = "x".join(str(s) for s in r["input_shape"])
        lines.append(
            f"| {r['data']} {shape} | {r['conv_channels']} | {r['n']} | {r['iterations']} | {r['model_lr']:g} | "
            f"{r['epochs']}, {r['attack_lr']:g} | {r['psnr_matched']:.2f} | "
            f"{r['psnr_indexed']:.2f} | {r['ssim_indexed']:.4f} | {r['psnr_min']:.2f} | {r['step1_error']:.3g} | "
            f"{r['step2_error']:.3g} | {r['step1_residual']:.2g} / {r['step2_residual']:.2g} | "
            f"{r['observe_seconds']:.1f} | {r['algebra_seconds']:.1f} | {r['attack_seconds']:.1f} |"
        )
    lines += [
        "",
        "Step I / II error: relative Frobenius error of the recovered dL/dz and fc1 inputs against their values "
        "under the first iteration's model (the model drifts while training: the fits' residuals show by how "
        "much). PSNR matched pairs samples by optimal assignment; by index uses the indices the server knows.",
        "",
        f"Total time {seconds:.0f} s.",
    ]
    write_results(args.out, "cafe", run, {"rows": rows, "seconds": seconds}, "\n".join(lines))


if __name__ == "__main__":
    main()
