"""DP-SGD by gradinv and by Opacus, side by side: the epsilon each accountant reports for the same steps, noise
and delta, and the same attack on a client whose DP-SGD step is computed by either backend.

For each noise multiplier (clip 1, FedSGD, one sample per client, bundled digits 32x32, labels recovered from
the update), SEEDS client batches, two attacks against ``dpsgd:...,backend=gradinv`` and against
``dpsgd:...,backend=opacus``:
- Inverting Gradients on an untrained LeNet, ITERATIONS iterations (fewer than the paper's 4,000, so the
  whole run stays near two minutes on one thread);
- the defense sweep's analytic attack (Phong et al.) on an untrained MLP with bias: exact without noise.
Both backends see the same batch, model and attack seed; only the noise draws differ (each backend draws its
own from the scenario's seed). Also measured on LeNet: the std of each backend's noise, (update - the
noiseless clipped update) / (sigma C / B), which should be 1.
Writes OUT/opacus_compare.{md,json} (default bench/results).
Usage: python bench/opacus_compare.py [--threads 1] [--seeds 5] [--iterations 200] [--quick]
"""

from __future__ import annotations

import math
import statistics
import time

import torch

from _common import parser, setup, write_results
from gradinv.experiments import Case, Cell, Seeds, run_cell
from gradinv.experiments.case import ModelCache, build_client
from gradinv.integrations.opacus import NOTE, compare_epsilon, opacus_epsilon

NAME = "opacus_compare"
NOISE = (0.5, 1.0, 2.0)  # the settings whose epsilon and attacks are compared
REFERENCE = 0.0  # clipping only: each attack's strength without noise (epsilon infinite)
CLIP = 1.0
DELTA = 1e-5
BATCH = 1
BACKENDS = ("gradinv", "opacus")
ATTACKS = (("lenet", "invgrad"), ("mlp", "analytic"))  # (model, attack)
SUBSAMPLED = 0.01  # Opacus' usual setting, Poisson sampling of rate q from a dataset: shown for contrast


def case_for(model: str, sigma: float, backend: str, seed: int) -> Case:
    spec = f"dpsgd:noise_multiplier={sigma},clip={CLIP},delta={DELTA},backend={backend}"
    return Case(model=model, data="digits", batch_size=BATCH, defenses=(spec,), seeds=Seeds.all(seed))


def noise_ratio(sigma: float, backend: str, seed: int, cache: ModelCache) -> float:
    """The std of ``backend``'s noise on LeNet's update, in units of its nominal sigma C / B."""
    noisy = build_client(case_for("lenet", sigma, backend, seed), cache=cache).observation.update
    clean = build_client(case_for("lenet", 0.0, "gradinv", seed), cache=cache).observation.update
    diff = torch.cat([(noisy[k] - clean[k]).flatten() for k in clean])
    return float(diff.std()) / (sigma * CLIP / BATCH)


def mean_std(values: list[float]) -> str:
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}" if len(values) > 1 else f"{values[0]:.2f}"


