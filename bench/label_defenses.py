"""Do the defenses stop label leakage? Label-count accuracy of each method on defended updates.

Untrained MLP (FCN-3) on the bundled digits, FedSGD, batch 24, 20 client batches per point; every method
sees the same defended updates. Writes bench/results/label_defenses.{md,json}.
Usage: python bench/label_defenses.py [--trials 20] [--batch-size 24]
"""

from __future__ import annotations

import argparse

from _common import write_results
from gradinv.label_bench import prepare_case, run_trials, summarize

METHODS = ["ilrg", "llg-star", "fedavg-count", "llg", "bias-sign"]
DEFENSES = [
    "none",
    "noise:1e-3",
    "noise:1e-2",
    "noise:1e-1",
    "prune:0.9",
    "prune:0.99",
    "sign",
    "dpsgd:noise_multiplier=1,clip=1",
    "soteria:0.6",
    "mixup:2",
    "instahide:4",
    "dropout:0.5",
]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=24)
    args = parser.parse_args()
    table = {}
    for spec in DEFENSES:
        case = prepare_case(model="mlp", data="digits", defenses=() if spec == "none" else (spec,))
        records = run_trials(case, METHODS, batch_size=args.batch_size, trials=args.trials)
        table[spec] = {r["method"]: r for r in summarize(records)}
    lines = [
        f"Label count accuracy (mean over {args.trials} batches; n/a: the method declined), untrained MLP, digits, "
        f"FedSGD, batch {args.batch_size}",
        "",
        "| defense | " + " | ".join(METHODS) + " |",
        "| --- |" + " --- |" * len(METHODS),
    ]
    for spec, rows in table.items():
        cells = [f"{rows[m]['count']:.3f}" if rows[m]["count"] is not None else "n/a" for m in METHODS]
        lines.append(f"| {spec} | " + " | ".join(cells) + " |")
    payload = {"trials": args.trials, "batch_size": args.batch_size, "table": table}
    write_results("label_defenses", payload, "\n".join(lines))


if __name__ == "__main__":
    main()
