"""Batched restarts (torch.func.vmap) against the same restarts run one after another.

Inverting Gradients on the width-64 ConvNet at 32x32, batch 1. Reports the median time per iteration for
R restarts run as one batched computation and as R sequential runs, and their ratio. On a GPU (the default
device when one is present) batch-1 work leaves the device idle, so batching should gain there; on a busy CPU
it gains little. Writes OUT/restarts.{md,json} (OUT/restarts_cuda.* on a GPU; default OUT: bench/results).
Usage: python bench/restarts.py [--iterations 10] [--repeats 3] [--device cuda] [--restarts 1,4,8,16] [--threads 2]
"""

from __future__ import annotations

import torch

from _common import median_seconds, parser, photo_case, setup, write_results
from gradinv.attacks import build_attack


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--iterations", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--restarts", default="1,4,8", help="comma-separated restart counts")
    args = p.parse_args()
    run = setup(args)  # threads pinned before anything is built or timed
    if args.quick:
        args.iterations, args.repeats, args.restarts = 2, 1, "1,2"
    counts = [int(r) for r in args.restarts.split(",")]
    dev = args.device
    _, scenario = photo_case(width=args.width, device=dev)
    obs = scenario.observe()
    it = args.iterations
    model = scenario.model.eval()
    x, y = scenario.inputs, scenario.labels

    def training_step() -> None:
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()

    t_step = median_seconds(training_step, repeats=10 * args.repeats, device=dev)
    rows = []
    for r in counts:
        batched = build_attack("invgrad", iterations=it, restarts=r)
        single = build_attack("invgrad", iterations=it, restarts=1)
        t_batched = median_seconds(lambda a=batched: a.reconstruct(obs), repeats=args.repeats, device=dev)
        t_seq = median_seconds(
            lambda a=single, r=r: [a.reconstruct(obs, seed=s) for s in range(r)], repeats=args.repeats, device=dev
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
    t_iter = rows[0]["batched_s_per_iter"]
    where = (
        torch.cuda.get_device_name(dev)
        if torch.device(dev).type == "cuda"
        else f"CPU, {torch.get_num_threads()} threads"
    )
    lines = [
        f"Inverting Gradients, ConvNet width {args.width}, 32x32, batch 1, on {where}; "
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
    lines += [
        "",
        f"One training step (forward + backward, batch 1): {t_step:.3f} s; one attack iteration (R = 1): "
        f"{t_iter:.3f} s = {t_iter / t_step:.1f} training steps.",
    ]
    payload = {
        "iterations": it,
        "repeats": args.repeats,
        "width": args.width,
        "device": where,
        "rows": rows,
        "train_step_s": t_step,
    }
    suffix = "" if torch.device(dev).type == "cpu" else f"_{torch.device(dev).type}"
    write_results(args.out, f"restarts{suffix}", run, payload, "\n".join(lines))


if __name__ == "__main__":
    main()
