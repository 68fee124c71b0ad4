"""The label-recovery benchmark: every method x model (trained and untrained) x batch size on the digits, plus
a synthetic 1,000-class case; existence and count accuracy, time per recovery.

The grids bench/grids/labels.yaml and labels-synthetic.yaml (the cells `gradinv bench labels --trials 3` runs)
go into OUT/labels/ (store, report.html, results.csv); the summary is written to OUT/labels.{csv,md,json} and
the plot to OUT/labels.png (default OUT: bench/results).
Usage: python bench/labels.py [--resume] [--threads 2] [--quick]
"""

from __future__ import annotations

from _common import parser, run_grids, setup
from gradinv.experiments.labels import plot_accuracy, save_trials, summarize


def main() -> None:
    args = parser(__doc__, grid=True).parse_args()
    setup(args)
    records = run_grids(args, ["labels", "labels-synthetic"], store="labels")
    rows = summarize(records)
    save_trials(records, rows, args.out, name="labels")
    plot_accuracy(rows, args.out / "labels.png")
    threads = sorted({r["threads"] for r in records})
    print(f"{len(records)} recoveries over {len(rows)} points, torch threads {threads} -> {args.out}/labels.*")


if __name__ == "__main__":
    main()
