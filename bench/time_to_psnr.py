"""Time for Inverting Gradients to reach the PSNR the peer toolkit reached, as a ratio of the peer's measured time.

Inverting Gradients (Geiping, Bauermeister, Dröge, Moeller, NeurIPS 2020), honest-but-curious server that knows
the label (as breaching's case gives it to its attacker). No peer number is quoted here: they are read from
OUT/peer_compare.json, written by bench/peer_compare.py (run it first, in the peer venv). For each of its
Inverting Gradients rows of ``--model`` (default convnet, width 64) this rebuilds the identical case (the model of
the row's seed in eval mode, the exact pixels from OUT/peer_compare.images.safetensors, checked by digest, the
row's label and normalisation), takes the PSNR breaching reached after its budget and its time to it (its whole
run: the peer harness has no per-iteration callback, so an upper bound), and runs gradinv's ``invgrad`` with its
own defaults and the same budget (the step decay at 3/8, 5/8, 7/8 depends on it), checking PSNR against the
truth (never shown to the attack) every ``--check-every`` iterations and stopping at the first check at or above
the peer's PSNR. The checks time themselves and their time is subtracted. Median over ``--repeats`` attack seeds
(the row's seed, then the next ones); "not reached" within the budget counts as infinite time.
Writes OUT/time_to_psnr.{md,json} (default OUT: bench/results; runs/bench-quick with --quick).
Usage: python bench/time_to_psnr.py [--model convnet] [--photos chelsea] [--repeats 3] [--threads 2] [--peer FILE]
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

import torch

from _common import parser, setup, write_results
from gradinv.fl import Scenario
from gradinv.models import build_model
from gradinv.types import Normalization, ThreatModel
from peer_compare import IMAGES_FILE, clean, fail, first_reach, image_digest, traced_reconstruct

PEER_COMMAND = "/work/.peerenv/bin/python bench/peer_compare.py --threads 2"


def peer_rows(path: Path, *, model: str, photos: list[str] | None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The peer's Inverting Gradients rows for ``model`` (and ``photos``) and the run's machine record."""
    if not path.is_file():
        fail(f"no measured peer numbers at {path}: run `{PEER_COMMAND}` first (or pass --peer FILE)")
    data = json.loads(path.read_text())
    rows = [r for r in data.get("invgrad", []) if r["model"] == model]
    if photos is not None:
        rows = [r for r in rows if r["photo"] in photos]
    if not rows:
        have = sorted({(r["model"], r["photo"]) for r in data.get("invgrad", [])})
        fail(f"{path} has no Inverting Gradients row for model {model!r} and photos {photos}; it has {have}")
    return rows, data.get("machine", {})


def number(value: Any) -> float:
    return float("nan") if value is None else float(value)


