"""Shared helpers of the benchmarks: the thread count, the grids in bench/grids/, result writing and the
peer-comparison photo case.

Every benchmark pins torch's thread count (``--threads``, default 2: the machine the published numbers were
measured on) before anything is timed, and records it beside its results. A grid benchmark runs its grid files
into a results store under ``--out`` (``--resume`` continues an interrupted run) and reads its tables from the
records; ``--quick`` trims the grid (one client batch, 2 iterations, small batches) and writes under
runs/bench-quick/, to check a benchmark works without touching bench/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import yaml

from gradinv.errors import GradinvError
from gradinv.experiments.grid import Grid, make_grid, run_grid

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"
GRIDS = BENCH / "grids"
QUICK = BENCH.parent / "runs" / "bench-quick"
QUICK_ITERATIONS = 2
QUICK_TRAINED_STEPS = 5
QUICK_BATCH = 4  # --quick keeps the batch sizes up to this (at least the smallest)


# -- threads ------------------------------------------------------------------------------------------------------


def set_threads(threads: int) -> dict[str, Any]:
    """Pin torch's intra-op threads (call before anything is built or timed); what to record beside results."""
    torch.set_num_threads(threads)
    return {"threads": torch.get_num_threads(), "cpus": os.cpu_count()}


def parser(doc: str | None, *, grid: bool = False) -> argparse.ArgumentParser:
    """A benchmark's argument parser with ``--threads`` and ``--out`` (and for a grid benchmark ``--resume``,
    ``--quick``, ``--executor``, ``--workers``)."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2), recorded with the results")
    p.add_argument(
        "--out", type=Path, help="results folder (default bench/results/, or runs/bench-quick/ with --quick)"
    )
    p.add_argument("--quick", action="store_true", help="a tiny run to check the benchmark works")
    if grid:
        p.add_argument("--resume", action="store_true", help="continue the run in --out, skipping finished cells")
        p.add_argument("--executor", choices=("local", "process", "ray"), default="local", help="default local")
        p.add_argument("--workers", type=int, default=1, help="parallel workers (process, ray; default 1)")
    return p


def setup(args: argparse.Namespace) -> dict[str, Any]:
    """Pin the threads, choose ``args.out`` and return the run's record of threads and machine."""
    if args.out is None:
        args.out = QUICK if args.quick else RESULTS
    args.out.mkdir(parents=True, exist_ok=True)
    return {**set_threads(args.threads), **machine()}


def machine() -> dict[str, Any]:
    return {
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "platform": platform.platform(),
        "torch": torch.__version__,
    }


# -- grids --------------------------------------------------------------------------------------------------------


def load(name: str, *, quick: bool = False) -> Grid:
    """``bench/grids/NAME.yaml`` as a grid; ``quick`` trims it (see :func:`trim`)."""
    spec = yaml.safe_load((GRIDS / f"{name}.yaml").read_text())
    if quick:
        spec = trim(spec)
    return make_grid(spec, name=str(spec.get("name", name)))


def trim(spec: dict[str, Any]) -> dict[str, Any]:
    """A tiny version of a grid: the first client batch (of cells: the first model seed), iterative attacks at
    2 iterations, batch sizes up to 4, trained models at 5 steps."""
    from gradinv.attacks import ATTACKS

    spec = dict(spec)
    if isinstance(spec.get("seeds"), list):
        spec["seeds"] = spec["seeds"][:1]
    if "samples" in spec:
        spec["samples"] = 1
    if isinstance(spec.get("batch_sizes"), list):
        spec["batch_sizes"] = [b for b in spec["batch_sizes"] if b <= QUICK_BATCH] or spec["batch_sizes"][:1]

    def steps(value: Any) -> Any:
        return [steps(v) for v in value] if isinstance(value, list) else min(int(value), QUICK_TRAINED_STEPS)

    if "trained_steps" in spec:
        spec["trained_steps"] = steps(spec["trained_steps"])
    attacks = spec.get("attacks", spec.get("attack", []))
    attacks = list(attacks) if isinstance(attacks, list) else [attacks]
    if "cells" in spec:
        rows = [dict(r) for r in spec["cells"]]
        first = min(int(r.get("model_seed", spec.get("model_seed", 0))) for r in rows)
        rows = [r for r in rows if int(r.get("model_seed", spec.get("model_seed", 0))) == first]
        for r in rows:
            if "trained_steps" in r:
                r["trained_steps"] = steps(r["trained_steps"])
        spec["cells"] = rows
        attacks += [r["attack"] for r in rows if "attack" in r]
    options = {k: dict(v) for k, v in (spec.get("attack_options") or {}).items()}
    for attack in dict.fromkeys(attacks):
        if attack in ATTACKS and "iterations" in ATTACKS[attack].Settings.__dataclass_fields__:
            mine = options.setdefault(attack, {})
            mine["iterations"] = min(mine.get("iterations", ATTACKS[attack].Settings().iterations), QUICK_ITERATIONS)
    if options:
        spec["attack_options"] = options
    return spec