def e(value: float) -> str:
    return "∞" if math.isinf(value) else f"{value:.3f}"


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--seeds", type=int, default=5, help="client batches per setting (default 5)")
    p.add_argument("--iterations", type=int, default=200, help="Inverting Gradients iterations (default 200)")
    args = p.parse_args()
    run = setup(args)
    seeds = list(range(1 if args.quick else args.seeds))
    iterations = 2 if args.quick else args.iterations
    cache = ModelCache()
    start = time.perf_counter()

    epsilons = []
    for sigma in NOISE:
        c = compare_epsilon(noise_multiplier=sigma, steps=1, delta=DELTA)
        sub = opacus_epsilon(noise_multiplier=sigma, steps=1, delta=DELTA, sample_rate=SUBSAMPLED)
        epsilons.append(
            {
                "noise_multiplier": sigma,
                "gradinv": c.gradinv,
                "rdp": c.rdp,
                "prv": c.prv,
                "gdp": c.gdp,
                "rdp_subsampled": sub,
            }
        )

    rows = []
    for model, attack in ATTACKS:
        settings = (("iterations", iterations),) if attack == "invgrad" else ()
        for sigma in (REFERENCE, *NOISE):
            psnr: dict[str, list[float]] = {b: [] for b in BACKENDS}
            ratio: dict[str, list[float]] = {b: [] for b in BACKENDS}
            for seed in seeds:
                for backend in BACKENDS:
                    cell = Cell(case_for(model, sigma, backend, seed), attack, settings)
                    psnr[backend].append(float(run_cell(cell, cache=cache, raise_errors=True).record.psnr))
                    if model == "lenet" and sigma > 0:
                        ratio[backend].append(noise_ratio(sigma, backend, seed, cache))
            paired = [o - g for o, g in zip(psnr["opacus"], psnr["gradinv"], strict=True)]
            se = statistics.stdev(paired) / math.sqrt(len(paired)) if len(paired) > 1 else math.nan
            rows.append(
                {
                    "model": model,
                    "attack": attack,
                    "noise_multiplier": sigma,
                    "psnr": psnr,
                    "psnr_paired_difference": {"mean": statistics.mean(paired), "standard_error": se},
                    "noise_std_over_nominal": {b: statistics.mean(v) if v else None for b, v in ratio.items()},
                }
            )
            print(f"{attack} sigma {sigma}: done ({time.perf_counter() - start:.0f} s)", flush=True)
    seconds = time.perf_counter() - start

    lines = [
        f"DP-SGD by gradinv and by Opacus: FedSGD, batch {BATCH}, clip {CLIP}, delta {DELTA:g}, one step, sample "
        "rate 1 (the client's whole fixed batch).",
        "",
        "Epsilon of the same Gaussian mechanism by gradinv's exact accountant and Opacus' three accountants "
        f"(last column: what Opacus' RDP would report with Poisson sampling at q = {SUBSAMPLED}, which a fixed "
        "federated batch does not have):",
        "",
        "| sigma | ε gradinv (exact GDP) | ε opacus RDP | ε opacus PRV | ε opacus GDP (CLT) | ε opacus RDP, q = "
        f"{SUBSAMPLED} |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in epsilons:
        lines.append(
            f"| {r['noise_multiplier']:g} | {e(r['gradinv'])} | {e(r['rdp'])} "
            f"({100 * (r['rdp'] / r['gradinv'] - 1):+.1f}%) | {e(r['prv'])} | {e(r['gdp'])} | "
            f"{e(r['rdp_subsampled'])} |"
        )
    lines += [
        "",
        f"The same attack on a client of either backend, bundled digits 32x32, untrained models, labels from the "
        f"update. PSNR (dB) mean ± std over {len(seeds)} client batches (seeds {seeds[0]}..{seeds[-1]}); Δ: opacus "
        "- gradinv, paired by seed, ± its standard error; noise/nominal: measured std of (update - noiseless "
        f"clipped update) over sigma C / B. Inverting Gradients runs only {iterations} iterations (the paper: "
        "4,000), so its noiseless PSNR is low; the analytic attack is exact without noise.",
        "",
        "| attack (model) | sigma | ε gradinv | PSNR gradinv backend | PSNR opacus backend | Δ PSNR | "
        "noise/nominal gradinv | noise/nominal opacus |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    eps_of = {r["noise_multiplier"]: r["gradinv"] for r in epsilons}
    for row in rows:
        d = row["psnr_paired_difference"]
        ratios = row["noise_std_over_nominal"]
        lines.append(
            f"| {row['attack']} ({row['model']}) | {row['noise_multiplier']:g} | "
            f"{e(eps_of.get(row['noise_multiplier'], math.inf))} | {mean_std(row['psnr']['gradinv'])} | "
            f"{mean_std(row['psnr']['opacus'])} | {d['mean']:+.2f} ± {d['standard_error']:.2f} | "
            + " | ".join("-" if ratios[b] is None else f"{ratios[b]:.3f}" for b in BACKENDS)
            + " |"
        )
    lines += [
        "",
        "Why the epsilons differ: " + NOTE,
        "",
        f"{len(rows) * len(seeds) * len(BACKENDS)} attacks in {seconds:.0f} s, {run['threads']} thread(s).",
    ]
    payload = {
        "data": "digits",
        "batch_size": BATCH,
        "clip": CLIP,
        "delta": DELTA,
        "invgrad_iterations": iterations,
        "seeds": seeds,
        "seconds": round(seconds, 1),
        "epsilon": epsilons,
        "rows": rows,
    }
    write_results(args.out, NAME, run, payload, "\n".join(lines))


if __name__ == "__main__":
    main()
