"""Which defenses stop which attack (survey Table 2 against Table 1), on identical client batches.

Cases (32x32 bundled photos, eval-mode BatchNorm, labels recovered from the update):
- analytic: Phong et al.'s closed form on an MLP with bias, batch 1 (5 client batches), plus each defense's
  price: held-out digits accuracy of the MLP after 200 defended FedSGD rounds of batch 32;
- invgrad: Inverting Gradients (500 iterations, adaptive to pruning) on an untrained width-16 ConvNet,
  batch 1 (2 batches);
- invgrad-static: the same attack not told about the pruning defenses (it matches the zeros too);
- invgrad-batch4: the same attack on batches of 4, where the data defenses (MixUp, InstaHide) can act.
Each writes defenses.{md,json,png} under bench/results/defenses/CASE/ (resumable: rerun to continue).
Usage: python bench/defenses.py [--cases analytic,invgrad,invgrad-static,invgrad-batch4] [--iterations 500]
"""

from __future__ import annotations

import argparse

from _common import RESULTS
from gradinv.defense_bench import bench_defenses, markdown_table

UPDATE = [
    "noise:1e-4",
    "noise:1e-3",
    "noise:1e-2",
    "noise:1e-1",
    "prune:0.5",
    "prune:0.9",
    "prune:0.99",
    "sign",
    "dpsgd:noise_multiplier=0.1,clip=1",
    "dpsgd:noise_multiplier=1,clip=1",
    "soteria:0.6",
    "pixelate:4",
    "dropout:0.5",
]
DATA = ["mixup:2", "instahide:4", "pixelate:4", "noise:1e-2", "soteria:0.6"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cases", default="analytic,invgrad,invgrad-static,invgrad-batch4")
    parser.add_argument("--iterations", type=int, default=500)
    args = parser.parse_args()
    invgrad = {"iterations": args.iterations}
    convnet = dict(attack="invgrad", model="convnet", model_options={"width": 16}, samples=2)
    cases = {
        "analytic": dict(attack="analytic", model="mlp", defenses=UPDATE, samples=5, utility_steps=200),
        "invgrad": dict(**convnet, defenses=UPDATE, attack_settings=invgrad),
        "invgrad-static": dict(
            **convnet,
            defenses=["prune:0.5", "prune:0.9", "soteria:0.6"],
            attack_settings={**invgrad, "adaptive": False},
        ),
        "invgrad-batch4": dict(**convnet, defenses=DATA, batch_size=4, attack_settings=invgrad),
    }
    for name in args.cases.split(","):
        result = bench_defenses(data="photos", out=RESULTS / "defenses" / name, progress=True, **cases[name])
        print(markdown_table(result["config"], result["summary"]))


if __name__ == "__main__":
    main()