def run_grids(args: argparse.Namespace, names: Sequence[str], *, store: str | None = None) -> list[dict[str, Any]]:
    """Run the grids ``names`` (their cells together, in order) into the store ``args.out / store`` (default:
    the first grid's name) with the benchmark's threads; every finished cell's record (report.html and
    results.csv beside them)."""
    grids = [load(n, quick=args.quick) for n in names]
    unique: dict[str, Any] = {}
    for c in (c for g in grids for c in g.cells):
        unique.setdefault(c.key(), c)  # a cell in two grids runs once
    cells = tuple(unique.values())
    spec = grids[0].spec if len(grids) == 1 else {"grids": {g.name: g.spec for g in grids}}
    grid = Grid(cells=cells, spec=spec, name=store or names[0])
    out = args.out / (store or names[0])
    print(f"{len(cells)} cells from bench/grids/{{{','.join(names)}}}.yaml -> {out}", flush=True)
    try:
        records = run_grid(
            grid,
            out,
            executor=args.executor,
            workers=args.workers,
            threads=args.threads,
            resume=args.resume,
            progress=True,
        )
    except GradinvError as exc:  # e.g. a store of another run: the message says what to do
        raise SystemExit(f"error: {exc}") from None
    for r in records:
        if r["status"] == "failed":
            print(f"failed: {r['attack']} on {r['model']} seed {r['seed']}: {r['reason']}", flush=True)
    return records


def median(values: Sequence[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return statistics.median(kept) if kept else None


def fmt(value: float | None, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


# -- timing -------------------------------------------------------------------------------------------------------


def photo_case(
    *,
    model: str = "convnet",
    photo: str = "chelsea",
    image_size: int = 32,
    seed: int = 0,
    trained_steps: int = 0,
    device: str = "cpu",
    **options,
):
    """One bundled photo against a 10-class model of seed ``seed`` (trained ``trained_steps`` SGD steps on the
    bundled digits first, as a grid's case trains it; eval-mode BatchNorm), batch 1, on ``device``."""
    from gradinv.data import load_dataset
    from gradinv.experiments.case import Case, ModelCache, Seeds
    from gradinv.fl import Scenario

    ds = load_dataset("photos", image_size=image_size, channels=3)
    i = ds.class_names.index(photo)
    case = Case(
        model=model,
        model_options=options,
        num_classes=10,
        trained_steps=trained_steps,
        image_size=image_size,
        seeds=Seeds(model=seed),
    )
    net = ModelCache().model(case, num_classes=10).to(device)
    images, labels = ds.images[i : i + 1].to(device), ds.labels[i : i + 1].to(device)
    return ds, Scenario.from_images(net, images, labels, normalization=ds.normalization)


def median_seconds(fn: Callable[[], object], *, repeats: int, device: str = "cpu") -> float:
    """Median wall time of ``repeats`` calls (after one warm-up call), waiting for a GPU to finish each."""

    def sync() -> None:
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()

    fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# -- results ------------------------------------------------------------------------------------------------------


def write_results(out: Path, name: str, run: dict[str, Any], payload: dict, table: str) -> None:
    """``out/NAME.json`` (``run``: threads and machine, then ``payload``) and ``out/NAME.md`` (``table``)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps({"machine": run, **payload}, indent=2, default=str) + "\n")
    (out / f"{name}.md").write_text(table + "\n")
    print(table)
    print(f"-> {out / name}.md, {name}.json")
