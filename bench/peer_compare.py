"""gradinv next to the peer toolkit breaching 0.1.2 on the identical case, in one process.

Inverting Gradients (Geiping, Bauermeister, Dröge, Moeller, NeurIPS 2020): breaching's ``invertinggradients``
vs gradinv's ``invgrad`` on gradinv's ``convnet`` (width 64) and ``resnet18`` (eval mode, untrained, seed
``--seed``), one 32x32 photo per row (batch 1, label ``--label``, given to both attackers as in breaching's
case ``1_single_image_small``). Deep Leakage from Gradients (Zhu, Liu, Han, NeurIPS 2019): breaching's
``deepleakage`` vs gradinv's ``dlg`` on gradinv's ``lenet`` (DLG's sigmoid LeNet, U(-0.5, 0.5) init; the same
architecture as breaching's ``lenet_zhu``, but gradinv's module is given to both), labels optimised by both, one
row per seed (the seed draws the model and both attackers' starts).

Identical case: the photo's pixels come from the peer harness (``run_breaching.load_named_image``: centre crop,
skimage resize to 32x32) and both tools get exactly those pixels, the same label, the CIFAR-10 normalisation
(mean 0.4914, 0.4822, 0.4465 / std 0.2023, 0.1994, 0.2010) and the same model (breaching a deep copy). The
peer's ground-truth gradient (from its own HonestServer / UserSingleStep) is checked against gradinv's observed
update, parameter by parameter (``case_gradient_max_abs_diff`` in the JSON). Each tool keeps its own default
settings (that is the comparison; they are listed with the results): e.g. TV weight 0.2 (breaching's
definition) vs 1e-4 for Inverting Gradients, no line search vs strong Wolfe for DLG's L-BFGS. Both run with
``--threads`` torch threads, the peer first, then gradinv; the load average is recorded before and after.

Measured per row: seconds per iteration (peer: its own ``seconds_per_iteration``; gradinv: its attack's
seconds / iterations), PSNR after the same budget (``--iterations``, default 1000; DLG ``--dlg-iterations``
L-BFGS steps, default 300, each up to 20 inner iterations in both tools), and the time to the PSNR the peer
reaches after its budget. The peer harness has no per-iteration callback, so the peer's time to its final PSNR
is its whole run (an upper bound: it may reach that PSNR earlier, which flatters gradinv's ratio; the
seconds-per-iteration ratio has no such bias). gradinv's time to it is read from a PSNR check every
``--check-every`` iterations (the callback sees the current candidate; the truth is never shown to the
attack): the callback times itself and its time is subtracted from every time reported, so the check costs
gradinv nothing; ``--timing-run`` also times a second Inverting Gradients run without any callback (a cross-check).

Setup (once): the peer venv lacks gradinv's ``safetensors`` and ``matplotlib``; this script puts ``src/`` on the
path, so install only those two, never letting pip change torch:
    PIP_CONSTRAINT=constraints.txt /work/.peerenv/bin/pip install matplotlib safetensors
Usage (from the repository root; the published numbers need an otherwise idle machine):
    /work/.peerenv/bin/python bench/peer_compare.py --threads 2
    /work/.peerenv/bin/python bench/peer_compare.py --quick      # a tiny run into runs/bench-quick/
Options: --cases convnet,resnet18,dlg  --photos chelsea,coffee  --iterations 1000  --dlg-iterations 300
--dlg-seeds 5  --dlg-photo chelsea  --label 3  --seed 0  --check-every 5  --timing-run  --peer-harness DIR
--speed-repeats 7  --speed-iterations 100 (seconds per iteration from short interleaved runs, see the table).
Writes OUT/peer_compare.{md,json} and OUT/peer_compare.images.safetensors (the exact pixels, which
bench/time_to_psnr.py attacks again); OUT defaults to bench/results (runs/bench-quick with --quick).
"""

from __future__ import annotations

