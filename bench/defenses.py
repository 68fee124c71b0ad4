"""Which defenses stop which attack (survey Table 2 against Table 1), on identical client batches.

Each case is a grid file, bench/grids/defenses-CASE.yaml (32x32 bundled photos, eval-mode BatchNorm, labels
recovered from the update):
- analytic: Phong et al.'s closed form on an MLP with bias, batch 1 (5 client batches), plus each defense's
  price: held-out digits accuracy of the MLP after 200 defended FedSGD rounds of batch 32;
- invgrad: Inverting Gradients (500 iterations, adaptive to pruning) on an untrained width-16 ConvNet,
  batch 1 (2 batches);
- invgrad-static: the same attack not told about the pruning defenses (it matches the zeros too);
- invgrad-batch4: the same attack on batches of 4, where the data defenses (MixUp, InstaHide) can act.
The grid's cells run through gradinv.experiments.defenses.bench_defenses, which adds what a plain grid run does
not measure: each defended update's cosine with the clean one, and the utility runs. Each case writes its store,
report.html and defenses.{md,json,png} to OUT/defenses/CASE/ (default bench/results/defenses/CASE/).
Usage: python bench/defenses.py [--cases analytic,invgrad,invgrad-static,invgrad-batch4] [--resume] [--threads 2]
"""

from __future__ import annotations

from _common import load, parser, setup
from gradinv.errors import GradinvError
from gradinv.experiments.defenses import bench_defenses, defense_cells, markdown_table

CASES = ("analytic", "invgrad", "invgrad-static", "invgrad-batch4")
UTILITY_STEPS = {"analytic": 200}  # defended FedSGD rounds of the utility measurement (0: none)


def sweep(name: str, *, quick: bool) -> dict:
    """bench_defenses' arguments for the grid bench/grids/defenses-NAME.yaml, checked to give its very cells."""
    grid = load(f"defenses-{name}", quick=quick)
    (attack,) = {c.attack for c in grid.cells}
    (settings,) = {c.attack_settings for c in grid.cells}
    seeds = sorted({c.case.seed for c in grid.cells})
    base = next(c.case for c in grid.cells if not c.case.defenses and c.case.seed == seeds[0])
    specs = list(dict.fromkeys(d.spec() for c in grid.cells for d in c.case.defenses))
    kwargs = dict(attack=attack, defenses=specs, samples=len(seeds), attack_settings=dict(settings))
    _, cells = defense_cells(base, **kwargs)
    if {c.key() for c in cells} != {c.key() for c in grid.cells}:
        raise SystemExit(f"bench/grids/defenses-{name}.yaml is not one attack x consecutive seeds x (none + defenses)")
    steps = UTILITY_STEPS.get(name, 0)
    return dict(case=base, **kwargs, utility_steps=min(steps, 2) if quick else steps)


def main() -> None:
    p = parser(__doc__, grid=True)
    p.add_argument("--cases", default=",".join(CASES), help=f"default {','.join(CASES)}")
    args = p.parse_args()
    setup(args)
    names = args.cases.split(",")
    unknown = sorted(set(names) - set(CASES))
    if unknown:
        p.error(f"unknown case(s) {unknown}: choose from {', '.join(CASES)}")
    for name in names:
        out = args.out / "defenses" / name
        print(f"defenses-{name} -> {out}", flush=True)
        try:
            result = bench_defenses(
                **sweep(name, quick=args.quick),
                out=out,
                resume=args.resume,
                progress=True,
                threads=args.threads,
                executor=args.executor,
                workers=args.workers,
            )
        except GradinvError as exc:  # e.g. a store of another run: the message says what to do
            raise SystemExit(f"error: {exc}") from None
        print(markdown_table(result["config"], result["summary"]))


if __name__ == "__main__":
    main()
