"""GradInversion (Yin et al., CVPR 2021) against Inverting Gradients (Geiping et al., NeurIPS 2020) on a
BatchNorm network whose running statistics describe the client's kind of data, at the same wall-clock budget.

Case: ResNet-18 (eval-mode BatchNorm) trained ``--trained-steps`` SGD steps on ``photo-crops`` (random crops of
the bundled photos: its running statistics are natural-image statistics, and it never saw the client's images),
attacked on a FedSGD update of 8 whole bundled photos at 32x32 (distinct labels, as Yin et al.'s label rule
needs); ``--samples`` client batches (seeds 0..N-1 choose which 8 of the 9 photos). Each attack runs its own
preset (GradInversion: yin labels, TV, l2, BatchNorm prior against the running statistics, 4 restarts with
registered group consistency; Inverting Gradients: its label method, cosine + TV, one restart) with the same
``time_budget`` of wall time, with the labels given by the threat model (both attacks then differ only in their
objective, priors and restarts) and, with ``--recovered-labels``, once more with each attack's own label rule (on a
confident trained model Yin et al.'s rule may decline: recorded). Every run goes through the experiments layer.
Writes OUT/gradinversion.{json,md} (default OUT: bench/results). Usage:
    python bench/gradinversion.py [--threads 2] [--budget 120] [--samples 3] [--quick]
    python bench/gradinversion.py --iterations 100 --data photo-crops --first-seed 100 --samples 1 \
        --variants invgrad --bn-weights 1e-3,1e-4,1e-5,0 --name gradinversion_bn   (the BatchNorm prior's weight)
"""

from __future__ import annotations

import functools
import statistics
import time

from _common import fmt, parser, setup, write_results
from gradinv.experiments import Case, Cell, ModelCache, Seeds, run_cell

#: row name -> (attack, settings beside the budget): each preset as it is, and GradInversion with one restart (its
#: priors alone, at Inverting Gradients' cost per iteration plus the BatchNorm prior's forward pass)
VARIANTS = {
    "invgrad": ("invgrad", ()),
    "gradinversion": ("gradinversion", ()),
    "gradinversion-1-restart": ("gradinversion", (("restarts", 1),)),
}


