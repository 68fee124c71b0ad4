"""The Bayes-optimal adversary under Gaussian noise (Balunović et al., ICLR 2022) against the same attack without
its noise model.

Case: DLG's LeNet (untrained, U(-0.5, 0.5) weights, sigmoid) on the bundled digits at 16x16 (3 channels, as
every case loads them), batch 1, FedSGD, labels given by the threat model (so that label recovery from a noisy
update does not blur the comparison), the model of seed 0 and one client batch per seed. The client adds
Gaussian noise of std 0.01, 0.03 and 0.1 to its update (``noise:STD``, absolute per entry; the table gives the
clean update's RMS to set them in scale).

Attacks, all with the same budget (500 Adam iterations, lr 0.1, cosine decay, box, one Gaussian restart of the
attack seed) and the same image prior (squared total variation of the normalised input, weight 1):

- ``bayesian``: the negative log posterior, ``||g(x) - g_obs||^2 / (2 sigma^2) + prior``;
- ``no noise model``: ``noise_model=False``, the plain Euclidean distance plus the same prior (the issue's
  comparison: the same objective without the noise model);
- ``no noise model, no prior``: the plain Euclidean distance alone (``prior_weight=0``), i.e. the attacker that
  takes the update as exact (the noise-free limit of the posterior).

Reported: mean PSNR per noise level and attack over the samples, the differences and on how many samples the
Bayesian attack is ahead. Every run goes through the experiments layer (``run_cell``).
Writes OUT/bayesian.{json,md} (default OUT: bench/results). ``--quick``: 2 samples, 10 iterations.
Usage: python bench/bayesian.py [--threads 1] [--quick] [--samples N]
"""

from __future__ import annotations

import statistics
import time

import torch

import gradinv.attacks.bayesian  # noqa: F401  (registers "bayesian")
from _common import parser, setup, write_results
from gradinv.experiments import Case, Cell, ModelCache, Seeds, build_client, run_cell

LEVELS = (0.01, 0.03, 0.1)
ITERATIONS = 500
VARIANTS = {
    "bayesian": (),
    "no noise model": (("noise_model", False),),
    "no noise model, no prior": (("noise_model", False), ("prior_weight", 0.0)),
}


def case(std: float, seed: int) -> Case:
    return Case(
        model="lenet",
        data="digits",
        image_size=16,
        batch_size=1,
        known_labels=True,
        defenses=(f"noise:{std}",),
        seeds=Seeds(model=0).vary(seed),
    )


def update_rms(seeds: list[int], cache: ModelCache) -> float:
    """The clean update's root-mean-square entry, averaged over the client batches."""
    values = []
    for seed in seeds:
        update = build_client(case(0.0, seed), cache=cache).observation.update
        total = sum(v.numel() for v in update.values())
        values.append(float(torch.sqrt(sum(v.pow(2).sum() for v in update.values()) / total)))
    return statistics.mean(values)


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--samples", type=int, default=5, help="client batches (seeds 0..N-1) per noise level (default 5)")
    args = p.parse_args()
    run = setup(args)
    samples = 2 if args.quick else args.samples
    iterations = 10 if args.quick else ITERATIONS
    seeds = list(range(samples))
    cache = ModelCache()
    rms = update_rms(seeds, cache)
    rows, start = [], time.perf_counter()
    for std in LEVELS:
        for seed in seeds:
            for variant, options in VARIANTS.items():
                settings = (("iterations", iterations), *options)
                r = run_cell(Cell(case(std, seed), "bayesian", settings), cache=cache, raise_errors=True).record
                rows.append(
                    {
                        "std": std,
                        "seed": seed,
                        "attack": variant,
                        "psnr": r.psnr,
                        "seconds": r.seconds,
                        "likelihood": r.details.get("likelihood"),
                    }
                )
                print(f"std {std:g} seed {seed} {variant}: {r.psnr:.2f} dB ({r.seconds:.1f} s)", flush=True)
    total = time.perf_counter() - start

    def psnrs(std: float, variant: str) -> list[float]:
        return [r["psnr"] for r in rows if r["std"] == std and r["attack"] == variant]

    names = list(VARIANTS)
    lines = [
        f"Bayesian attack vs the same attack without its noise model: DLG LeNet, digits 16x16, batch 1, known "
        f"labels, Gaussian noise on the update (clean update RMS {rms:.3f}); {iterations} Adam iterations each, "
        f"{samples} client batches per level; {run['threads']} thread(s), {total:.0f} s in all.",
        "",
        "| noise std | " + " | ".join(f"{n} (dB)" for n in names) + " | bayesian - no noise model | "
        "bayesian - no prior | bayesian ahead (vs each) |",
        "| --- | " + " | ".join("---" for _ in names) + " | --- | --- | --- |",
    ]
    summary = []
    for std in LEVELS:
        means = {n: statistics.mean(psnrs(std, n)) for n in names}
        bayes = psnrs(std, "bayesian")
        ahead = [sum(b > o for b, o in zip(bayes, psnrs(std, n), strict=True)) for n in names[1:]]
        diffs = [means["bayesian"] - means[n] for n in names[1:]]
        summary.append({"std": std, "mean_psnr": means, "difference": dict(zip(names[1:], diffs, strict=True))})
        lines.append(
            f"| {std:g} | "
            + " | ".join(f"{means[n]:.2f}" for n in names)
            + f" | {diffs[0]:+.2f} | {diffs[1]:+.2f} | {ahead[0]}/{samples}, {ahead[1]}/{samples} |"
        )
    payload = {
        "case": case(LEVELS[0], 0).to_dict(),
        "levels": list(LEVELS),
        "iterations": iterations,
        "samples": samples,
        "update_rms": rms,
        "seconds": total,
        "summary": summary,
        "runs": rows,
    }
    write_results(args.out, "bayesian", run, payload, "\n".join(lines))


if __name__ == "__main__":
    main()
