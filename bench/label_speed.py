"""Seconds to recover the labels of one batch of 256, per method and model (median of 3 calls on the same
observation; the client's own gradient computation is not counted). Writes bench/results/label_speed.{json,md}.
Usage: python bench/label_speed.py [--batch-size 256]
"""

from __future__ import annotations

import argparse

from _common import median_seconds, write_results
from gradinv.attacks.labels import LABEL_METHODS, recover_labels
from gradinv.data import sample_batch
from gradinv.errors import GradinvError
from gradinv.fl import Scenario
from gradinv.label_bench import AUXILIARY_SIZE, prepare_case

CASES = (("mlp", "digits"), ("convnet", "digits"), ("resnet18", "digits"), ("resnet18", "synthetic:1000"))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch-size", type=int, default=256)
    b = parser.parse_args().batch_size
    results: dict[str, dict[str, float | str]] = {}
    for model, data in CASES:
        case = prepare_case(model=model, data=data)
        ds = case.dataset
        images, labels = sample_batch(ds, batch_size=b + AUXILIARY_SIZE, seed=0)
        aux = ds.normalization.normalize(images[b:])
        obs = Scenario.from_images(case.model, images[:b], labels[:b], normalization=ds.normalization).observe()
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
                lambda m=method, o=options, ob=obs: recover_labels(ob, method=m, **o), repeats=3
            )
    methods = sorted(LABEL_METHODS)
    lines = [
        f"Seconds to recover the labels of a batch of {b} (median of 3; 'iterative' = solves linear programs)",
        "",
        "| model / data | "
        + " | ".join(f"{m}{' (iterative)' if LABEL_METHODS[m].iterative else ''}" for m in methods)
        + " |",
        "| --- |" + " --- |" * len(methods),
    ]
    for key, row in results.items():
        cells = [v if isinstance(v, str) else f"{v:.3f}" for v in (row[m] for m in methods)]
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    write_results("label_speed", {"batch_size": b, "seconds": results}, "\n".join(lines))


if __name__ == "__main__":
    main()
