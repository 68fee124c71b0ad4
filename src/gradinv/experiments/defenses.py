"""Which defenses stop an attack: one attack against the same client batches, once undefended and once under
each defense, scored against the private images, with the defense's cost to the update.

The cost is the cosine between the defended update and the clean one (1: the training signal is intact; the
"utility" the survey asks defenses to keep), for DP-SGD the round's epsilon (with the case's protocol), and
optionally (:func:`defended_accuracy`) the test accuracy of the model trained with defended updates. It is a grid
over the runner: each run is stored the moment it finishes, and ``resume=True`` continues an interrupted sweep.
"""

from __future__ import annotations

import copy
import hashlib
import shutil
import statistics
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from gradinv._atomic import atomic_path
from gradinv.data.dataset import ImageDataset
from gradinv.defenses import as_defense
from gradinv.errors import ConfigError, GradinvError
from gradinv.experiments.case import Case, ModelCache, num_classes
from gradinv.experiments.executors import run_cells
from gradinv.experiments.runner import Cell, library_versions
from gradinv.experiments.store import Store
from gradinv.fl import Scenario
from gradinv.io import write_json_atomic

NONE = "none"
UTILITY = "utility"  # the "attack" of a record that holds a defended model's held-out accuracy


def defended_accuracy(
    model: torch.nn.Module,
    dataset: ImageDataset,
    defenses: Sequence[str],
    *,
    steps: int,
    batch_size: int = 32,
    lr: float = 0.1,
    seed: int = 0,
    test_fraction: float = 0.25,
) -> float:
    """Held-out accuracy after ``steps`` FedSGD rounds on ``dataset``: each round one client takes a batch,
    applies ``defenses`` and shares its update, and the server takes an SGD step of ``lr`` with it.

    The data are split once (seeded) into training and test parts; ``model`` itself is not changed.
    """
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(dataset), generator=g)
    n_test = max(1, int(test_fraction * len(dataset)))
    test, train = order[:n_test], order[n_test:]
    net = copy.deepcopy(model)
    for step in range(steps):
        idx = train[torch.randint(0, len(train), (batch_size,), generator=g)]
        sc = Scenario.from_images(
            net,
            dataset.images[idx],
            dataset.labels[idx],
            normalization=dataset.normalization,
            defenses=tuple(defenses),
            seed=seed + step,
        )
        update = sc.observe().update
        with torch.no_grad():
            for name, p in net.named_parameters():
                p -= lr * update[name]
    net.eval()
    with torch.no_grad():
        logits = net(dataset.normalization.normalize(dataset.images[test]))
    return float((logits.argmax(dim=1) == dataset.labels[test]).double().mean())


def defense_cells(
    case: Case,
    *,
    attack: str,
    defenses: Sequence[str],
    samples: int = 2,
    attack_settings: Mapping[str, Any] | None = None,
) -> tuple[list[str], list[Cell]]:
    """The sweep's specs (``"none"`` first) and cells: ``samples`` client batches of ``case`` x the specs."""
    if samples < 1:
        raise ConfigError(f"--samples must be >= 1, got {samples}")
    if case.defenses:
        raise ConfigError("the sweep adds each defense to an undefended case: give them as the defenses to test")
    specs = [NONE] + [as_defense(d).spec() for d in defenses]  # every spec checked before any work
    first = case.seeds.data
    cells = [
        Cell(
            case.replace(seeds=case.seeds.vary(s), defenses=() if spec == NONE else (spec,)),
            attack,
            tuple(dict(attack_settings or {}).items()),
        )
        for s in range(first, first + samples)
        for spec in specs
    ]
    return specs, cells


