"""Data attacks with recovered labels versus true labels: PSNR side by side.

When the threat model does not give the labels, iDLG and Inverting Gradients take them from a label method
(``auto``: iDLG's rule at batch 1, iLRG for batches). The grids bench/grids/labels_in_attacks-{photos,digits}.yaml
run each case twice on the same seed, once with the labels recovered from the update and once with the true
labels given; this script runs them into OUT/labels_in_attacks/ and writes both PSNRs and the recovered labels'
count accuracy to OUT/labels_in_attacks.{md,json} (default OUT: bench/results).
Usage: python bench/labels_in_attacks.py [--resume] [--threads 2] [--quick]
"""

from __future__ import annotations

import statistics

from _common import fmt, median, parser, run_grids, setup, write_results

NAME = "labels_in_attacks"


def main() -> None:
    args = parser(__doc__, grid=True).parse_args()
    run = setup(args)
    records = run_grids(args, [f"{NAME}-photos", f"{NAME}-digits"], store=NAME)
    cases: dict[tuple, dict[bool, list[dict]]] = {}
    for r in records:
        case = (r["attack"], r["model"], r["data"], r["batch_size"], r["iterations"])
        cases.setdefault(case, {False: [], True: []})[r["known_labels"]].append(r)
    seeds = sorted({r["seed"] for r in records})
    rows, lines = [], []
    for (attack, model, data, batch, iterations), runs in cases.items():
        rec, true = (sorted(runs[k], key=lambda r: r["seed"]) for k in (False, True))
        accuracy = [r["label_accuracy"] for r in rec if r.get("label_accuracy") is not None]
        row = {
            "attack": attack,
            "model": model,
            "data": data,
            "batch_size": batch,
            "iterations": iterations,
            "seeds": [r["seed"] for r in rec],
            "label_source": rec[0]["label_source"] if rec else None,
            "label_accuracy": accuracy,
            "psnr_recovered_labels": [r["psnr"] for r in rec],
            "psnr_true_labels": [r["psnr"] for r in true],
            "keys": [r["key"] for r in rec + true],
        }
        rows.append(row)
        lines.append(
            f"| {attack} | {model} | {data} | {batch} | {iterations} | {row['label_source']} | "
            f"{fmt(statistics.fmean(accuracy) if accuracy else None, '.2f')} | "
            f"{fmt(median(row['psnr_recovered_labels']), '.2f')} | {fmt(median(row['psnr_true_labels']), '.2f')} |"
        )
    table = "\n".join(
        [
            f"Attacks with recovered vs true labels (median PSNR over seeds {seeds})",
            "",
            "| attack | model | data | batch | iterations | label method | label count accuracy "
            "| PSNR recovered labels | PSNR true labels |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
            *lines,
        ]
    )
    grids = [f"bench/grids/{NAME}-photos.yaml", f"bench/grids/{NAME}-digits.yaml"]
    write_results(args.out, NAME, run, {"grids": grids, "rows": rows}, table)


if __name__ == "__main__":
    main()
