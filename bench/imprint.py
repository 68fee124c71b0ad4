"""Malicious-server attacks: fraction of a batch recovered verbatim (PSNR > 40 dB) against batch size.

- Robbing the Fed (Fowl et al. 2022): bins 64, 128, 256; the server fits its thresholds to 600 public digits
  (disjoint from the clients' images). A reference column gives the expected fraction for perfectly
  equal-mass bins, ``(1 - 1/K)^(B - 1)`` (a sample is clean iff no other sample shares its bin), and one row
  shows the server without public data (``N(0, 1)`` assumed for the measurement).
- Trap weights (Boenisch et al. 2023) on the MLP's first layer with 64, 128, 256 and 1,024 rows: the fixed
  scale ``s = 1.05`` and rows calibrated on the public digits to fire for ``1 / B`` of the images.

Digits at 32x32x3 (the bundled photos are only 9 images), FedSGD, median over seeds 0, 1, 2 (batch, model
and server all change with the seed). Also the issue's acceptance line (batch 64, 128 bins, at least half
above 40 dB) over ``--acceptance-seeds`` seeds. Writes OUT/imprint.{json,md} (default OUT: bench/results).
Not a grid: the server's public data is a fixed split of 600 digits, the clients' batches come from the rest,
and one row gives the server none; a grid's malicious server takes its public images from outside each batch.
Usage: python bench/imprint.py [--model mlp] [--seeds 3] [--acceptance-seeds 50] [--threads 2]
"""

from __future__ import annotations

import statistics
import time

import torch

from _common import parser, setup, write_results
from gradinv.attacks import build_attack
from gradinv.attacks.imprint import score_recovered
from gradinv.data import ImageDataset, load_dataset, sample_batch
from gradinv.fl import Scenario
from gradinv.fl.malicious import ImprintServer, TrapWeightsServer
from gradinv.models import build_model
from gradinv.types import ThreatModel

BATCHES = (16, 32, 64, 128, 256)
BINS = (64, 128, 256)
ROWS = (64, 128, 256, 1024)
THRESHOLD_DB = 40.0


def _split(ds: ImageDataset, *, public: int = 600) -> tuple[torch.Tensor, ImageDataset]:
    perm = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))
    rest = perm[public:]
    private = ImageDataset.from_tensors("digits-private", ds.images[rest], ds.labels[rest])
    return ds.normalization.normalize(ds.images[perm[:public]]), private


