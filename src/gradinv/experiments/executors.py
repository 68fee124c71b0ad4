"""Running a grid's cells: in this process, in worker processes, or as Ray tasks, into one results store.

Whatever runs a cell, the parent writes its record to the store the moment it finishes (a killed run keeps
every finished cell), and the same cells and seeds give the same metrics. Each worker pins its torch threads
(``threads``), and the record says how many it used. Models are built (and trained) once per distinct
:meth:`~gradinv.experiments.case.Case.model_key` in the parent and sent to the workers with their cells.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gradinv.errors import ConfigError
from gradinv.experiments.case import ModelCache, num_classes
from gradinv.experiments.runner import Cell, CellResult, run_cell
from gradinv.experiments.store import Store

EXECUTORS = ("local", "process", "ray")


def default_threads(executor: str, workers: int) -> int:
    """Threads per cell: all cores in this process, else the cores shared among the workers."""
    cores = os.cpu_count() or 1
    return cores if executor == "local" else max(1, cores // max(1, workers))


def save_picture(result: CellResult, path: Path) -> bool:
    """The cell's truth-over-reconstruction picture (written atomically); False when there is none."""
    from gradinv.viz import save_reconstruction_grid

    rec = result.reconstruction
    if rec is None or result.truth_tokens is not None:  # a text run has no picture
        return False
    truth, images = result.truth_images, result.scored_images if result.scored_images is not None else rec.images
    r = result.record
    title = f"{r.attack} on {r.case.model}"
    if r.psnr is not None:
        title += f" - mean PSNR {r.psnr:.1f} dB"
    save_reconstruction_grid(path, truth=truth, reconstruction=images, psnr=r.psnr_per_sample, title=title)
    return True


def save_arrays(result: CellResult, path: Path) -> None:
    """The truth and the scored reconstruction as 8-bit arrays (``.npz``), for pictures made after the run."""
    import numpy as np

    from gradinv._atomic import atomic_path

    def u8(x: torch.Tensor) -> np.ndarray:
        return (x.detach().cpu().clamp(0, 1) * 255).round().to(torch.uint8).numpy()

    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez_compressed(fh, truth=u8(result.truth_images), reconstruction=u8(result.scored_images))


def _run_one(
    cell: Cell, cache: ModelCache, threads: int, image_path: Path | None, compare_clean: bool = False
) -> dict[str, Any]:
    torch.set_num_threads(threads)
    result = run_cell(cell, cache=cache, compare_clean=compare_clean)
    if image_path is not None and result.record.status == "ok" and save_picture(result, image_path):
        result.record.image = f"images/{image_path.name}"
        if result.truth_images is not None:
            save_arrays(result, image_path.with_suffix(".npz"))
    result.record.threads = threads
    return result.record.to_dict()


# -- worker side (process and ray): models arrive as state dicts with their cells --------------------------------

_WORKER_CACHE: ModelCache | None = None


def _worker_run(
    cell: Cell, state: dict[str, torch.Tensor] | None, threads: int, image_path: str | None, compare_clean: bool
) -> dict:
    global _WORKER_CACHE
    if _WORKER_CACHE is None:
        _WORKER_CACHE = ModelCache()
    cache = _WORKER_CACHE
    if state is not None and cell.case not in cache:  # the parent trained it: rebuild the architecture, load
        bare = cell.case.replace(trained_steps=0, weights=None)
        model = cache.model(bare, num_classes=num_classes(cell.case, cache))
        model.load_state_dict(state)
        cache.put(cell.case, model)
    return _run_one(cell, cache, threads, Path(image_path) if image_path else None, compare_clean)


