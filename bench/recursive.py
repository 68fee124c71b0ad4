"""Recursion-based attacks: R-GAP on CNN6, rank analysis against outcome, PPDL-SPN, and gradient noise.

1. R-GAP, CNN6 with random weights, batch 1, 32x32 bundled photos: PSNR, seconds and the largest per-layer
   residual, one row per photo (a peer toolkit reaches 47-50 dB in about 150 s per image on this machine).
2. Rank analysis (prediction before any attack) next to R-GAP's measured PSNR on five architectures.
3. PPDL-SPN on its single-layer setting (conv 3->128, 5x5, stride 2, ReLU, linear), float32 and float64.
4. PSNR against Gaussian noise added to every shared tensor (std = level x that tensor's RMS), for R-GAP
   (CNN6) and PPDL-SPN: where the closed-form attacks collapse.
Parts 1 and 2 are the grid bench/grids/recursive.yaml (run into OUT/recursive/); parts 3 and 4 are not cases
of a grid (a hand-built layer in float64; noise relative to each tensor's RMS) and run here. Writes
OUT/recursive.{md,json} (default OUT: bench/results).
Usage: python bench/recursive.py [--noise-seeds 2] [--resume] [--threads 2] [--quick]
"""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn

from _common import parser, run_grids, setup, write_results
from gradinv.analysis import rank_analysis
from gradinv.attacks import build_attack
from gradinv.data import load_dataset
from gradinv.fl import Scenario
from gradinv.metrics import psnr
from gradinv.models import build_model
from gradinv.types import Observation

NAME = "recursive"
ARCHITECTURES = (  # label, model, options as the records hold them
    ("CNN6", "cnn6", {}),
    ("CNN6, 4-channel first conv", "cnn6", {"channels": [4, 36, 36, 36, 64, 128]}),
    ("MLP-3, LeakyReLU", "mlp", {"activation": "leaky_relu"}),
    ("LeNet (sigmoid)", "lenet", {}),
    ("MLP-3, ReLU", "mlp", {}),
)
NOISE_LEVELS = (0.0, 1e-8, 1e-6, 1e-4, 1e-3, 1e-2, 1e-1)


def spn_model(dtype=torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 128, 5, stride=2, padding=2), nn.ReLU(), nn.Flatten(), nn.Linear(128 * 256, 9)
    ).to(dtype)


def run(attack: str, model: nn.Module, ds, i: int, *, noise: float = 0.0, seed: int = 0, dtype=torch.float32):
    sc = Scenario.from_images(
        model, ds.images[i : i + 1].to(dtype), ds.labels[i : i + 1], normalization=ds.normalization
    )
    obs = sc.observe()
    if noise:
        g = torch.Generator().manual_seed(seed)
        update = {
            k: v + noise * v.pow(2).mean().sqrt() * torch.randn(v.shape, generator=g, dtype=v.dtype)
            for k, v in obs.update.items()
        }
        obs = Observation(obs.model, obs.parameters, obs.buffers, update, obs.protocol, obs.knowledge, obs.train_mode)
    start = time.perf_counter()
    rec = build_attack(attack).reconstruct(obs)
    seconds = time.perf_counter() - start
    return float(psnr(rec.images, sc.ground_truth().images)), seconds, rec