def case(
    seed: int,
    *,
    known_labels: bool,
    trained_steps: int,
    batch: int,
    data: str = "photos",
    train_mode: bool = False,
    known_bn: bool = False,
) -> Case:
    return Case(
        model="resnet18",
        train_mode=train_mode,
        known_bn_statistics=known_bn,
        trained_steps=trained_steps,
        train_data="photo-crops",
        data=data,
        image_size=32,
        batch_size=batch,
        known_labels=known_labels,
        seeds=Seeds(model=0).vary(seed),
    )


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--budget", type=float, default=120.0, help="seconds of wall time per attack and batch")
    p.add_argument("--samples", type=int, default=3, help="client batches (seeds 0..N-1, default 3)")
    p.add_argument("--trained-steps", type=int, default=300, help="SGD steps on photo-crops (default 300)")
    p.add_argument("--recovered-labels", action="store_true", help="also run with labels recovered from the update")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"rows to run, of: {', '.join(VARIANTS)}")
    p.add_argument(
        "--bn-weights",
        default="",
        help="also GradInversion with 1 restart at these BatchNorm prior weights (e.g. 1e-3,1e-4,0)",
    )
    p.add_argument("--iterations", type=int, default=0, help="an iteration budget instead of --budget seconds")
    p.add_argument("--data", default="photos", help="the client batches: photos (default) or photo-crops")
    p.add_argument("--first-seed", type=int, default=0, help="batches are seeds FIRST..FIRST+N-1 (default 0)")
    p.add_argument("--name", default="gradinversion", help="results file name (default gradinversion)")
    p.add_argument("--train-mode", action="store_true", help="the client trains with train-mode BatchNorm")
    p.add_argument(
        "--known-bn",
        action="store_true",
        help="the threat model gives the client batch's BatchNorm statistics (Huang et al.'s BN exact)",
    )
    args = p.parse_args()
    run = setup(args)
    budget, samples, steps, batch = (3.0, 1, 5, 4) if args.quick else (args.budget, args.samples, args.trained_steps, 8)
    cache, rows, start = ModelCache(), [], time.perf_counter()
    modes = (True, False) if args.recovered_labels else (True,)
    variants = dict(VARIANTS)
    for w in (w for w in args.bn_weights.split(",") if w):
        variants[f"gradinversion-1-restart-bn={w}"] = ("gradinversion", (("restarts", 1), ("bn", float(w))))
    names = [v for v in args.variants.split(",") if v] + [v for v in variants if v not in VARIANTS]
    limit = ("iterations", args.iterations) if args.iterations else ("time_budget", budget)
    unknown = sorted(set(names) - set(variants))
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}: choose from {', '.join(VARIANTS)}")
    client = functools.partial(
        case, trained_steps=steps, batch=batch, data=args.data, train_mode=args.train_mode, known_bn=args.known_bn
    )
    for known in modes:
        for seed in range(args.first_seed, args.first_seed + samples):
            for name in names:
                attack, settings = variants[name]
                cell = Cell(client(seed, known_labels=known), attack, (limit, *settings))
                r = run_cell(cell, cache=cache, raise_errors=True).record
                details = r.details or {}
                rows.append(
                    {
                        "known_labels": known,
                        "seed": seed,
                        "attack": name,
                        "psnr": r.psnr,
                        "ssim": r.ssim,
                        "label_accuracy": r.label_accuracy,
                        "seconds": r.seconds,
                        "iterations_run": details.get("iterations_run"),
                        "status": r.status,
                        "reason": r.reason,
                    }
                )
                if r.status != "ok":
                    print(f"{name} on batch {seed}: {r.status}: {r.reason}", flush=True)
                print(
                    f"{'known' if known else 'recovered'} labels, seed {seed}, {name}: {fmt(r.psnr, '.2f')} dB, "
                    f"labels {r.label_accuracy}, {details.get('iterations_run')} it. in {fmt(r.seconds, '.1f')} s",
                    flush=True,
                )
    total = time.perf_counter() - start

    def pick(known: bool, attack: str, key: str) -> list[float]:
        return [r[key] for r in rows if r["known_labels"] == known and r["attack"] == attack and r[key] is not None]

    lines = [
        f"GradInversion vs Inverting Gradients: ResNet-18 trained {steps} steps on photo-crops, batch {batch} of "
        f"{'whole photos' if args.data == 'photos' else args.data} at 32x32 (batch seeds {args.first_seed}.."
        f"{args.first_seed + samples - 1}), FedSGD, "
        f"{f'{args.iterations} iterations' if args.iterations else f'{budget:g} s of wall time'} per attack and "
        f"batch, {samples} batch(es); "
        f"{'train' if args.train_mode else 'eval'}-mode BatchNorm, BatchNorm prior against the "
        f"{'client batch' if args.known_bn else 'running'} statistics; "
        f"{run['threads']} thread(s), {total:.0f} s in all.",
        "",
        "| labels | attack | mean PSNR (dB) | mean SSIM | label acc. | iterations | PSNR per batch |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    summary = []
    for known in modes:
        for attack in names:
            psnr = pick(known, attack, "psnr")
            if not psnr:
                declined = [r["reason"] for r in rows if r["known_labels"] == known and r["attack"] == attack]
                lines.append(f"| recovered | {attack} | declined: {declined[0]} | | | | |")
                continue
            item = {
                "known_labels": known,
                "attack": attack,
                "mean_psnr": statistics.mean(psnr),
                "mean_ssim": statistics.mean(pick(known, attack, "ssim")),
                "label_accuracy": statistics.mean(pick(known, attack, "label_accuracy")) if not known else None,
                "mean_iterations": statistics.mean(pick(known, attack, "iterations_run") or [0]),
            }
            summary.append(item)
            lines.append(
                f"| {'given' if known else 'recovered'} | {attack} | {item['mean_psnr']:.2f} | "
                f"{item['mean_ssim']:.3f} | {fmt(item['label_accuracy'], '.2f', 'given')} | "
                f"{item['mean_iterations']:.0f} | " + ", ".join(f"{v:.2f}" for v in psnr) + " |"
            )
    payload = {
        "case": client(0, known_labels=False).to_dict(),
        "budget_seconds": None if args.iterations else budget,
        "iterations": args.iterations or None,
        "data": args.data,
        "first_seed": args.first_seed,
        "samples": samples,
        "seconds": total,
        "summary": summary,
        "runs": rows,
    }
    write_results(args.out, args.name, run, payload, "\n".join(lines))


if __name__ == "__main__":
    main()
