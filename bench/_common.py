"""Shared helpers of the benchmarks: the peer-comparison case and result writing."""

from __future__ import annotations

import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from gradinv.data import load_dataset
from gradinv.fl import Scenario
from gradinv.models import build_model

RESULTS = Path(__file__).resolve().parent / "results"


def photo_case(
    *,
    model: str = "convnet",
    photo: str = "chelsea",
    image_size: int = 32,
    seed: int = 0,
    device: str = "cpu",
    **options,
):
    """One bundled photo against a freshly initialised model (eval-mode BatchNorm), batch 1, on ``device``."""
    ds = load_dataset("photos", image_size=image_size, channels=3)
    i = ds.class_names.index(photo)
    net = build_model(model, num_classes=10, image_size=image_size, seed=seed, **options).to(device)
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


def write_results(name: str, payload: dict, table: str) -> None:
    RESULTS.mkdir(exist_ok=True)
    payload = {
        "machine": {
            "cpu_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "platform": platform.platform(),
            "torch": torch.__version__,
        },
        **payload,
    }
    (RESULTS / f"{name}.json").write_text(json.dumps(payload, indent=2) + "\n")
    (RESULTS / f"{name}.md").write_text(table + "\n")
    print(table)
