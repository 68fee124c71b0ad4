"""The field's headline results as a regression grid: each entry names the paper, the paper's number, our setting
and our number, and checks ours against a floor that a regression would break.

``--scale cpu`` runs every entry at a size that finishes within about 30 minutes on two CPU cores (bundled data,
fewer client batches, budgets as stated); ``--scale paper`` uses the papers' budgets and more client batches (for
a GPU: hours on a CPU) and says so in the table. Our data are the bundled photos and digits, not the papers'
CIFAR-10 or ImageNet: the papers' numbers are context, the floors are ours.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gradinv._atomic import atomic_path
from gradinv.errors import ConfigError
from gradinv.experiments.case import Case, Seeds
from gradinv.experiments.runner import LABELS, Cell
from gradinv.io import write_json_atomic

Records = Sequence[Mapping[str, Any]]


@dataclass(frozen=True)
class Entry:
    """One headline result: the paper's claim and number, how we rerun it at each scale, how we read ours."""

    name: str
    paper: str
    claim: str
    paper_number: str
    setting: Mapping[str, str]  # scale -> our setting in words
    cells: Callable[[str], list[Cell]]  # scale -> the cells
    ours: Callable[[Records], float | None]
    unit: str
    floor: float | None = None  # ours must be >= floor (None: <= ceiling)
    ceiling: float | None = None

    def check(self, value: float | None) -> str:
        if value is None:
            return "no result"
        if self.floor is not None and value < self.floor:
            return f"REGRESSION (below {self.floor:g})"
        if self.ceiling is not None and value > self.ceiling:
            return f"REGRESSION (above {self.ceiling:g})"
        return "ok"


def _seeds(n: int) -> list[Seeds]:
    return [Seeds(model=0, data=s, defense=s, attack=s) for s in range(n)]


def _cells(case: Case, attack: str, seeds: Sequence[Seeds], **settings: Any) -> list[Cell]:
    return [Cell(case.replace(seeds=s), attack, tuple(settings.items())) for s in seeds]


def _median(key: str) -> Callable[[Records], float | None]:
    def read(records: Records) -> float | None:
        values = [r[key] for r in records if r["status"] == "ok" and r.get(key) is not None]
        return statistics.median(values) if values else None

    return read


def _mean(key: str) -> Callable[[Records], float | None]:
    def read(records: Records) -> float | None:
        values = [r[key] for r in records if r["status"] == "ok" and r.get(key) is not None]
        return statistics.fmean(values) if values else None

    return read


def _n(scale: str, cpu: int, paper: int) -> int:
    return cpu if scale == "cpu" else paper


LENET = Case(model="lenet", data="photos")
CNN6 = Case(model="cnn6", data="photos")
CNN6_DEFICIENT = Case(
    model="cnn6", data="photos", model_options={"activation": "sigmoid", "channels": (12, 36, 4, 36, 64, 128)}
)
CONVNET = Case(model="convnet", data="photos")
MLP_DIGITS = Case(model="mlp", data="digits")