def _fraction(ds, private, model, server, attack: str, *, batch: int, seed: int) -> float:
    images, labels = sample_batch(private, batch_size=batch, seed=seed)
    threat = ThreatModel(server=server)
    sc = Scenario.from_images(model, images, labels, normalization=ds.normalization, threat=threat)
    rec = build_attack(attack).reconstruct(sc.observe())
    return score_recovered(rec.images, sc.ground_truth().images, threshold_db=THRESHOLD_DB).fraction


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--model", default="mlp", help="model behind the imprint block (Robbing the Fed)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--acceptance-seeds", type=int, default=50)
    args = p.parse_args()
    run = setup(args)  # threads pinned before anything is built or timed
    batches, bin_counts, row_counts = BATCHES, BINS, ROWS
    if args.quick:
        batches, bin_counts, row_counts = (16,), (64,), (64,)
        args.seeds, args.acceptance_seeds = 1, 1
    start = time.perf_counter()
    ds = load_dataset("digits", image_size=32, channels=3)
    public, private = _split(ds)
    seeds = range(args.seeds)

    def median(fn) -> tuple[float, list[float]]:
        values = [fn(seed) for seed in seeds]
        return statistics.median(values), values

    def rtf(batch: int, bins: int, aux: bool):
        return median(
            lambda seed: _fraction(
                ds,
                private,
                build_model(args.model, num_classes=10, image_size=32, seed=seed),
                ImprintServer(bins=bins, seed=seed, auxiliary=public if aux else None, input_shape=(3, 32, 32)),
                "rtf",
                batch=batch,
                seed=seed,
            )
        )

    def trap(batch: int, rows: int, calibrated: bool):
        return median(
            lambda seed: _fraction(
                ds,
                private,
                build_model("mlp", num_classes=10, image_size=32, seed=seed, hidden=(rows, 256)),
                TrapWeightsServer(
                    normalization=ds.normalization,
                    seed=seed,
                    auxiliary=public if calibrated else None,
                    rate=1 / batch if calibrated else None,
                ),
                "trap-weights",
                batch=batch,
                seed=seed,
            )
        )

    results: dict[str, list[dict]] = {"rtf": [], "trap": []}
    for bins in bin_counts:
        for batch in batches:
            med, values = rtf(batch, bins, True)
            expected = (1 - 1 / bins) ** (batch - 1)
            results["rtf"].append(
                {"bins": bins, "batch": batch, "auxiliary": True, "median": med, "values": values, "ideal": expected}
            )
    for batch in batches:
        med, values = rtf(batch, 128, False)
        results["rtf"].append({"bins": 128, "batch": batch, "auxiliary": False, "median": med, "values": values})
    for calibrated in (True, False):
        for rows in row_counts:
            for batch in batches:
                med, values = trap(batch, rows, calibrated)
                results["trap"].append(
                    {"rows": rows, "batch": batch, "calibrated": calibrated, "median": med, "values": values}
                )
    acceptance = [
        _fraction(
            ds,
            private,
            build_model(args.model, num_classes=10, image_size=32, seed=seed),
            ImprintServer(bins=128, seed=seed, auxiliary=public),
            "rtf",
            batch=64,
            seed=seed,
        )
        for seed in range(args.acceptance_seeds)
    ]
    seconds = time.perf_counter() - start

    def cell(rows: list[dict], batch: int) -> str:
        (row,) = [r for r in rows if r["batch"] == batch]
        return f"{row['median']:.2f}"

    header = "| " + " | ".join(str(b) for b in batches) + " |"
    rule = "| --- " * (len(batches) + 1) + "|"
    lines = [
        f"Fraction of the batch recovered above {THRESHOLD_DB:.0f} dB PSNR (each true image against its best "
        f"recovered image), digits 32x32x3, FedSGD, median over seeds {list(seeds)}.",
        "",
        f"Robbing the Fed (Fowl et al. 2022), imprint block in front of `{args.model}`; thresholds fitted to 600 "
        "public digits (Gaussian); in brackets the expected fraction for ideal equal-mass bins, (1 - 1/K)^(B-1).",
        "",
        "| bins \\ batch " + header,
        rule,
    ]
    for bins in bin_counts:
        rows = [r for r in results["rtf"] if r["bins"] == bins and r["auxiliary"]]
        cells = [f"{cell(rows, b)} ({[r for r in rows if r['batch'] == b][0]['ideal']:.2f})" for b in batches]
        lines.append(f"| {bins} | " + " | ".join(cells) + " |")
    rows = [r for r in results["rtf"] if not r["auxiliary"]]
    lines.append("| 128, no public data (N(0, 1) assumed) | " + " | ".join(cell(rows, b) for b in batches) + " |")
    for calibrated in (True, False):
        how = (
            "rows calibrated on the public digits to fire for 1/B of the images"
            if calibrated
            else "fixed scale s = 1.05 (no public data)"
        )
        lines += [
            "",
            f"Trap weights (Boenisch et al. 2023) on the MLP's first layer, {how}.",
            "",
            "| rows \\ batch " + header,
            rule,
        ]
        for n in row_counts:
            rows = [r for r in results["trap"] if r["rows"] == n and r["calibrated"] == calibrated]
            lines.append(f"| {n} | " + " | ".join(cell(rows, b) for b in batches) + " |")
    passed = sum(f >= 0.5 for f in acceptance)
    lines += [
        "",
        f"Acceptance line (batch 64, 128 bins, `{args.model}`): at least half above {THRESHOLD_DB:.0f} dB on "
        f"{passed} of {len(acceptance)} seeds (0 to {len(acceptance) - 1}); fraction mean "
        f"{statistics.mean(acceptance):.3f}, median {statistics.median(acceptance):.3f}, min {min(acceptance):.3f}"
        f" (ideal bins: {(1 - 1 / 128) ** 63:.3f} expected).",
        "",
        f"Total time {seconds:.0f} s.",
    ]
    payload = {
        "model": args.model,
        "seeds": list(seeds),
        "threshold_db": THRESHOLD_DB,
        "results": results,
        "acceptance": {"batch": 64, "bins": 128, "fractions": acceptance, "passed": passed},
        "seconds": seconds,
    }
    write_results(args.out, "imprint", run, payload, "\n".join(lines))


if __name__ == "__main__":
    main()
