"""Batched restarts (torch.func.vmap) against the same restarts run one after another.

Inverting Gradients on the width-64 ConvNet at 32x32, batch 1. Reports the median time per iteration for
R = 1, 4, 8 restarts run as one batched computation and as R sequential runs, and their ratio.
Usage: python bench/restarts.py [--iterations 10] [--repeats 3]
"""

from __future__ import annotations

import argparse

from _common import median_seconds, photo_case, write_results
from gradinv.attacks import build_attack


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--width", type=int, default=64)
    args = parser.parse_args()
    _, scenario = photo_case(width=args.width)
    obs = scenario.observe()
    it = args.iterations
    rows = []
    for r in (1, 4, 8):
        batched = build_attack("invgrad", iterations=it, restarts=r)
        single = build_attack("invgrad", iterations=it, restarts=1)
        t_batched = median_seconds(lambda a=batched: a.reconstruct(obs), repeats=args.repeats)
        t_seq = median_seconds(
            lambda a=single, r=r: [a.reconstruct(obs, seed=s) for s in range(r)], repeats=args.repeats
        )
        rows.append(
            {
                "restarts": r,
                "batched_s_per_iter": t_batched / it,
                "sequential_s_per_iter": t_seq / it,
                "batched_s_per_iter_per_restart": t_batched / it / r,
                "speedup": t_seq / t_batched,
            }
        )
    lines = [
        f"Inverting Gradients, ConvNet width {args.width}, 32x32, batch 1; "
        f"median of {args.repeats} runs of {it} iterations",
        "",
        "| R | batched s/iter | sequential s/iter | batched s/iter/restart | sequential / batched |",
        "| --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        lines.append(
            f"| {row['restarts']} | {row['batched_s_per_iter']:.3f} | {row['sequential_s_per_iter']:.3f} | "
            f"{row['batched_s_per_iter_per_restart']:.3f} | {row['speedup']:.2f}x |"
        )
    write_results(
        "restarts",
        {"iterations": it, "repeats": args.repeats, "width": args.width, "rows": rows},
        "\n".join(lines),
    )


if __name__ == "__main__":
    main()