ENTRIES: tuple[Entry, ...] = (
    Entry(
        name="dlg",
        paper="Zhu et al. 2019 (DLG)",
        claim="one CIFAR image recovered pixel-wise from one gradient of a sigmoid LeNet, L-BFGS, 300 iterations",
        paper_number="qualitative: visually exact (CIFAR-100 image, sigmoid LeNet, uniform weights)",
        setting={"cpu": "LeNet, photos 32x32, batch 1, 300 it., 3 batches", "paper": "same, 20 batches"},
        cells=lambda scale: _cells(LENET, "dlg", _seeds(_n(scale, 3, 20)), iterations=300),
        ours=_median("psnr"),
        unit="dB PSNR (median)",
        floor=30.0,
    ),
    Entry(
        name="idlg-labels",
        paper="Zhao et al. 2020 (iDLG)",
        claim="the label of a single sample read from the signs of the classifier's gradient",
        paper_number="100.0% on MNIST, CIFAR-100 and LFW (Table 1; DLG: 89.9 / 83.3 / 79.1%)",
        setting={"cpu": "LeNet, digits, batch 1, 50 batches", "paper": "same, 1,000 batches"},
        cells=lambda scale: _cells(LENET.replace(data="digits"), LABELS + "idlg", _seeds(_n(scale, 50, 1000))),
        ours=_mean("label_accuracy"),
        unit="label accuracy",
        floor=1.0,
    ),
    Entry(
        name="invgrad",
        paper="Geiping et al. 2020 (Inverting Gradients)",
        claim="an image rebuilt from one gradient of an untrained ConvNet with cosine matching and TV (Adam)",
        paper_number="qualitative (Figs. 1-4); Table 1 (CIFAR-10 PSNR) not verified here",
        setting={
            "cpu": "ConvNet-64, photos 32x32, batch 1, label recovered, 600 it., 2 batches",
            "paper": "same, 4,800 it. (the paper's CIFAR budget), 8 batches",
        },
        cells=lambda scale: _cells(CONVNET, "invgrad", _seeds(_n(scale, 2, 8)), iterations=_n(scale, 600, 4800)),
        ours=_median("psnr"),
        unit="dB PSNR (median)",
        floor=18.0,
    ),
    Entry(
        name="rgap",
        paper="Zhu & Blaschko 2021 (R-GAP)",
        claim="closed-form recursive recovery of the input of a full-rank CNN6 with random weights",
        paper_number="MSE against DLG in Table 1 (values not verified here); exact where full rank",
        setting={"cpu": "CNN6, photos 32x32, batch 1, 3 batches", "paper": "same, 9 batches"},
        cells=lambda scale: _cells(CNN6, "rgap", _seeds(_n(scale, 3, 9))),
        ours=_median("psnr"),
        unit="dB PSNR (median)",
        floor=60.0,
    ),
    Entry(
        name="copa",
        paper="Chen & Campbell 2021 (COPA)",
        claim="layers below a rank-deficient one solved jointly: recovery where R-GAP's recursion cannot",
        paper_number="qualitative (no numbers reported)",
        setting={
            "cpu": "CNN6 sigmoid, 4-channel third conv (R-GAP: ~5 dB), photos 32x32, batch 1, 1 batch",
            "paper": "same, 4 batches",
        },
        cells=lambda scale: _cells(CNN6_DEFICIENT, "copa", _seeds(_n(scale, 1, 4))),
        ours=_median("psnr"),
        unit="dB PSNR (median)",
        floor=50.0,
    ),
    Entry(
        name="rtf",
        paper="Fowl et al. 2022 (Robbing the Fed)",
        claim="a malicious server's imprint layer reads single samples exactly out of one aggregated update",
        paper_number="mean PSNR 70.94 dB, ImageNet, batch 64, 128 bins (README teaser)",
        setting={"cpu": "MLP, digits, batch 64, 128 bins, 5 batches", "paper": "same, 50 batches"},
        cells=lambda scale: _cells(
            MLP_DIGITS.replace(batch_size=64, server="imprint:128"), "rtf", _seeds(_n(scale, 5, 50))
        ),
        ours=_mean("recovered_fraction_40db"),
        unit="fraction of the batch above 40 dB (mean)",
        floor=0.4,
    ),
    Entry(
        name="ilrg",
        paper="Ma et al. 2023 (iLRG)",
        claim="per-class label counts of a batch restored exactly from an untrained network's update",
        paper_number="count accuracy 0.994 (FCN-3, MNIST, batch 24, untrained; authors' README table)",
        setting={"cpu": "MLP, digits, batch 24, 20 batches", "paper": "same, 100 batches"},
        cells=lambda scale: _cells(MLP_DIGITS.replace(batch_size=24), LABELS + "ilrg", _seeds(_n(scale, 20, 100))),
        ours=_mean("label_count"),
        unit="count accuracy (mean)",
        floor=0.99,
    ),
    Entry(
        name="llg-star",
        paper="Wainakh et al. 2022 (LLG*)",
        claim="label counts from the classifier's gradient magnitudes, impact estimated from the model",
        paper_number="qualitative: high accuracy early in training (abstract; figures only)",
        setting={"cpu": "MLP, digits, batch 24, 20 batches", "paper": "same, 100 batches"},
        cells=lambda scale: _cells(MLP_DIGITS.replace(batch_size=24), LABELS + "llg-star", _seeds(_n(scale, 20, 100))),
        ours=_mean("label_count"),
        unit="count accuracy (mean)",
        floor=0.95,
    ),
    Entry(
        name="dpsgd",
        paper="Abadi et al. 2016 (DP-SGD)",
        claim="per-sample clipping and Gaussian noise; one step with noise multiplier 1 at delta 1e-5",
        paper_number="epsilon 4.377 (one Gaussian mechanism, sigma 1: analytic curve, Balle & Wang 2018)",
        setting={"cpu": "iDLG on LeNet, photos, batch 1, C=1, sigma=1, 2 batches", "paper": "same, 8 batches"},
        cells=lambda scale: _cells(
            LENET.replace(defenses=("dpsgd:noise_multiplier=1,clip=1",)), "idlg", _seeds(_n(scale, 2, 8))
        ),
        ours=_median("dp_epsilon"),
        unit="epsilon",
        floor=4.3,
        ceiling=4.45,
    ),
    Entry(
        name="dpsgd-stops-idlg",
        paper="Abadi et al. 2016 / Zhu et al. 2019",
        claim="noise of that scale stops gradient matching",
        paper_number="qualitative: noise stops DLG (Zhu et al. 2019, Sec. 5)",
        setting={"cpu": "the dpsgd entry's runs", "paper": "the dpsgd entry's runs"},
        cells=lambda scale: _cells(
            LENET.replace(defenses=("dpsgd:noise_multiplier=1,clip=1",)), "idlg", _seeds(_n(scale, 2, 8))
        ),
        ours=_median("psnr"),
        unit="dB PSNR (median)",
        ceiling=15.0,
    ),
    Entry(
        name="prune-static",
        paper="Zhu et al. 2019 (DLG), pruning defense",
        claim="pruning the gradient's smallest entries stops DLG once enough are pruned",
        paper_number="the most effective defense (abstract); about 20% pruned suffices (Fig. 7, not verified here)",
        setting={
            "cpu": "DLG not adapted to pruning, LeNet, photos, 90% pruned, 2 batches",
            "paper": "same, 8 batches",
        },
        cells=lambda scale: _cells(
            LENET.replace(defenses=("prune:0.9",)), "dlg", _seeds(_n(scale, 2, 8)), iterations=300, adaptive=False
        ),
        ours=_median("psnr"),
        unit="dB PSNR (median)",
        ceiling=20.0,
    ),
)


