"""Does my deployment leak? Every applicable attack against one client configuration, on several client batches
of it, with the strongest attack named.

The audit is a grid over the runner: one :class:`~gradinv.experiments.case.Case` (the deployment), its model
built and trained once, ``samples`` client batches (data, defense and attack seeds ``seed``...) and each attack.
An attack whose assumptions the configuration breaks (R-GAP on a batch, the analytic inversion on a model
whose first layer is not linear with a bias) is reported as declined with its reason; any other error is the
user's mistake and stops the audit.
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from gradinv._atomic import atomic_path
from gradinv.errors import ConfigError
from gradinv.experiments.case import Case, ModelCache
from gradinv.experiments.executors import run_cells
from gradinv.experiments.runner import Cell
from gradinv.experiments.store import Store
from gradinv.io import write_json_atomic

DEFAULT_ATTACKS = ("analytic", "rgap", "invgrad")


def audit_cells(
    case: Case,
    *,
    attacks: Sequence[str] = DEFAULT_ATTACKS,
    samples: int = 2,
    attack_settings: Mapping[str, Mapping[str, Any]] | None = None,
) -> list[Cell]:
    """The audit's cells: ``samples`` client batches of ``case`` (seeds from ``case.seeds.data``) x ``attacks``.
    Every attack name and setting is checked here, before any work."""
    if samples < 1:
        raise ConfigError(f"--samples must be >= 1, got {samples}")
    settings = dict(attack_settings or {})
    unknown = sorted(set(settings) - set(attacks))
    if unknown:
        raise ConfigError(f"attack settings given for {unknown}, which the audit does not run: add them to --attacks")
    first = case.seeds.data
    cases = [case.replace(seeds=case.seeds.vary(s)) for s in range(first, first + samples)]
    return [Cell(c, name, tuple(dict(settings.get(name, {})).items())) for name in attacks for c in cases]


def audit(
    case: Case,
    *,
    attacks: Sequence[str] = DEFAULT_ATTACKS,
    samples: int = 2,
    attack_settings: Mapping[str, Mapping[str, Any]] | None = None,
    out: str | Path | None = None,
    resume: bool = False,
    progress: bool = False,
    cache: ModelCache | None = None,
) -> dict[str, Any]:
    """Run each of ``attacks`` on ``samples`` client batches of ``case``; ``attack_settings`` maps an attack's
    name to its settings.

    Returns the configuration, one row per attack (median and best PSNR, SSIM, label accuracy, recovered
    fraction, or the reason it declined) and the strongest attack. With ``out``: the results store (resumable,
    ``gradinv report`` renders it), ``audit.md``, ``audit.json`` and the strongest run under ``strongest/``.
    """
    cells = audit_cells(case, attacks=attacks, samples=samples, attack_settings=attack_settings)
    root = Path(out) if out is not None else Path(tempfile.mkdtemp(prefix="gradinv-audit-"))
    try:
        with Store(root) as store:
            records = run_cells(cells, store, resume=resume, progress=progress, cache=cache)
            store.set_meta(name="audit", grid={"case": case.to_dict(), "attacks": list(attacks), "samples": samples})
        failed = [r for r in records if r["status"] == "failed"]
        if failed:
            raise ConfigError(f"{failed[0]['attack']} failed on this configuration: {failed[0]['reason']}")
        rows = [_row(name, [r for r in records if r["attack"] == name]) for name in attacks]
        answered = [r for r in rows if r["psnr_median"] is not None]
        strongest = max(answered, key=lambda r: r["psnr_median"])["attack"] if answered else None
        result = {"config": {**case.to_dict(), "samples": samples}, "rows": rows, "strongest": strongest}
        if out is not None:
            _write(root, result, records)
        return result
    finally:
        if out is None:
            shutil.rmtree(root, ignore_errors=True)


def _row(name: str, runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    ok = [r for r in runs if r["status"] == "ok"]

    def values(key: str) -> list[float]:
        return [r[key] for r in ok if r.get(key) is not None]

    psnr, ssim, labels, found = (
        values("psnr"),
        values("ssim"),
        values("label_accuracy"),
        values("recovered_fraction_40db"),
    )
    declined = next((r["reason"] for r in runs if r["status"] == "declined"), None)
    return {
        "attack": name,
        "runs": len(ok),
        "psnr_median": statistics.median(psnr) if psnr else None,
        "psnr_best": max(psnr) if psnr else None,
        "ssim_median": statistics.median(ssim) if ssim else None,
        "label_accuracy": statistics.fmean(labels) if labels else None,
        "recovered_fraction_40db": statistics.fmean(found) if found else None,
        "seconds_median": statistics.median(values("seconds")) if ok else None,
        "declined": declined if not ok else None,
    }


def _write(root: Path, result: Mapping[str, Any], records: Sequence[Mapping[str, Any]]) -> None:
    scored = [r for r in records if r["attack"] == result["strongest"] and r.get("psnr") is not None]
    if scored:
        top = max(scored, key=lambda r: r["psnr"])
        strongest = root / "strongest"
        strongest.mkdir(parents=True, exist_ok=True)
        write_json_atomic(top, strongest / "metrics.json")
        if top.get("image"):
            with atomic_path(strongest / "reconstruction.png") as tmp:
                shutil.copyfile(root / top["image"], tmp)
    write_json_atomic(result, root / "audit.json")
    with atomic_path(root / "audit.md") as tmp:
        Path(tmp).write_text(markdown(result))


def _protocol_text(protocol: Mapping[str, Any]) -> str:
    if protocol["name"] != "fedavg":
        return protocol["name"]
    return f"fedavg ({protocol.get('local_steps')} local steps)"


def markdown(result: Mapping[str, Any]) -> str:
    """The audit as a short Markdown report: the configuration, one row per attack, the verdict."""
    c = result["config"]
    lines = [
        f"Audit: {c['model']} on {c['data']}, batch {c['batch_size']}, {_protocol_text(c['protocol'])}"
        + (f", {c['clients']} clients aggregated" if c["clients"] > 1 else "")
        + f", defenses: {', '.join(c['defenses']) or 'none'}; {c['samples']} client batches",
        "",
        "| attack | PSNR dB (median) | PSNR dB (best) | SSIM | recovered > 40 dB | label acc. | s per run |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]

    def f(v: float | None, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    for r in result["rows"]:
        if r["declined"]:
            lines.append(f"| {r['attack']} | declined: {r['declined']} | | | | | |")
            continue
        lines.append(
            f"| {r['attack']} | {f(r['psnr_median'], '.1f')} | {f(r['psnr_best'], '.1f')} | "
            f"{f(r['ssim_median'], '.3f')} | {f(r['recovered_fraction_40db'], '.0%')} | "
            f"{f(r['label_accuracy'], '.2f')} | {f(r['seconds_median'], '.1f')} |"
        )
    best = next((r for r in result["rows"] if r["attack"] == result["strongest"]), None)
    lines.append("")
    if best is None:
        lines.append("No attack ran on this configuration.")
    else:
        lines.append(
            f"Strongest attack: {best['attack']}, median PSNR {best['psnr_median']:.1f} dB "
            f"(best {best['psnr_best']:.1f} dB, SSIM {best['ssim_median']:.3f}, "
            f"{f(best['recovered_fraction_40db'], '.0%')} of samples above 40 dB); labels recovered "
            + ("-" if best["label_accuracy"] is None else f"{100 * best['label_accuracy']:.0f}%")
            + "."
        )
    return "\n".join(lines) + "\n"
