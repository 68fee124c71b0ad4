"""The iteration-based family side by side (survey Table 1): one table from one grid.

Runs bench/grids/iterative.yaml (every iterative attack; 32x32 photos; ConvNet-64 and ResNet-18; batch 1 and 8;
untrained and trained 300 steps; 25 s per attack and cell) and iterative-fedavg.yaml (the multi-epoch FedAvg
attack beside Inverting Gradients on shuffling FedAvg clients) into OUT/iterative/ and writes OUT/iterative.{md,json}
(default OUT: bench/results): mean PSNR, SSIM, label accuracy, seconds and iterations run per cell, a status for
cells an attack declines, and per attack its mean over the cells it ran.
Usage: python bench/iterative.py [--resume] [--threads 2] [--quick]
"""

from __future__ import annotations

import statistics

from _common import fmt, parser, run_grids, setup, write_results

NAME = "iterative"


def _protocol(protocol) -> str:
    return protocol if isinstance(protocol, str) else protocol.get("name", str(protocol))


def main() -> None:
    args = parser(__doc__, grid=True).parse_args()
    run = setup(args)
    records = run_grids(args, [NAME, f"{NAME}-fedavg"], store=NAME)
    order = {a: i for i, a in enumerate(dict.fromkeys(r["attack"] for r in records))}
    records.sort(
        key=lambda r: (
            _protocol(r["protocol"]) != "fedsgd",
            r["model"],
            r["trained_steps"],
            r["batch_size"],
            order[r["attack"]],
        )
    )
    lines = [
        "Iteration-based attacks, 32x32 photos, labels recovered from the update, 25 s per attack and cell "
        f"({run['threads']} threads), one client batch (seed 0)",
        "",
        "| protocol | model | trained steps | batch | attack | PSNR | SSIM | label acc. | seconds | iterations "
        "| status |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    rows = []
    for r in records:
        details = r.get("details") or {}
        row = {
            k: r.get(k)
            for k in ("model", "trained_steps", "batch_size", "attack", "psnr", "ssim", "label_accuracy", "seconds")
        }
        row.update(iterations_run=details.get("iterations_run", details.get("lbfgs_iterations")), status=r["status"])
        row["stopped"] = details.get("stopped")
        row["key"] = r["key"]
        rows.append(row)
        status = r["status"] if r["status"] == "ok" else f"{r['status']}: {(r.get('reason') or '')[:60]}"
        lines.append(
            f"| {_protocol(r['protocol'])} | {r['model']} | {r['trained_steps']} | {r['batch_size']} | {r['attack']} "
            f"| {fmt(r.get('psnr'), '.2f')} "
            f"| {fmt(r.get('ssim'), '.3f')} | {fmt(r.get('label_accuracy'), '.2f')} | {fmt(r.get('seconds'), '.1f')} "
            f"| {fmt(row['iterations_run'], 'd')} | {status} |"
        )
    lines += ["", "| attack | cells run | mean PSNR | mean SSIM | mean label acc. |", "| --- | --- | --- | --- | --- |"]
    summary = {}
    for attack in order:
        ok = [r for r in records if r["attack"] == attack and r["status"] == "ok"]
        mean = {
            k: statistics.fmean(x) if (x := [r[k] for r in ok if r.get(k) is not None]) else None
            for k in ("psnr", "ssim", "label_accuracy")
        }
        summary[attack] = {"cells": len(ok), **mean}
        lines.append(
            f"| {attack} | {len(ok)} | {fmt(mean['psnr'], '.2f')} | {fmt(mean['ssim'], '.3f')} "
            f"| {fmt(mean['label_accuracy'], '.2f')} |"
        )
    write_results(
        args.out, NAME, run, {"grid": f"bench/grids/{NAME}.yaml", "rows": rows, "summary": summary}, "\n".join(lines)
    )


if __name__ == "__main__":
    main()
