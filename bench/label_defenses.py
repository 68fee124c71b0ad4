"""Do the defenses stop label leakage? Label-count accuracy of each method on defended updates.

The grid bench/grids/label_defenses.yaml: an untrained MLP (FCN-3) on the bundled digits, FedSGD, batch 24,
20 client batches per defense; every method sees the same defended updates. Runs it into OUT/label_defenses/
(store, report.html, results.csv) and writes the table to OUT/label_defenses.{md,json} (default OUT:
bench/results).
Usage: python bench/label_defenses.py [--resume] [--threads 2] [--quick]
"""

from __future__ import annotations

from _common import load, parser, run_grids, setup, write_results
from gradinv.defenses import as_defense
from gradinv.experiments.labels import summarize

NAME = "label_defenses"


def main() -> None:
    args = parser(__doc__, grid=True).parse_args()
    run = setup(args)
    records = run_grids(args, [NAME])
    spec = load(NAME, quick=args.quick).spec
    methods = [a.removeprefix("labels:") for a in spec["attacks"]]
    # the grid's own spelling of each defense (records hold the full spec)
    short = {as_defense(d[0]).spec(): d[0] for d in spec["defenses"] if d}

    def label(r: dict) -> str:
        return short.get(r["defenses"][0], r["defenses"][0]) if r["defenses"] else "none"

    groups: dict[str, list[dict]] = {}
    for r in records:
        groups.setdefault(label(r), []).append(r)
    table = {spec: {row["method"]: row for row in summarize(group)} for spec, group in groups.items()}
    trials = len({r["seed"] for r in records})
    (batch,) = {r["batch_size"] for r in records}
    lines = [
        f"Label count accuracy (mean over {trials} batches; n/a: the method declined), untrained MLP, digits, "
        f"FedSGD, batch {batch}",
        "",
        "| defense | " + " | ".join(methods) + " |",
        "| --- |" + " --- |" * len(methods),
    ]
    for label, rows in table.items():
        cells = [f"{rows[m]['count']:.3f}" if m in rows and rows[m]["count"] is not None else "n/a" for m in methods]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    payload = {"grid": f"bench/grids/{NAME}.yaml", "trials": trials, "batch_size": batch, "table": table}
    write_results(args.out, NAME, run, payload, "\n".join(lines))


if __name__ == "__main__":
    main()