def entries(only: Sequence[str] | None = None) -> list[Entry]:
    """The entries named in ``only`` (all when None); an unknown name is an error listing the names."""
    if not only:
        return list(ENTRIES)
    names = {e.name: e for e in ENTRIES}
    unknown = [n for n in only if n not in names]
    if unknown:
        raise ConfigError(f"unknown reproduce entries {unknown}: choose from {', '.join(names)}")
    return [names[n] for n in only]


def reproduce(
    *,
    scale: str = "cpu",
    only: Sequence[str] | None = None,
    out: str | Path = "runs/reproduce",
    progress: bool = False,
    **run: Any,
) -> dict[str, Any]:
    """Run the entries at ``scale`` into the store at ``out`` and compare each with its paper and its floor.
    Writes ``reproduce.md``, ``reproduce.json`` and ``report.html``."""
    from gradinv.experiments.executors import run_cells
    from gradinv.experiments.grid import write_report_for
    from gradinv.experiments.store import Store

    if scale not in ("cpu", "paper"):
        raise ConfigError(f"--scale must be cpu or paper, got {scale!r}")
    chosen = entries(only)
    cells_by_entry = {e.name: e.cells(scale) for e in chosen}
    cells = list({c.key(): c for cs in cells_by_entry.values() for c in cs}.values())  # entries may share runs
    out = Path(out)
    with Store(out) as store:
        records = run_cells(cells, store, progress=progress, **run)
        store.set_meta(name=f"reproduce ({scale} scale)", grid={"scale": scale, "entries": [e.name for e in chosen]})
    by_key = {r["key"]: r for r in records}
    rows = []
    for e in chosen:
        mine = [by_key[c.key()] for c in cells_by_entry[e.name] if c.key() in by_key]
        value = e.ours(mine)
        failed = [r for r in mine if r["status"] != "ok"]
        rows.append(
            {
                "entry": e.name,
                "paper": e.paper,
                "claim": e.claim,
                "paper_number": e.paper_number,
                "setting": e.setting[scale],
                "ours": value,
                "unit": e.unit,
                "check": e.check(value) if not failed else f"{failed[0]['status']}: {failed[0]['reason']}",
                "runs": len(mine),
                "seconds": round(sum(r.get("seconds_total") or 0 for r in mine), 1),
            }
        )
    result = {"scale": scale, "rows": rows}
    write_json_atomic(result, out / "reproduce.json")
    with atomic_path(out / "reproduce.md") as tmp:
        Path(tmp).write_text(markdown(result))
    write_report_for(out)
    return result


def markdown(result: Mapping[str, Any]) -> str:
    """The comparison as a Markdown table."""
    scale = result["scale"]
    lines = [
        f"Headline results, {scale} scale"
        + (" (the papers' budgets: meant for a GPU)" if scale == "paper" else " (within 30 min on 2 CPU cores)"),
        "",
        "| entry | paper | the paper's number | our setting | ours | check | s |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in result["rows"]:
        ours = "-" if r["ours"] is None else f"{r['ours']:.3g} {r['unit']}"
        lines.append(
            f"| {r['entry']} | {r['paper']} | {r['paper_number']} | {r['setting']} | {ours} | {r['check']} | "
            f"{r['seconds']:.0f} |"
        )
    return "\n".join(lines) + "\n"