def time_to_peer(row: dict[str, Any], image01: torch.Tensor, *, seed: int, check_every: int) -> dict[str, Any]:
    """gradinv's seconds and iterations to the row's peer PSNR, with the attack seed ``seed``."""
    norm = Normalization(tuple(row["mean"]), tuple(row["std"]))
    model = build_model(row["model"], num_classes=10, seed=int(row["model_seed"])).eval()
    labels = torch.tensor([int(row["label"])])
    scenario = Scenario.from_images(model, image01, labels, normalization=norm, threat=ThreatModel(known_labels=True))
    target = number(row["peer"]["psnr"])
    out = traced_reconstruct(
        "invgrad",
        scenario.observe(),
        scenario.ground_truth().images,
        seed=seed,
        check_every=check_every,
        stop_at=target if math.isfinite(target) else None,
        iterations=int(row["iterations"]),
    )
    hit = first_reach(out["trace"], target)
    best = max((p for _, _, p in out["trace"]), default=float("nan"))
    return {
        "seed": seed,
        "seconds": math.inf if hit is None else hit[1],
        "iterations": None if hit is None else hit[0],
        "best_psnr_checked": best,
        "callback_seconds_subtracted": out["callback_seconds"],
    }


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--peer", type=Path, help="peer_compare.json to read (default OUT/peer_compare.json)")
    p.add_argument("--model", default="convnet", help="the peer rows' model (default convnet)")
    p.add_argument("--photos", help="comma list (default: every photo of the peer rows)")
    p.add_argument("--check-every", type=int, default=5, help="PSNR check interval in iterations (default 5)")
    p.add_argument("--repeats", type=int, default=3, help="attack seeds, from the peer row's seed (default 3)")
    args = p.parse_args()
    if args.check_every < 1 or args.repeats < 1:
        fail(f"--check-every and --repeats must be at least 1, got {args.check_every} and {args.repeats}")
    run = setup(args)  # threads pinned before anything is built or timed
    if args.quick:
        args.check_every, args.repeats = 1, 1
    peer_path = args.peer or args.out / "peer_compare.json"
    photos = None if args.photos is None else [ph for ph in args.photos.split(",") if ph]
    rows, peer_machine = peer_rows(peer_path, model=args.model, photos=photos)
    images_path = peer_path.parent / IMAGES_FILE
    if not images_path.is_file():
        fail(f"the case pixels {images_path} are missing: run `{PEER_COMMAND}` again (it writes them)")
    from safetensors.torch import load_file

    images = load_file(str(images_path))
    if peer_machine.get("threads") != run["threads"]:
        print(
            f"note: the peer was measured with {peer_machine.get('threads')} threads, this run has {run['threads']}",
            flush=True,
        )

    results = []
    for row in rows:
        image01 = images.get(row["photo"])
        if image01 is None or image_digest(image01) != row["image_sha256_16"]:
            fail(f"{images_path} does not hold the pixels of {row['photo']} that {peer_path} was measured on: rerun it")
        seeds = [int(row["attack_seed"]) + i for i in range(args.repeats)]
        runs = [time_to_peer(row, image01, seed=s, check_every=args.check_every) for s in seeds]
        seconds = statistics.median(r["seconds"] for r in runs)
        iterations = statistics.median(math.inf if r["iterations"] is None else r["iterations"] for r in runs)
        peer_seconds = number(row["peer"]["seconds_to_final_psnr"])
        results.append(
            {
                "model": row["model"],
                "photo": row["photo"],
                "budget": row["iterations"],
                "peer_psnr": number(row["peer"]["psnr"]),
                "peer_seconds": peer_seconds,
                "peer_seconds_per_iteration": number(row["peer"]["seconds_per_iteration"]),
                "seconds": seconds,
                "iterations": iterations if math.isfinite(iterations) else None,
                "ratio": seconds / peer_seconds,
                "runs": runs,
            }
        )

    lines = [
        f"Inverting Gradients, {args.model}, 32x32, batch 1, label given: gradinv's time to the PSNR breaching reached "
        f"after its budget, on the identical case (median over {args.repeats} attack seed(s), PSNR checked every "
        f"{args.check_every} iterations, the checks' time subtracted; {run['threads']} threads here, peer measured "
        f"with {peer_machine.get('threads')}). Peer numbers from {peer_path.name}; the peer's time is its whole "
        "run (an upper bound of its time to that PSNR).",
        "",
        "| photo | budget | peer PSNR | peer seconds | gradinv iterations | gradinv seconds | gradinv / peer |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        its = "not reached" if r["iterations"] is None else f"{r['iterations']:.0f}"
        lines.append(
            f"| {r['photo']} | {r['budget']} | {r['peer_psnr']:.2f} | {r['peer_seconds']:.1f} | {its} | "
            f"{r['seconds']:.1f} | {r['ratio']:.2f} |"
        )
    payload = {
        "peer_file": str(peer_path),
        "peer_machine": peer_machine,
        "model": args.model,
        "check_every": args.check_every,
        "repeats": args.repeats,
        "rows": results,
    }
    write_results(args.out, "time_to_psnr", run, clean(payload), "\n".join(lines))


if __name__ == "__main__":
    main()
