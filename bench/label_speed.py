"""Seconds to recover the labels of one batch of 256, per method and model (median of 3 calls on the same
observation; the client's own gradient computation is not counted). Untrained models (seed 0), the client's
batch of seed 0; llg-plus gets 32 more images of the same source as auxiliary data. A timing benchmark, not a
grid. Writes OUT/label_speed.{json,md} (default OUT: bench/results).
Usage: python bench/label_speed.py [--batch-size 256] [--threads 2]
"""

from __future__ import annotations

from _common import median_seconds, parser, setup, write_results
from gradinv.attacks.labels import LABEL_METHODS, recover_labels
from gradinv.data import sample_batch
from gradinv.errors import GradinvError
from gradinv.experiments.case import Case, ModelCache, Seeds, build_client
from gradinv.experiments.runner import AUXILIARY_SIZE

CASES = (("mlp", "digits"), ("convnet", "digits"), ("resnet18", "digits"), ("resnet18", "synthetic:1000"))


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--batch-size", type=int, default=256)
    args = p.parse_args()
    run = setup(args)  # threads pinned before anything is built or timed
    b, repeats = (8, 1) if args.quick else (args.batch_size, 3)
    cache = ModelCache()
    results: dict[str, dict[str, float | str]] = {}
    for model, data in CASES[:2] if args.quick else CASES:
        client = build_client(Case(model=model, data=data, batch_size=b, seeds=Seeds.all(0)), cache=cache)
        ds, obs = client.dataset, client.observation
        # the client's batch is the first b of this sample (sample_batch is prefix-stable): the rest is auxiliary
        images, _ = sample_batch(ds, batch_size=b + AUXILIARY_SIZE, seed=0)
        aux = ds.normalization.normalize(images[b:])
        key = f"{model} / {data}"
        results[key] = {}
        for method in sorted(LABEL_METHODS):
            options = {"auxiliary": aux} if method == "llg-plus" else {}
            try:
                recover_labels(obs, method=method, **options)
            except GradinvError:
                results[key][method] = "declines"
                continue
            results[key][method] = median_seconds(
                lambda m=method, o=options, ob=obs: recover_labels(ob, method=m, **o), repeats=repeats
            )
    methods = sorted(LABEL_METHODS)
    lines = [
        f"Seconds to recover the labels of a batch of {b} (median of {repeats}; 'iterative' = solves linear "
        f"programs; {run['threads']} threads)",
        "",
        "| model / data | "
        + " | ".join(f"{m}{' (iterative)' if LABEL_METHODS[m].iterative else ''}" for m in methods)
        + " |",
        "| --- |" + " --- |" * len(methods),
    ]
    for key, row in results.items():
        cells = [v if isinstance(v, str) else f"{v:.3f}" for v in (row[m] for m in methods)]
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    write_results(args.out, "label_speed", run, {"batch_size": b, "seconds": results}, "\n".join(lines))


if __name__ == "__main__":
    main()
