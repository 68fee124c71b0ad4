"""Label-recovery trials and the label benchmark (``gradinv labels`` and ``gradinv bench labels``).

A trial samples a client batch, simulates its update, and runs label methods on the observation alone; the
truth is used only to score. Scores: existence accuracy (Jaccard overlap of the recovered and true label
sets) and count accuracy (multiset overlap over the batch size). A method whose assumptions the case breaks
(no bias, repeated labels for Yin, a batch too large for RLG's rank test...) declines with a reason; the
benchmark reports how often, instead of scoring garbage.
"""

from __future__ import annotations

import csv
import statistics
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from gradinv.attacks.labels import check_methods, recover_labels
from gradinv.data import load_dataset, sample_batch
from gradinv.data.dataset import ImageDataset
from gradinv.defenses import Defense, as_defense
from gradinv.errors import ConfigError, GradinvError
from gradinv.experiment import prepare_model
from gradinv.fl import FedSGD, Scenario
from gradinv.fl.protocols import Protocol
from gradinv.io import write_json_atomic
from gradinv.metrics import label_accuracy, label_existence_accuracy

AUXILIARY_SIZE = 32  # auxiliary samples given to llg-plus, disjoint from the client's batch
DEFAULT_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)


@dataclass(frozen=True)
class LabelTrial:
    """One method on one sampled batch."""

    method: str
    data: str
    model: str
    trained_steps: int
    batch_size: int
    seed: int
    labels_true: list[int]
    labels_recovered: list[int] | None = None
    counts_given: bool | None = None
    existence: float | None = None
    count: float | None = None
    seconds: float | None = None
    declined: str | None = None


@dataclass(frozen=True, eq=False)
class LabelCase:
    """A model (as the server sends it) and the data its clients hold."""

    model_name: str
    model: torch.nn.Module
    dataset: ImageDataset
    trained_steps: int = 0
    protocol: Protocol = field(default_factory=FedSGD)
    train_mode: bool = False
    defenses: tuple[Defense, ...] = ()
    clients: int = 1


def prepare_case(
    *,
    model: str,
    data: str | Path,
    image_size: int = 32,
    seed: int = 0,
    trained_steps: int = 0,
    num_classes: int | None = None,
    protocol: Protocol | None = None,
    train_mode: bool = False,
    model_options: Mapping[str, Any] | None = None,
    defenses: Sequence[Defense | str] = (),
    clients: int = 1,
) -> LabelCase:
    """Load ``data``, build ``model`` with enough classes, and train it ``trained_steps`` SGD steps on ``data``
    (the state a server sends mid-training on the task). The clients apply ``defenses`` (specs or instances);
    with ``clients > 1`` each batch is shared by that many clients and the server sees their mean update."""
    defenses = tuple(as_defense(d) for d in defenses)
    dataset = load_dataset(data, image_size=image_size, channels=3)
    classes = num_classes or dataset.num_classes
    if classes < dataset.num_classes:
        raise ConfigError(f"--num-classes {classes} is below the {dataset.num_classes} classes of '{dataset.name}'")
    net = prepare_model(
        model,
        num_classes=classes,
        image_size=image_size,
        seed=seed,
        trained_steps=trained_steps,
        dataset=dataset,
        model_options=model_options,
    )
    return LabelCase(model, net, dataset, trained_steps, protocol or FedSGD(), train_mode, defenses, clients)


def run_trials(
    case: LabelCase, methods: Sequence[str], *, batch_size: int, trials: int, seed: int = 0
) -> list[LabelTrial]:
    """``trials`` batches (seeds ``seed``, ``seed + 1``, ...), each attacked by every method in ``methods``."""
    if trials < 1:
        raise ConfigError(f"--trials must be >= 1, got {trials}")
    check_methods(methods)
    ds = case.dataset
    extra = max(0, min(AUXILIARY_SIZE, len(ds) - batch_size)) if "llg-plus" in methods else 0
    records: list[LabelTrial] = []
    for t in range(trials):
        images, labels = sample_batch(ds, batch_size=batch_size + extra, seed=seed + t)
        client_x, client_y = images[:batch_size], labels[:batch_size]
        auxiliary = ds.normalization.normalize(images[batch_size:])
        observation = Scenario.from_images(
            case.model,
            client_x,
            client_y,
            normalization=ds.normalization,
            protocol=case.protocol,
            train_mode=case.train_mode,
            defenses=case.defenses,
            seed=seed + t,
            clients=case.clients,
        ).observe()
        common = dict(
            data=ds.name,
            model=case.model_name,
            trained_steps=case.trained_steps,
            batch_size=batch_size,
            seed=seed + t,
            labels_true=sorted(client_y.tolist()),
        )
        for method in methods:
            options: dict[str, Any] = {"auxiliary": auxiliary} if method == "llg-plus" else {}
            start = time.perf_counter()
            try:
                estimate = recover_labels(observation, method=method, **options)
            except GradinvError as exc:
                records.append(LabelTrial(method=method, declined=str(exc), **common))
                continue
            seconds = time.perf_counter() - start
            records.append(
                LabelTrial(
                    method=method,
                    labels_recovered=estimate.labels.tolist(),
                    counts_given=estimate.gives_counts,
                    existence=label_existence_accuracy(estimate.classes, client_y),
                    count=label_accuracy(estimate.labels, client_y),
                    seconds=seconds,
                    **common,
                )
            )
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


