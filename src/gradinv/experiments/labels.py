"""Label-recovery trials and the label benchmark (``gradinv labels`` and ``gradinv bench labels``), as grids of
``labels:METHOD`` cells over the runner.

A trial samples a client batch, simulates its update, and runs a label method on the observation alone; the
truth is used only to score. Scores: existence accuracy (Jaccard overlap of the recovered and true label
sets) and count accuracy (multiset overlap over the batch size). A method whose assumptions the case breaks
(no bias, repeated labels for Yin, a batch too large for RLG's rank test...) declines with a reason; the
benchmark reports how often, instead of scoring garbage. The models are trained on the clients' own data
source (the state a server sends mid-training on the task).
"""

from __future__ import annotations

import csv
import shutil
import statistics
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from gradinv.attacks.labels import check_methods
from gradinv.errors import ConfigError
from gradinv.experiments.case import Case, Seeds
from gradinv.experiments.executors import run_cells
from gradinv.experiments.runner import LABELS, Cell
from gradinv.experiments.store import Store
from gradinv.io import write_json_atomic

DEFAULT_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def label_cells(case: Case, methods: Sequence[str], *, trials: int) -> list[Cell]:
    """``trials`` client batches of ``case`` (data seeds from ``case.seeds.data``, one model) x ``methods``."""
    if trials < 1:
        raise ConfigError(f"--trials must be >= 1, got {trials}")
    check_methods(list(methods))
    first = case.seeds.data
    cases = [case.replace(seeds=case.seeds.vary(s)) for s in range(first, first + trials)]
    return [Cell(c, LABELS + m) for c in cases for m in methods]


def run_label_trials(case: Case, methods: Sequence[str], *, trials: int) -> list[dict[str, Any]]:
    """Every method on ``trials`` batches of ``case``; the records in trial order."""
    root = Path(tempfile.mkdtemp(prefix="gradinv-labels-"))
    try:
        with Store(root) as store:
            records = run_cells(label_cells(case, methods, trials=trials), store, pictures=False)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    failed = next((r for r in records if r["status"] == "failed"), None)
    if failed is not None:  # one client configuration: an error is the user's, not the method's
        raise ConfigError(failed["reason"])
    return records


# -- summaries ----------------------------------------------------------------------------------------------------

SUMMARY_FIELDS = (
    "data",
    "model",
    "trained_steps",
    "method",
    "batch_size",
    "trials",
    "answered",
    "existence",
    "count",
    "seconds_median",
    "declined_reason",
)