def bench_defenses(
    case: Case,
    *,
    attack: str,
    defenses: Sequence[str],
    samples: int = 2,
    attack_settings: Mapping[str, Any] | None = None,
    utility_steps: int = 0,
    out: str | Path | None = None,
    resume: bool = False,
    progress: bool = False,
    **run: Any,
) -> dict[str, Any]:
    """Run ``attack`` on ``samples`` client batches of ``case`` undefended and under each defense spec.

    Returns the configuration, every run's record and the per-defense summary; with ``out`` also the store
    (resumable), ``defenses.json``, ``defenses.md``, ``defenses.png`` (the private image and each defense's
    reconstruction) and ``report.html``. ``utility_steps > 0`` also trains the model that many defended FedSGD
    rounds on the bundled digits (batch 32) and reports its held-out accuracy per defense.
    """
    specs, cells = defense_cells(
        case, attack=attack, defenses=defenses, samples=samples, attack_settings=attack_settings
    )
    config = {
        **case.to_dict(),
        "attack": attack,
        "attack_settings": dict(attack_settings or {}),
        "samples": samples,
        "utility_steps": utility_steps,
    }
    root = Path(out) if out is not None else Path(tempfile.mkdtemp(prefix="gradinv-defenses-"))
    cache = ModelCache()
    try:
        with Store(root) as store:
            utility_keys = [_utility_key(case, s, utility_steps) for s in specs] if utility_steps else []
            records = run_cells(
                cells,
                store,
                resume=resume,
                progress=progress,
                cache=cache,
                compare_clean=True,
                other_keys=utility_keys,
                **run,
            )
            if utility_steps:  # in the sweep's thread count, like its cells
                previous = torch.get_num_threads()
                torch.set_num_threads(run.get("threads") or previous)
                try:
                    records += _utility(store, case, specs, utility_steps, cache)
                finally:
                    torch.set_num_threads(previous)
            store.set_meta(name=f"{attack} vs defenses", grid=config)
        result = {"config": config, "trials": records, "summary": summarize(records, specs)}
        if out is not None:
            write_json_atomic(result, root / "defenses.json")
            with atomic_path(root / "defenses.md") as tmp:
                Path(tmp).write_text(markdown_table(config, result["summary"]))
            _combine_pictures(root, records, specs, first_seed=case.seeds.data)
            from gradinv.experiments.grid import write_report_for

            write_report_for(root)
        return result
    finally:
        if out is None:
            shutil.rmtree(root, ignore_errors=True)


def _utility_key(case: Case, spec: str, steps: int) -> str:
    from gradinv import __version__

    text = f"{UTILITY}|{spec}|{steps}|{case.model_key()}|{__version__}"
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def _utility(store: Store, case: Case, specs: Sequence[str], steps: int, cache: ModelCache) -> list[dict[str, Any]]:
    """One record per spec with the held-out digits accuracy after ``steps`` defended FedSGD rounds."""
    have = {r["key"]: r for r in store.records()}
    digits = cache.dataset("digits", case.image_size)
    net = cache.model(case, num_classes=num_classes(case, cache))
    out = []
    for spec in specs:
        key = _utility_key(case, spec, steps)
        if key in have:
            out.append(have[key])
            continue
        record: dict[str, Any] = {
            "key": key,
            "attack": UTILITY,
            "status": "ok",
            "reason": None,
            **{k: v for k, v in case.to_dict().items() if k != "defenses"},
            "defenses": [] if spec == NONE else [spec],
            "seed": case.seeds.model,
            "utility_steps": steps,
            "threads": torch.get_num_threads(),
            "versions": library_versions(),
        }
        start = time.perf_counter()
        try:
            record["utility"] = defended_accuracy(
                net, digits, () if spec == NONE else (spec,), steps=steps, seed=case.seeds.model
            )
        except GradinvError as exc:
            record["status"], record["reason"] = "declined", str(exc)
        record["seconds"] = round(time.perf_counter() - start, 3)
        store.add(record)
        out.append(record)
    return out