import copy
import hashlib
import math
import os
import statistics
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any, NoReturn

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT / "src"))  # the peer venv has no gradinv installed: use this checkout's source


def fail(message: str) -> NoReturn:
    """A user's mistake or a missing setup step: one line on stderr, exit status 2."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


try:
    import torch

    from _common import parser, setup, write_results
    from gradinv.attacks import build_attack
    from gradinv.fl import Scenario
    from gradinv.metrics import psnr
    from gradinv.models import build_model
    from gradinv.types import Normalization, Observation, ThreatModel
except ModuleNotFoundError as exc:  # run in the peer venv before its one-time setup
    fail(
        f"{exc}; gradinv needs it in this Python ({sys.executable}): "
        "PIP_CONSTRAINT=constraints.txt /work/.peerenv/bin/pip install matplotlib safetensors"
    )

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2023, 0.1994, 0.2010)
CIFAR = Normalization(CIFAR_MEAN, CIFAR_STD)
IG_CASES = ("convnet", "resnet18")
DLG_MODEL = "lenet"
IMAGES_FILE = "peer_compare.images.safetensors"
QUICK_ITERATIONS, QUICK_DLG_ITERATIONS = 10, 3
PEER_IG_KEYS = ("objective", "optim", "regularization", "restarts", "init")


# -- the peer -----------------------------------------------------------------------------------------------------


def load_peer(harness: Path) -> Any:
    """The peer harness module (``run_breaching``), which needs breaching: run this script with the peer venv."""
    sys.path.insert(0, str(harness))
    try:
        import run_breaching
    except ModuleNotFoundError as exc:
        fail(
            f"cannot import the peer harness from {harness} ({exc}): run this script with the peer venv's "
            "python, e.g. /work/.peerenv/bin/python bench/peer_compare.py, or point --peer-harness at it"
        )
    return run_breaching


def run_peer(rb: Any, model: torch.nn.Module, images01: torch.Tensor, labels: torch.Tensor, **kw: Any):
    """Run one breaching attack on a deep copy of ``model``; its result and its ground-truth gradient by name."""
    with tempfile.TemporaryDirectory() as tmp:
        case = Path(tmp) / "case.pt"
        result, _ = rb.run_attack(
            copy.deepcopy(model),
            images01,
            labels,
            mean=CIFAR_MEAN,
            std=CIFAR_STD,
            save_case=str(case),
            save_torchscript=False,
            do_breaching_report=False,
            **kw,
        )
        blob = torch.load(case, weights_only=True)
    if result.get("status") != "ok":
        raise RuntimeError(f"the peer's run failed: {result.get('error')}")
    return result, dict(zip(blob["param_names"], blob["gradients"], strict=True))


def gradient_gap(peer_gradient: dict[str, torch.Tensor], observation: Observation) -> float:
    """Largest absolute difference between the peer's ground-truth gradient and gradinv's observed update."""
    if set(peer_gradient) != set(observation.update):
        raise RuntimeError(
            f"the two tools see different parameters: {sorted(set(peer_gradient) ^ set(observation.update))}"
        )
    return max(float((peer_gradient[k] - observation.update[k]).abs().max()) for k in peer_gradient)


def number(value: Any) -> float | None:
    """A harness number (floats, or the strings "nan"/"inf" it writes for non-finite values) as a float."""
    return None if value is None else float(value)


# -- gradinv ------------------------------------------------------------------------------------------------------


class _Reached(Exception):
    pass


def traced_reconstruct(
    attack: str,
    observation: Observation,
    truth01: torch.Tensor,
    *,
    seed: int,
    check_every: int,
    stop_at: float | None = None,
    **settings: Any,
) -> dict[str, Any]:
    """Run a gradinv attack with a PSNR check every ``check_every`` iterations and subtract the check's time.

    The callback measures its own time; each trace point's seconds, and the run's total, have the callback time
    spent before them removed. ``stop_at``: stop at the first check at or above that PSNR (the result then has no
    final reconstruction). Returns the trace ``[(iteration, seconds, psnr)]``, the final PSNR and seconds, the
    callback's total time, and the attack's settings and extras.
    """
    norm = observation.knowledge.normalization
    trace: list[tuple[int, float, float]] = []
    overhead = 0.0

    def check(iteration: int, seconds: float, x: torch.Tensor) -> None:
        nonlocal overhead
        start = time.perf_counter()
        value = float(psnr(norm.denormalize(x.detach()).clamp(0, 1), truth01).mean())
        trace.append((int(iteration), seconds - overhead, value))
        overhead += time.perf_counter() - start
        if stop_at is not None and value >= stop_at:
            raise _Reached

    attacker = build_attack(attack, log_every=check_every, **settings)
    try:
        rec = attacker.reconstruct(observation, seed=seed, callback=check)
    except _Reached:
        return {"trace": trace, "psnr": None, "seconds": None, "callback_seconds": overhead, "reached": True}
    return {
        "trace": trace,
        "psnr": float(psnr(rec.images, truth01).mean()),
        "seconds": rec.seconds - overhead,
        "callback_seconds": overhead,
        "settings": {k: v for k, v in rec.settings.items() if k != "log_every"},
        "extras": {k: v for k, v in rec.extras.items() if isinstance(v, int | float | str)},
        "labels": None if rec.labels is None else [int(v) for v in rec.labels],
        "reached": None,
    }


def first_reach(trace: list[tuple[int, float, float]], target: float | None) -> tuple[int, float] | None:
    """(iterations done, seconds) at the first trace point at or above ``target``; None if never (or no target)."""
    if target is None or not math.isfinite(target):
        return None
    for iteration, seconds, value in trace:
        if value >= target:
            return iteration + 1, seconds
    return None


def untraced_seconds(attack: str, observation: Observation, *, seed: int, iterations: int, **settings: Any) -> float:
    """Seconds of a run with no callback (trace logged only at its last iteration)."""
    attacker = build_attack(attack, iterations=iterations, log_every=iterations, **settings)
    return attacker.reconstruct(observation, seed=seed).seconds


# -- the cases ----------------------------------------------------------------------------------------------------


def image_digest(x: torch.Tensor) -> str:
    return hashlib.sha256(x.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


def ig_row(rb: Any, model_name: str, photo: str, images01: torch.Tensor, args: Any) -> dict[str, Any]:
    """Inverting Gradients: the peer's, then gradinv's, on one model and photo."""
    labels = torch.tensor([args.label])
    model = build_model(model_name, num_classes=10, seed=args.seed).eval()
    load_before = os.getloadavg()
    peer, peer_gradient = run_peer(
        rb,
        model,
        images01,
        labels,
        attack="invertinggradients",
        iterations=args.iterations,
        restarts=1,
        attack_seed=args.seed,
        threads=args.threads,
        provide_labels=True,
    )
    scenario = Scenario.from_images(model, images01, labels, normalization=CIFAR, threat=ThreatModel(known_labels=True))
    obs, truth = scenario.observe(), scenario.ground_truth().images
    ours = traced_reconstruct(
        "invgrad", obs, truth, seed=args.seed, check_every=args.check_every, iterations=args.iterations
    )
    timing = untraced_seconds("invgrad", obs, seed=args.seed, iterations=args.iterations) if args.timing_run else None
    speed = interleaved_speed(rb, model, images01, labels, obs, args) if args.speed_repeats else None
    load_after = os.getloadavg()
    target = number(peer["psnr"])
    hit = first_reach(ours["trace"], target)
    config = peer["attack_config"]
    return {
        "kind": "invgrad",
        "model": model_name,
        "model_seed": args.seed,
        "attack_seed": args.seed,
        "photo": photo,
        "image_sha256_16": image_digest(images01),
        "label": args.label,
        "mean": list(CIFAR_MEAN),
        "std": list(CIFAR_STD),
        "iterations": args.iterations,
        "threads": args.threads,
        "case_gradient_max_abs_diff": gradient_gap(peer_gradient, obs),
        "peer": {
            "attack": "breaching invertinggradients",
            "settings": {k: config.get(k) for k in PEER_IG_KEYS},
            "psnr": target,
            "ssim": peer["ssim"],
            "seconds_total": peer["seconds_total"],
            "seconds_per_iteration": peer["seconds_per_iteration"],
            "seconds_to_final_psnr": peer["seconds_total"],
            "seconds_to_final_psnr_note": "whole run: the harness has no per-iteration callback",
            "cpu_seconds_total": peer["cpu_seconds_total"],
            "objective_evaluations": peer["objective_evaluations"],
            "loadavg_1_5_15_before": peer["loadavg_1_5_15_before"],
            "loadavg_1_5_15_after": peer["loadavg_1_5_15_after"],
        },
        "gradinv": {
            "attack": "gradinv invgrad",
            "settings": ours["settings"],
            "psnr": ours["psnr"],
            "seconds_total": ours["seconds"],
            "iterations_run": ours["extras"].get("iterations_run", args.iterations),
            "seconds_per_iteration": ours["seconds"] / ours["extras"].get("iterations_run", args.iterations),
            "seconds_per_iteration_untraced": None if timing is None else timing / args.iterations,
            "callback_seconds_subtracted": ours["callback_seconds"],
            "check_every": args.check_every,
            "iterations_to_peer_psnr": None if hit is None else hit[0],
            "seconds_to_peer_psnr": None if hit is None else hit[1],
            "trace": ours["trace"],
        },
        "speed": speed,
        "loadavg_1_5_15_before": [round(v, 2) for v in load_before],
        "loadavg_1_5_15_after": [round(v, 2) for v in load_after],
    }


def interleaved_speed(
    rb: Any, model: torch.nn.Module, images01: torch.Tensor, labels: torch.Tensor, obs: Observation, args: Any
) -> dict[str, Any]:
    """Seconds per iteration of both tools over ``--speed-repeats`` short runs of ``--speed-iterations`` each,
    alternating which tool goes first, so a change of machine load hits both alike; medians and their ratio."""
    peer, ours = [], []
    for repeat in range(args.speed_repeats):
        order = ("peer", "gradinv") if repeat % 2 == 0 else ("gradinv", "peer")
        for tool in order:
            if tool == "peer":
                result, _ = run_peer(
                    rb,
                    model,
                    images01,
                    labels,
                    attack="invertinggradients",
                    iterations=args.speed_iterations,
                    restarts=1,
                    attack_seed=args.seed + repeat,
                    threads=args.threads,
                    provide_labels=True,
                )
                peer.append(result["seconds_per_iteration"])
            else:
                seconds = untraced_seconds("invgrad", obs, seed=args.seed + repeat, iterations=args.speed_iterations)
                ours.append(seconds / args.speed_iterations)
    median_peer, median_ours = statistics.median(peer), statistics.median(ours)
    return {
        "repeats": args.speed_repeats,
        "iterations": args.speed_iterations,
        "peer_seconds_per_iteration": peer,
        "gradinv_seconds_per_iteration": ours,
        "peer_median": median_peer,
        "gradinv_median": median_ours,
        "ratio": median_ours / median_peer,
    }


def dlg_row(rb: Any, photo: str, images01: torch.Tensor, seed: int, args: Any) -> dict[str, Any]:
    """DLG: breaching's deepleakage, then gradinv's dlg, on gradinv's LeNet of seed ``seed``."""
    labels = torch.tensor([args.label])
    model = build_model(DLG_MODEL, num_classes=10, seed=seed).eval()
    load_before = os.getloadavg()
    peer, peer_gradient = run_peer(
        rb,
        model,
        images01,
        labels,
        attack="deepleakage",
        iterations=args.dlg_iterations,
        restarts=1,
        attack_seed=seed,
        threads=args.threads,
        provide_labels=False,
    )
    scenario = Scenario.from_images(
        model, images01, labels, normalization=CIFAR, threat=ThreatModel(known_labels=False)
    )
    obs, truth = scenario.observe(), scenario.ground_truth().images
    ours = traced_reconstruct("dlg", obs, truth, seed=seed, check_every=1, iterations=args.dlg_iterations)
    load_after = os.getloadavg()
    target = number(peer["psnr"])
    hit = first_reach(ours["trace"], target)
    steps = ours["trace"][-1][0] + 1 if ours["trace"] else None  # L-BFGS steps run (a run may stop early)
    evaluations = ours["extras"].get("evaluations")
    config = peer["attack_config"]
    peer_steps = max((t["iterations_run"] for t in (peer.get("trials") or {}).values()), default=None)
    return {
        "kind": "dlg",
        "model": DLG_MODEL,
        "model_seed": seed,
        "attack_seed": seed,
        "photo": photo,
        "image_sha256_16": image_digest(images01),
        "label": args.label,
        "mean": list(CIFAR_MEAN),
        "std": list(CIFAR_STD),
        "iterations": args.dlg_iterations,
        "threads": args.threads,
        "case_gradient_max_abs_diff": gradient_gap(peer_gradient, obs),
        "peer": {
            "attack": "breaching deepleakage",
            "settings": {k: config.get(k) for k in ("objective", "optim", "init", "label_strategy")},
            "psnr": target,
            "labels": peer["labels_recovered"],
            "seconds_total": peer["seconds_total"],
            "seconds_per_iteration": peer["seconds_per_iteration"],
            "lbfgs_steps_run": peer_steps,
            "seconds_to_final_psnr": peer["seconds_total"],
            "seconds_to_final_psnr_note": "whole run: the harness has no per-iteration callback",
            "objective_evaluations": peer["objective_evaluations"],
            "seconds_per_objective_evaluation": peer["seconds_per_objective_evaluation"],
            "loadavg_1_5_15_before": peer["loadavg_1_5_15_before"],
            "loadavg_1_5_15_after": peer["loadavg_1_5_15_after"],
        },
        "gradinv": {
            "attack": "gradinv dlg",
            "settings": ours["settings"],
            "psnr": ours["psnr"],
            "labels": ours["labels"],
            "seconds_total": ours["seconds"],
            "seconds_per_iteration": ours["seconds"] / args.dlg_iterations,
            "lbfgs_steps_run": steps,
            "objective_evaluations": evaluations,
            "seconds_per_objective_evaluation": ours["seconds"] / evaluations if evaluations else None,
            "callback_seconds_subtracted": ours["callback_seconds"],
            "check_every": 1,
            "iterations_to_peer_psnr": None if hit is None else hit[0],
            "seconds_to_peer_psnr": None if hit is None else hit[1],
            "trace": ours["trace"],
        },
        "loadavg_1_5_15_before": [round(v, 2) for v in load_before],
        "loadavg_1_5_15_after": [round(v, 2) for v in load_after],
    }


