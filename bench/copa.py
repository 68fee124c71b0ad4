"""COPA against R-GAP where the rank analysis says a layer is deficient (CNN6 variants, random weights, batch 1,
32x32 bundled photos; photo i against model seed i).

Each row: the rank analysis' verdict (before any attack), then the median PSNR of R-GAP, COPA as in the paper,
and COPA with a smooth start (``smooth=0.1``: a first stage with a pixel-difference prior, then the paper's
objective from there), COPA's seconds and the cost (sum of squared relative residuals) its joint least squares
ended at. The runs are the grids bench/grids/copa.yaml and copa-smooth.yaml (into OUT/copa/); the table goes to
OUT/copa.md and the per-photo values to OUT/copa.json (default OUT: bench/results).
Usage: python bench/copa.py [--resume] [--threads 2] [--quick]
"""

from __future__ import annotations

import statistics

from _common import parser, run_grids, setup, write_results
from gradinv.analysis import rank_analysis
from gradinv.data import load_dataset
from gradinv.models import build_model

NAME = "copa"
CASES = (  # label, CNN6 options as the records hold them
    ("CNN6, sigmoid, 4-channel third conv", {"activation": "sigmoid", "channels": [12, 36, 4, 36, 64, 128]}),
    ("CNN6, LeakyReLU, 4-channel third conv", {"channels": [12, 36, 4, 36, 64, 128]}),
    ("CNN6, LeakyReLU, 4-channel second conv", {"channels": [12, 4, 36, 36, 64, 128]}),
    ("CNN6, LeakyReLU, 4-channel first conv", {"channels": [4, 36, 36, 36, 64, 128]}),
    ("CNN6 (full rank)", {}),
)
SMOOTH = 0.1


def main() -> None:
    args = parser(__doc__, grid=True).parse_args()
    run = setup(args)
    records = run_grids(args, [NAME, f"{NAME}-smooth"], store=NAME)
    names = load_dataset("photos", image_size=8, channels=3).class_names

    def variant(r: dict) -> str:
        if r["attack"] == "rgap":
            return "rgap"
        return "smooth" if (r["attack_settings"] or {}).get("smooth", 0) > 0 else "copa"

    lines = [
        "## COPA vs R-GAP, CNN6 variants (random weights), batch 1, 32x32 photos",
        "",
        f"| architecture | rank analysis | R-GAP | COPA | COPA, smooth start {SMOOTH} | COPA s | COPA joint cost |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    rows = []
    for label, options in CASES:
        built = {k: tuple(v) if isinstance(v, list) else v for k, v in options.items()}
        report = rank_analysis(build_model("cnn6", num_classes=10, **built), (3, 32, 32))
        mine = [r for r in records if r["model"] == "cnn6" and r["model_options"] == options]
        record: dict = {"architecture": label, "options": options, "prediction": report.reason, "photos": []}
        for seed in sorted({r["seeds"]["model"] for r in mine}):
            runs = {variant(r): r for r in mine if r["seeds"]["model"] == seed}
            if any(r["status"] != "ok" for r in runs.values()) or len(runs) < 3:
                print(f"{label}, model seed {seed}: not every run finished ok, left out", flush=True)
                continue
            copa = runs["copa"]
            joint = copa["details"].get("joint_layers") or []
            record["photos"].append(
                {
                    "photo": names[copa["labels_true"][0]],
                    "rgap_psnr": runs["rgap"]["psnr"],
                    "copa_psnr": copa["psnr"],
                    "smooth_psnr": runs["smooth"]["psnr"],
                    "copa_seconds": copa["seconds"],
                    "copa_cost": copa["details"].get("joint_cost"),
                    "deficient_layer": joint[-1] if joint else None,
                    "steps": copa["details"].get("steps"),
                }
            )
        photos = record["photos"]
        if photos:
            keys = ("rgap_psnr", "copa_psnr", "smooth_psnr", "copa_seconds")
            med = {key: statistics.median(p[key] for p in photos) for key in keys}
            costs = [p["copa_cost"] for p in photos if p["copa_cost"] is not None]
            cost = f"{statistics.median(costs):.1e}" if costs else "- (no deficient layer)"
            lines.append(
                f"| {label} | {report.reason} | {med['rgap_psnr']:.1f} dB | {med['copa_psnr']:.1f} dB | "
                f"{med['smooth_psnr']:.1f} dB | {med['copa_seconds']:.0f} | {cost} |"
            )
        rows.append(record)
    grids = [f"bench/grids/{NAME}.yaml", f"bench/grids/{NAME}-smooth.yaml"]
    write_results(args.out, NAME, run, {"grids": grids, "cases": rows}, "\n".join(lines))


if __name__ == "__main__":
    main()