def summarize(records: Sequence[Mapping[str, Any]], specs: Sequence[str]) -> list[dict[str, Any]]:
    """Per defense (in ``specs`` order): medians of PSNR, SSIM and update cosine, mean label accuracy, epsilon
    and, when measured, the defended model's accuracy."""

    def med(values: list[float | None]) -> float | None:
        kept = [v for v in values if v is not None]
        return statistics.median(kept) if kept else None

    rows = []
    for spec in specs:
        mine = [r for r in records if (r["defenses"] or [NONE]) == [spec]]
        utility = next((r for r in mine if r["attack"] == UTILITY), None)
        group = [r for r in mine if r["attack"] != UTILITY]
        ok = [r for r in group if r["status"] == "ok"]
        labels = [r["label_accuracy"] for r in ok if r.get("label_accuracy") is not None]
        rows.append(
            {
                "defense": spec,
                "runs": len(group),
                "answered": len(ok),
                "psnr": med([r["psnr"] for r in ok]),
                "ssim": med([r["ssim"] for r in ok]),
                "label_accuracy": statistics.fmean(labels) if labels else None,
                "update_cosine": med([r.get("update_cosine") for r in ok]) if spec != NONE else 1.0 if ok else None,
                "dp_epsilon": med([r.get("dp_epsilon") for r in group]),
                "accuracy": None if utility is None else utility.get("utility"),
                "seconds": med([r["seconds"] for r in ok]),
                "declined": next((r["reason"] for r in group if r["status"] != "ok"), None),
            }
        )
    return rows


def markdown_table(config: Mapping[str, Any], rows: Sequence[dict[str, Any]]) -> str:
    """The summary as a Markdown table, headed by the case."""

    def f(v: float | None, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    head = (
        f"{config['attack']} on {config['model']} {config['model_options'] or ''}, {config['data']} "
        f"{config['image_size']}x{config['image_size']}, batch {config['batch_size']}, "
        f"{config['protocol']['name']}; medians over client batches"
    )
    steps = config.get("utility_steps") or 0
    if steps:
        head += f"; accuracy: held-out digits after {steps} defended FedSGD rounds of batch 32"
    lines = [
        head,
        "",
        "| defense | PSNR dB | SSIM | label acc. | update cosine | epsilon (1 round) |"
        + (" accuracy |" if steps else "")
        + " runs |",
        "| --- | --- | --- | --- | --- | --- |" + (" --- |" if steps else "") + " --- |",
    ]
    for r in rows:
        if r["answered"] == 0 and r["declined"]:
            blanks = "| " * (5 + (1 if steps else 0))
            lines.append(f"| {r['defense']} | declined: {r['declined']} {blanks}| {r['runs']} |")
            continue
        eps = r["dp_epsilon"]
        lines.append(
            f"| {r['defense']} | {f(r['psnr'], '.1f')} | {f(r['ssim'], '.3f')} | {f(r['label_accuracy'], '.2f')} | "
            f"{f(r['update_cosine'], '.3f')} | {'-' if eps is None else format(eps, '.2f')} |"
            + (f" {f(r['accuracy'], '.3f')} |" if steps else "")
            + f" {r['answered']}/{r['runs']} |"
        )
    return "\n".join(lines) + "\n"


def _combine_pictures(
    root: Path, records: Sequence[Mapping[str, Any]], specs: Sequence[str], *, first_seed: int
) -> None:
    """``defenses.png``: the first client batch's first private image, then what the attack rebuilt from it under
    each defense."""
    import numpy as np

    from gradinv.viz import save_reconstruction_grid

    images, captions = [], []
    for spec in specs:
        rec = next(
            (
                r
                for r in records
                if (r["defenses"] or [NONE]) == [spec]
                and r["seed"] == first_seed
                and r.get("image")
                and r["attack"] != UTILITY
            ),
            None,
        )
        arrays = root / Path(rec["image"]).with_suffix(".npz") if rec is not None else None
        if arrays is None or not arrays.is_file():
            continue
        with np.load(arrays) as saved:
            truth = torch.from_numpy(saved["truth"][:1]).float() / 255
            recon = torch.from_numpy(saved["reconstruction"][:1]).float() / 255
        if not images:
            images.append(truth)
            captions.append("private image")
        images.append(recon)
        captions.append(f"{spec.split(':')[0]}{_short(spec)}\n{rec['psnr_per_sample'][0]:.1f} dB")
    if images:
        save_reconstruction_grid(root / "defenses.png", truth=None, reconstruction=torch.cat(images), captions=captions)


def _short(spec: str) -> str:
    """The first setting's value of a spec, for a caption (``prune:fraction=0.9,...`` -> ``:0.9``)."""
    _, _, rest = spec.partition(":")
    first = rest.split(",")[0]
    return f":{first.partition('=')[2]}" if first else ""