# -- the tables ---------------------------------------------------------------------------------------------------


def f(value: float | None, spec: str, missing: str = "-") -> str:
    if value is None:
        return missing
    return str(value) if not math.isfinite(value) else format(value, spec)


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or not b or not math.isfinite(b) else a / b


def settings_text(settings: dict[str, Any], keys: tuple[str, ...] | None = None) -> str:
    return ", ".join(f"{k}={v}" for k, v in settings.items() if keys is None or k in keys)


def reached(g: dict[str, Any]) -> tuple[float | None, str]:
    """gradinv's seconds to the peer's final PSNR and how the tables write it (with the iteration or step)."""
    reach = g["seconds_to_peer_psnr"]
    return reach, f"{f(reach, '.1f')} ({g['iterations_to_peer_psnr']})" if reach is not None else "not reached"


def ig_table(rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| model | photo | it. | s/it peer | s/it gradinv | gradinv / peer | PSNR peer | PSNR gradinv | "
        "s to peer PSNR: peer | gradinv (it.) | gradinv / peer | grad. diff | load before / after |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        p, g = r["peer"], r["gradinv"]
        reach, reach_text = reached(g)
        speed = ratio(g["seconds_per_iteration"], p["seconds_per_iteration"])
        lines.append(
            f"| {r['model']} | {r['photo']} | {r['iterations']} | {f(p['seconds_per_iteration'], '.4f')} | "
            f"{f(g['seconds_per_iteration'], '.4f')} | {f(speed, '.2f')} | "
            f"{f(p['psnr'], '.2f')} | {f(g['psnr'], '.2f')} | {f(p['seconds_to_final_psnr'], '.1f')} | "
            f"{reach_text} | {f(ratio(reach, p['seconds_to_final_psnr']), '.2f')} | "
            f"{r['case_gradient_max_abs_diff']:.1e} | {r['loadavg_1_5_15_before'][0]:.2f} / "
            f"{r['loadavg_1_5_15_after'][0]:.2f} |"
        )
    return lines


def speed_table(rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| model | photo | runs x it. | s/it peer (median) | s/it gradinv (median) | gradinv / peer | peer runs | "
        "gradinv runs |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        sp = r["speed"]
        runs = lambda xs: ", ".join(f"{x:.4f}" for x in xs)  # noqa: E731
        lines.append(
            f"| {r['model']} | {r['photo']} | {sp['repeats']} x {sp['iterations']} | {sp['peer_median']:.4f} | "
            f"{sp['gradinv_median']:.4f} | {sp['ratio']:.3f} | {runs(sp['peer_seconds_per_iteration'])} | "
            f"{runs(sp['gradinv_seconds_per_iteration'])} |"
        )
    return lines


def dlg_table(rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| seed | PSNR peer | s peer | s/eval peer | labels peer | gradinv s to peer PSNR (step) | PSNR gradinv | "
        "s gradinv | s/eval gradinv | labels gradinv | grad. diff | load before / after |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        p, g = r["peer"], r["gradinv"]
        reach, reach_text = reached(g)
        lines.append(
            f"| {r['model_seed']} | {f(p['psnr'], '.2f')} | {f(p['seconds_total'], '.1f')} | "
            f"{f(p['seconds_per_objective_evaluation'], '.4f')} | {p['labels']} | {reach_text} | "
            f"{f(g['psnr'], '.2f')} | {f(g['seconds_total'], '.1f')} | "
            f"{f(g['seconds_per_objective_evaluation'], '.4f')} | {g['labels']} | "
            f"{r['case_gradient_max_abs_diff']:.1e} | {r['loadavg_1_5_15_before'][0]:.2f} / "
            f"{r['loadavg_1_5_15_after'][0]:.2f} |"
        )
    if len(rows) > 1:

        def med(side: str, key: str) -> float | None:
            return _median([r[side][key] for r in rows])

        lines.append(
            f"| median | {f(med('peer', 'psnr'), '.2f')} | {f(med('peer', 'seconds_total'), '.1f')} | "
            f"{f(med('peer', 'seconds_per_objective_evaluation'), '.4f')} | | "
            f"{f(med('gradinv', 'seconds_to_peer_psnr'), '.1f')} | {f(med('gradinv', 'psnr'), '.2f')} | "
            f"{f(med('gradinv', 'seconds_total'), '.1f')} | "
            f"{f(med('gradinv', 'seconds_per_objective_evaluation'), '.4f')} | | | | |"
        )
    return lines


def clean(value: Any) -> Any:
    """``value`` with non-finite floats written as the strings "nan", "inf", "-inf" (as the peer harness does)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [clean(v) for v in value]
    return value


def _median(values: list[float | None]) -> float | None:
    kept = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.median(kept) if kept else None


def report(run: dict[str, Any], ig: list[dict[str, Any]], dlg: list[dict[str, Any]], args: Any) -> str:
    lines = [
        f"gradinv vs breaching {run.get('breaching', '0.1.2')} on the identical case (same model object, pixels, "
        f"label, CIFAR-10 normalisation), one process, {run['threads']} torch threads, peer first; "
        f"load average (1 min) {run['loadavg_1_5_15_before'][0]:.2f} before, {run['loadavg_1_5_15_after'][0]:.2f} "
        f"after, {run['cpus']} CPUs, torch {run['torch']}.",
        "",
    ]
    if ig:
        g, p = ig[0]["gradinv"]["settings"], ig[0]["peer"]["settings"]
        lines += [
            f"Inverting Gradients, 32x32, batch 1, label {args.label} given to both, untrained models of seed "
            f"{args.seed} (eval mode), attack seed {args.seed}, {args.iterations} iterations each. The peer's time "
            "to its final PSNR is its whole run (no per-iteration callback in the harness: an upper bound); "
            f"gradinv's is its first PSNR check (every {args.check_every} iterations) at or above it, with the "
            "checks' own time subtracted. grad. diff: largest difference between the peer's ground-truth gradient "
            "and gradinv's observed update (0: the identical case).",
            "",
            *ig_table(ig),
            "",
            f"- peer (breaching invertinggradients): objective {p['objective']}; optim {p['optim']}; "
            f"regularization {p['regularization']}; init {p['init']}; restarts {p['restarts']}",
            f"- gradinv (invgrad): {settings_text(g)}",
            "",
        ]
        timed = [r for r in ig if r.get("speed")]
        if timed:
            lines += [
                "Seconds per iteration, interleaved: short runs of each tool one after the other, alternating which "
                "goes first, on the same case and threads (peer: its harness's attack seconds over its iterations; "
                "gradinv: its whole reconstruct call's seconds, set-up and final scoring included, over its "
                "iterations). The medians' ratio is the speed comparison; the long runs above time each tool once.",
                "",
                *speed_table(timed),
                "",
            ]
    if dlg:
        g, p = dlg[0]["gradinv"]["settings"], dlg[0]["peer"]["settings"]
        lines += [
            f"DLG on gradinv's LeNet (sigmoid, U(-0.5, 0.5) init), photo {dlg[0]['photo']}, label {args.label} "
            f"(optimised by both), {args.dlg_iterations} L-BFGS steps each (up to 20 inner iterations per step); "
            "the seed draws the model and both starts. s/eval: seconds per objective evaluation (gradinv: L-BFGS "
            "function evaluations; peer: calls of its objective, counted by the harness).",
            "",
            *dlg_table(dlg),
            "",
            f"- peer (breaching deepleakage): objective {p['objective']}; optim {p['optim']}; init {p['init']}",
            f"- gradinv (dlg): {settings_text(g)}",
            "",
        ]
    return "\n".join(lines)


# -- main ---------------------------------------------------------------------------------------------------------


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--cases", default="convnet,resnet18,dlg", help="of convnet, resnet18, dlg (default all)")
    p.add_argument("--photos", default="chelsea,coffee", help="photos of the Inverting Gradients rows")
    p.add_argument("--dlg-photo", default="chelsea", help="photo of the DLG rows (default chelsea)")
    p.add_argument("--label", type=int, default=3, help="the client's label (default 3, CIFAR-10 'cat')")
    p.add_argument("--seed", type=int, default=0, help="model and attack seed of the Inverting Gradients rows")
    p.add_argument(
        "--iterations", type=int, help=f"Inverting Gradients budget (default 1000; --quick {QUICK_ITERATIONS})"
    )
    p.add_argument("--dlg-iterations", type=int, help=f"DLG L-BFGS steps (default 300; --quick {QUICK_DLG_ITERATIONS})")
    p.add_argument("--dlg-seeds", type=int, help="DLG seeds 0..N-1 (default 5; --quick 1)")
    p.add_argument("--check-every", type=int, help="gradinv's PSNR check, in iterations (default 5; --quick 1)")
    p.add_argument("--timing-run", action="store_true", help="also time gradinv's Inverting Gradients untraced")
    p.add_argument("--speed-repeats", type=int, help="interleaved short runs per tool (default 7; --quick 1; 0: none)")
    p.add_argument("--speed-iterations", type=int, help="iterations of each short run (default 100; --quick 5)")
    p.add_argument("--peer-harness", type=Path, default=ROOT.parent / "shared" / "peer", help="run_breaching.py's dir")
    args = p.parse_args()
    defaults = (
        {
            "iterations": QUICK_ITERATIONS,
            "dlg_iterations": QUICK_DLG_ITERATIONS,
            "dlg_seeds": 1,
            "check_every": 1,
            "speed_repeats": 1,
            "speed_iterations": 5,
        }
        if args.quick
        else {
            "iterations": 1000,
            "dlg_iterations": 300,
            "dlg_seeds": 5,
            "check_every": 5,
            "speed_repeats": 7,
            "speed_iterations": 100,
        }
    )
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    cases = [c for c in args.cases.split(",") if c]
    unknown = sorted(set(cases) - {*IG_CASES, "dlg"})
    if unknown:
        fail(f"unknown case(s) {unknown}: choose from {', '.join((*IG_CASES, 'dlg'))}")
    for key in ("iterations", "dlg_iterations", "dlg_seeds", "check_every", "threads", "speed_iterations"):
        if getattr(args, key) < 1:
            fail(f"--{key.replace('_', '-')} must be at least 1, got {getattr(args, key)}")
    rb = load_peer(args.peer_harness)
    run = setup(args)  # threads pinned before anything is built or timed
    run["loadavg_1_5_15_before"] = [round(v, 2) for v in os.getloadavg()]
    run["breaching"] = version("breaching")
    run["peer_harness"] = str(args.peer_harness)

    photos = [ph for ph in args.photos.split(",") if ph] if any(c in IG_CASES for c in cases) else []
    names = list(dict.fromkeys([*photos, *([args.dlg_photo] if "dlg" in cases else [])]))
    try:
        images = {name: rb.load_named_image(name, 32).unsqueeze(0) for name in names}
    except ValueError as exc:
        fail(str(exc))

    ig_rows, dlg_rows = [], []
    for model_name in (c for c in cases if c in IG_CASES):
        for photo in photos:
            print(f"invgrad: {model_name} / {photo}, {args.iterations} iterations ...", flush=True)
            ig_rows.append(ig_row(rb, model_name, photo, images[photo], args))
    if "dlg" in cases:
        for seed in range(args.dlg_seeds):
            print(f"dlg: {DLG_MODEL} / {args.dlg_photo}, seed {seed}, {args.dlg_iterations} steps ...", flush=True)
            dlg_rows.append(dlg_row(rb, args.dlg_photo, images[args.dlg_photo], seed, args))
    run["loadavg_1_5_15_after"] = [round(v, 2) for v in os.getloadavg()]

    from safetensors.torch import save_file

    args.out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in images.items()}, str(args.out / IMAGES_FILE))
    payload = {
        "settings": {
            "cases": cases,
            "photos": photos,
            "dlg_photo": args.dlg_photo if "dlg" in cases else None,
            "label": args.label,
            "seed": args.seed,
            "iterations": args.iterations,
            "dlg_iterations": args.dlg_iterations,
            "dlg_seeds": args.dlg_seeds,
            "check_every": args.check_every,
            "timing_run": args.timing_run,
            "quick": args.quick,
            "images_file": IMAGES_FILE,
        },
        "invgrad": ig_rows,
        "dlg": dlg_rows,
    }
    write_results(args.out, "peer_compare", clean(run), clean(payload), report(run, ig_rows, dlg_rows, args))


if __name__ == "__main__":
    main()