def main() -> None:
    p = parser(__doc__, grid=True)
    p.add_argument("--noise-seeds", type=int, default=2, help="noise draws per level in part 4 (default 2)")
    args = p.parse_args()
    run_info = setup(args)
    records = run_grids(args, [NAME])
    ds = load_dataset("photos", image_size=32, channels=3)

    def runs(model: str, options: dict) -> list[dict]:
        mine = [r for r in records if r["model"] == model and r["model_options"] == options]
        return sorted(mine, key=lambda r: r["seeds"]["model"])

    payload: dict = {"grid": f"bench/grids/{NAME}.yaml"}
    lines = [
        "## R-GAP, CNN6 (random weights), batch 1, 32x32",
        "",
        "| photo | PSNR | seconds | largest layer residual |",
        "| --- | --- | --- | --- |",
    ]
    rows = []
    for r in [r for r in runs("cnn6", {}) if r["status"] == "ok"]:
        residuals = r["details"]["residuals"]
        worst = max(max(x["forward"], x["gradient"]) for x in residuals)
        photo = ds.class_names[r["labels_true"][0]]
        rows.append({"photo": photo, "psnr": r["psnr"], "seconds": r["seconds"], "residuals": residuals})
        lines.append(f"| {photo} | {r['psnr']:.1f} | {r['seconds']:.1f} | {worst:.1e} |")
    if rows:
        lines.append(
            f"\nmedian {statistics.median(r['psnr'] for r in rows):.1f} dB, "
            f"median {statistics.median(r['seconds'] for r in rows):.1f} s per image\n"
        )
    payload["rgap_cnn6"] = rows

    lines += ["## Rank analysis (predicted before attacking) vs R-GAP measured", ""]
    lines += [
        "| architecture | prediction | reason | R-GAP PSNR (median of 3 photos) | agrees |",
        "| --- | --- | --- | --- | --- |",
    ]
    table = []
    for label, name, options in ARCHITECTURES:
        built = {k: tuple(v) if isinstance(v, list) else v for k, v in options.items()}
        report = rank_analysis(build_model(name, num_classes=10, seed=0, **built), (3, 32, 32))
        mine = [r for r in runs(name, options) if r["seeds"]["model"] < 3]
        refused = next((r for r in mine if r["status"] != "ok"), None)
        if refused is not None or not mine:
            outcome, success, values = f"refused: {refused['reason'] if refused else 'no runs'}", False, []
        else:
            values = [r["psnr"] for r in mine]
            outcome, success = f"{statistics.median(values):.1f} dB", statistics.median(values) >= 40
        agrees = report.recoverable == success
        table.append({"architecture": label, "predicted": report.recoverable, "reason": report.reason, "psnr": values})
        verdict = "recoverable" if report.recoverable else "not recoverable"
        lines.append(f"| {label} | {verdict} | {report.reason} | {outcome} | {'yes' if agrees else 'NO'} |")
    payload["rank_vs_outcome"] = table

    photos = 1 if args.quick else 3
    lines += ["", "## PPDL-SPN, single conv layer (3->128, 5x5, stride 2, ReLU) + linear, batch 1", ""]
    lines += [f"| precision | PSNR (median of {photos} photos) |", "| --- | --- |"]
    spn = {}
    for dtype, label in ((torch.float32, "float32"), (torch.float64, "float64")):
        values = [run("ppdl-spn", spn_model(dtype), ds, i, dtype=dtype)[0] for i in range(photos)]
        spn[label] = values
        lines.append(f"| {label} | {statistics.median(values):.1f} |")
    payload["ppdl_spn"] = spn

    lines += ["", "## PSNR against Gaussian noise on the shared gradient (std = level x RMS of each tensor)", ""]
    lines += ["| noise level | R-GAP, CNN6 | PPDL-SPN |", "| --- | --- | --- |"]
    noise_rows = []
    seeds = range(1 if args.quick else args.noise_seeds)
    for level in (0.0, 1e-4) if args.quick else NOISE_LEVELS:
        rg = [run("rgap", build_model("cnn6", num_classes=10, seed=0), ds, 2, noise=level, seed=s)[0] for s in seeds]
        sp = [run("ppdl-spn", spn_model(), ds, 2, noise=level, seed=s)[0] for s in seeds]
        noise_rows.append({"level": level, "rgap": rg, "ppdl_spn": sp})
        lines.append(f"| {level:g} | {statistics.median(rg):.1f} dB | {statistics.median(sp):.1f} dB |")
    payload["noise"] = noise_rows
    write_results(args.out, NAME, run_info, payload, "\n".join(lines))


if __name__ == "__main__":
    main()