def summarize(records: Iterable[LabelTrial]) -> list[dict[str, Any]]:
    """Mean existence / count accuracy over the trials a method answered, per (case, method, batch size)."""
    groups: dict[tuple, list[LabelTrial]] = {}
    for r in records:
        groups.setdefault((r.data, r.model, r.trained_steps, r.method, r.batch_size), []).append(r)
    rows = []
    for (data, model, steps, method, b), group in groups.items():
        ok = [r for r in group if r.declined is None]
        reasons = sorted({r.declined for r in group if r.declined})
        rows.append(
            {
                "data": data,
                "model": model,
                "trained_steps": steps,
                "method": method,
                "batch_size": b,
                "trials": len(group),
                "answered": len(ok),
                "existence": round(statistics.fmean(r.existence for r in ok), 4) if ok else None,
                "count": round(statistics.fmean(r.count for r in ok), 4) if ok else None,
                "seconds_median": round(statistics.median(r.seconds for r in ok), 5) if ok else None,
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


def plot_counts(trial_by_method: Sequence[LabelTrial], num_classes: int, path: Path) -> None:
    """True and recovered per-class counts of one batch (one bar group per class present in either)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from gradinv._atomic import atomic_path

    first = trial_by_method[0]
    true = torch.bincount(torch.tensor(first.labels_true, dtype=torch.long), minlength=num_classes)
    shown = set(torch.nonzero(true).flatten().tolist())
    for r in trial_by_method:
        if r.labels_recovered:
            shown |= set(r.labels_recovered)
    classes = sorted(shown)[:60]
    fig, ax = plt.subplots(figsize=(max(5, 0.35 * len(classes) * (1 + len(trial_by_method))), 3.4))
    width = 1.0 / (1 + len(trial_by_method) + 0.5)
    xs = torch.arange(len(classes), dtype=torch.float64)
    ax.bar(xs, [int(true[c]) for c in classes], width, label="true", color="0.3")
    for i, r in enumerate(trial_by_method, start=1):
        rec = torch.bincount(torch.tensor(r.labels_recovered or [], dtype=torch.long), minlength=num_classes)
        label = r.method if r.declined is None else f"{r.method} (declined)"
        ax.bar(xs + i * width, [int(rec[c]) for c in classes], width, label=label)
    ax.set_xticks(xs + width * len(trial_by_method) / 2, [str(c) for c in classes], fontsize=7)
    ax.set_xlabel("class")
    ax.set_ylabel("samples")
    ax.set_title(f"{first.model}, {first.data}, batch {first.batch_size}: true vs recovered counts", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def save_trials(records: Sequence[LabelTrial], rows: Sequence[dict[str, Any]], out: Path, *, name: str) -> None:
    """``name.json`` (every trial), ``name.csv`` and ``name.md`` (the summary)."""
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic({"summary": list(rows), "trials": [asdict(r) for r in records]}, out / f"{name}.json")
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
    progress: bool = False,
) -> tuple[list[LabelTrial], list[dict[str, Any]]]:
    """Every method on every (model, trained steps, batch size) of ``data``, plus untrained models on a
    synthetic ``synthetic_classes``-class task; batch sizes larger than a data set are skipped."""
    cases = [(data, m, s) for m in models for s in trained_steps]
    if synthetic_classes:
        cases += [(f"synthetic:{synthetic_classes}", m, 0) for m in models]
    jobs = [(c, b) for c in cases for b in batch_sizes]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(jobs), desc="label bench", unit="case")
    records: list[LabelTrial] = []
    for source, model, steps in cases:
        case = prepare_case(model=model, data=source, image_size=image_size, seed=seed, trained_steps=steps)
        for b in batch_sizes:
            if bar is not None:
                bar.set_postfix_str(f"{model} {source} steps={steps} B={b}")
            if b <= len(case.dataset):
                records += run_trials(case, methods, batch_size=b, trials=trials, seed=seed)
            if bar is not None:
                bar.update()
    if bar is not None:
        bar.close()
    return records, summarize(records)