def summarize(records: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Mean existence / count accuracy over the trials a method answered, per (case, method, batch size)."""
    groups: dict[tuple, list[Mapping[str, Any]]] = {}
    for r in records:
        key = (r["data"], r["model"], r["trained_steps"], r["attack"].removeprefix(LABELS), r["batch_size"])
        groups.setdefault(key, []).append(r)
    rows = []
    for (data, model, steps, method, b), group in groups.items():
        ok = [r for r in group if r["status"] == "ok"]
        reasons = sorted({r["reason"] for r in group if r["status"] != "ok"})
        rows.append(
            {
                "data": data,
                "model": model,
                "trained_steps": steps,
                "method": method,
                "batch_size": b,
                "trials": len(group),
                "answered": len(ok),
                "existence": round(statistics.fmean(r["label_existence"] for r in ok), 4) if ok else None,
                "count": round(statistics.fmean(r["label_count"] for r in ok), 4) if ok else None,
                "seconds_median": round(statistics.median(r["seconds"] for r in ok), 5) if ok else None,
                "declined_reason": reasons[0] if reasons else "",
            }
        )
    return rows


def write_csv(rows: Sequence[dict[str, Any]], path: Path) -> None:
    from gradinv._atomic import atomic_path

    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=SUMMARY_FIELDS)
        writer.writeheader()
        writer.writerows(rows)


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """One table per (data, model, trained steps): methods down, batch sizes across, ``existence / count``."""
    out = []
    cases = sorted({(r["data"], r["model"], r["trained_steps"]) for r in rows}, key=str)
    for data, model, steps in cases:
        sub = [r for r in rows if (r["data"], r["model"], r["trained_steps"]) == (data, model, steps)]
        sizes = sorted({r["batch_size"] for r in sub})
        methods = sorted({r["method"] for r in sub})
        state = f"trained {steps} steps" if steps else "untrained"
        out.append(f"\n### {model}, {state}, {data}: existence / count accuracy\n")
        out.append("| method | " + " | ".join(f"B={b}" for b in sizes) + " |")
        out.append("| --- |" + " --- |" * len(sizes))
        for m in methods:
            cells = []
            for b in sizes:
                r = next((r for r in sub if r["method"] == m and r["batch_size"] == b), None)
                if r is None or r["answered"] == 0:
                    cells.append("n/a")
                else:
                    part = f" ({r['answered']}/{r['trials']})" if r["answered"] < r["trials"] else ""
                    cells.append(f"{r['existence']:.2f} / {r['count']:.2f}{part}")
            out.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def plot_accuracy(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """Count accuracy against batch size, one panel per case, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from gradinv._atomic import atomic_path

    cases = sorted({(r["data"], r["model"], r["trained_steps"]) for r in rows}, key=str)
    methods = sorted({r["method"] for r in rows})
    cols = min(3, len(cases))
    nrows = (len(cases) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(5 * cols, 3.6 * nrows), squeeze=False)
    colors = {m: plt.cm.tab10(i % 10) for i, m in enumerate(methods)}
    for ax, (data, model, steps) in zip(axes.flat, cases, strict=False):
        for m in methods:
            pts = sorted(
                (r["batch_size"], r["count"])
                for r in rows
                if (r["data"], r["model"], r["trained_steps"], r["method"]) == (data, model, steps, m)
                and r["count"] is not None
            )
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", ms=3, label=m, color=colors[m])
        ax.set_xscale("log", base=2)
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(f"{model} ({'trained' if steps else 'untrained'}), {data}", fontsize=9)
        ax.set_xlabel("batch size")
        ax.set_ylabel("count accuracy")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(cases) :]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(methods), 8), fontsize=8)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def plot_counts(trial_by_method: Sequence[Mapping[str, Any]], path: Path) -> None:
    """True and recovered per-class counts of one batch (one bar group per class present in either)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from gradinv._atomic import atomic_path

    first = trial_by_method[0]
    num_classes = 1 + max([*first["labels_true"], *[c for r in trial_by_method for c in r["labels_recovered"] or []]])
    true = torch.bincount(torch.tensor(first["labels_true"], dtype=torch.long), minlength=num_classes)
    shown = set(torch.nonzero(true).flatten().tolist())
    for r in trial_by_method:
        if r["labels_recovered"]:
            shown |= set(r["labels_recovered"])
    classes = sorted(shown)[:60]
    fig, ax = plt.subplots(figsize=(max(5, 0.35 * len(classes) * (1 + len(trial_by_method))), 3.4))
    width = 1.0 / (1 + len(trial_by_method) + 0.5)
    xs = torch.arange(len(classes), dtype=torch.float64)
    ax.bar(xs, [int(true[c]) for c in classes], width, label="true", color="0.3")
    for i, r in enumerate(trial_by_method, start=1):
        rec = torch.bincount(torch.tensor(r["labels_recovered"] or [], dtype=torch.long), minlength=num_classes)
        method = r["attack"].removeprefix(LABELS)
        label = method if r["status"] == "ok" else f"{method} ({r['status']})"
        ax.bar(xs + i * width, [int(rec[c]) for c in classes], width, label=label)
    ax.set_xticks(xs + width * len(trial_by_method) / 2, [str(c) for c in classes], fontsize=7)
    ax.set_xlabel("class")
    ax.set_ylabel("samples")
    ax.set_title(
        f"{first['model']}, {first['data']}, batch {first['batch_size']}: true vs recovered counts", fontsize=9
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def save_trials(records: Sequence[Mapping[str, Any]], rows: Sequence[dict[str, Any]], out: Path, *, name: str) -> None:
    """``name.json`` (every trial), ``name.csv`` and ``name.md`` (the summary)."""
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic({"summary": list(rows), "trials": list(records)}, out / f"{name}.json")
    write_csv(rows, out / f"{name}.csv")
    from gradinv._atomic import atomic_path

    with atomic_path(out / f"{name}.md") as tmp:
        Path(tmp).write_text(markdown_table(rows))


def bench_labels(
    *,
    methods: Sequence[str],
    models: Sequence[str],
    batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
    trained_steps: Sequence[int] = (0, 300),
    trials: int = 10,
    data: str = "digits",
    synthetic_classes: int | None = 1000,
    image_size: int = 32,
    seed: int = 0,
    out: str | Path | None = None,
    progress: bool = False,
    **run: Any,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Every method on every (model, trained steps, batch size) of ``data``, plus untrained models on a
    synthetic ``synthetic_classes``-class task; batch sizes larger than a data set are skipped. With ``out`` the
    records go to its results store as each cell finishes (``resume=True`` continues an interrupted run)."""
    from gradinv.data import load_dataset

    sources = [(data, m, s) for m in models for s in trained_steps]
    if synthetic_classes:
        sources += [(f"synthetic:{synthetic_classes}", m, 0) for m in models]
    cells: list[Cell] = []
    for source, model, steps in sources:
        size = len(load_dataset(source, image_size=8, channels=3))
        for b in batch_sizes:
            if b > size:
                continue
            case = Case(
                model=model,
                data=source,
                train_data=source,
                image_size=image_size,
                batch_size=b,
                trained_steps=steps,
                seeds=Seeds.all(seed),
            )
            cells += label_cells(case, methods, trials=trials)
    root = Path(out) if out is not None else Path(tempfile.mkdtemp(prefix="gradinv-labels-"))
    try:
        with Store(root) as store:
            records = run_cells(cells, store, progress=progress, pictures=False, **run)
            store.set_meta(name="bench labels", grid={"methods": list(methods), "models": list(models)})
    finally:
        if out is None:
            shutil.rmtree(root, ignore_errors=True)
    return records, summarize(records)