@dataclass
class Progress:
    """Cells done, failed and remaining, with an estimate of the time left, on a tqdm bar."""

    total: int
    skipped: int
    enabled: bool = True

    def __post_init__(self) -> None:
        self.done = self.failed = self.declined = 0
        self.bar = None
        if self.enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.total, initial=self.skipped, desc="cells", unit="cell")

    def update(self, record: dict[str, Any]) -> None:
        self.done += 1
        self.failed += record["status"] == "failed"
        self.declined += record["status"] == "declined"
        if self.bar is not None:
            left = self.total - self.skipped - self.done
            self.bar.set_postfix_str(f"failed {self.failed}, declined {self.declined}, remaining {left}")
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run_cells(
    cells: Sequence[Cell],
    store: Store,
    *,
    executor: str = "local",
    workers: int = 1,
    address: str | None = None,
    threads: int | None = None,
    resume: bool = False,
    progress: bool = False,
    pictures: bool = True,
    on_record: Callable[[dict[str, Any]], None] | None = None,
    cache: ModelCache | None = None,
    compare_clean: bool = False,
    other_keys: Iterable[str] = (),
) -> list[dict[str, Any]]:
    """Run every cell not yet in ``store`` and return the records of all ``cells`` (in the cells' order).

    ``executor``: ``"local"`` (this process), ``"process"`` (``workers`` processes) or ``"ray"`` (a local Ray
    with ``workers`` CPUs, or the cluster at ``address``). A failed cell is recorded with its error and the
    run goes on. ``compare_clean`` records each defended update's cosine with the undefended one; ``other_keys``
    are records of the same run that the caller stores itself (not foreign when resuming).
    """
    if executor not in EXECUTORS:
        raise ConfigError(f"unknown executor {executor!r}: choose one of {', '.join(EXECUTORS)}")
    if workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {workers}")
    keys = [c.key() for c in cells]
    finished = store.check_resume([*keys, *other_keys], resume=resume)
    todo = [c for c, k in zip(cells, keys, strict=True) if k not in finished]
    threads = threads or default_threads(executor, workers)
    bar = Progress(total=len(set(keys)), skipped=len(finished), enabled=progress)

    def keep(record: dict[str, Any]) -> None:
        store.add(record)
        bar.update(record)
        if on_record is not None:
            on_record(record)

    cache = cache or ModelCache()
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)  # models trained here for the workers see the cells' thread count too
    try:
        if executor == "local" or not todo:
            for cell in todo:
                image = store.image_path(cell.key()) if pictures else None
                keep(_run_one(cell, cache, threads, image, compare_clean))
        else:
            jobs = [
                (
                    c,
                    _model_state(c, cache),
                    threads,
                    str(store.image_path(c.key())) if pictures else None,
                    compare_clean,
                )
                for c in todo
            ]
            runner = _process_pool if executor == "process" else _ray_pool
            for record in runner(jobs, workers=workers, address=address):
                keep(record)
    finally:
        torch.set_num_threads(previous)
        bar.close()
    by_key = {r["key"]: r for r in store.records()}
    return [by_key[k] for k in dict.fromkeys(keys) if k in by_key]


def _model_state(cell: Cell, cache: ModelCache) -> dict[str, torch.Tensor] | None:
    """The trained model's weights for a worker (built once here); None when the worker can rebuild it cheaply
    from its seed, or when building fails (the worker then records the error)."""
    if not cell.case.trained_steps and cell.case.weights is None:
        return None
    try:
        model = cache.model(cell.case, num_classes=num_classes(cell.case, cache))
    except Exception:  # the worker reports it as the cell's failure
        return None
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _process_pool(jobs: Sequence[tuple], *, workers: int, address: str | None) -> Iterable[dict[str, Any]]:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    if address is not None:
        raise ConfigError("--address is for the ray executor: drop it, or use --executor ray")
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        futures = [pool.submit(_worker_run, *job) for job in jobs]
        for future in as_completed(futures):
            yield future.result()


def _ray_pool(jobs: Sequence[tuple], *, workers: int, address: str | None) -> Iterable[dict[str, Any]]:
    try:
        import ray
    except ImportError:
        raise ConfigError("the ray executor needs Ray: pip install 'gradinv[ray]'") from None
    started = False
    if not ray.is_initialized():
        kwargs: dict[str, Any] = {"address": address} if address else {"num_cpus": workers}
        ray.init(ignore_reinit_error=True, include_dashboard=False, log_to_driver=False, **kwargs)
        started = True
    try:
        remote = ray.remote(num_cpus=1)(_worker_run)
        pending = [remote.remote(*job) for job in jobs]
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            yield ray.get(ready[0])
    finally:
        if started:
            ray.shutdown()
