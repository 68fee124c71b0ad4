"""Does my deployment leak? Every applicable attack against one client configuration (model, data, batch
size, protocol, clients, defenses), on several client batches, with the strongest one named.

An attack whose assumptions the configuration breaks (R-GAP on a batch, the analytic inversion on a model
whose first layer is not linear with a bias) is reported as declined with its reason, not as a failure of
the attack. A thin loop over :func:`gradinv.experiment.run_attack`, so every option means what it means there.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from gradinv._atomic import atomic_path
from gradinv.attacks import ATTACKS
from gradinv.defenses import as_defense
from gradinv.errors import GradinvError
from gradinv.experiment import RunResult, run_attack, save_run
from gradinv.io import write_json_atomic

DEFAULT_ATTACKS = ("analytic", "rgap", "invgrad")


def audit(
    *,
    attacks: Sequence[str] = DEFAULT_ATTACKS,
    samples: int = 2,
    seed: int = 0,
    attack_settings: Mapping[str, Mapping[str, Any]] | None = None,
    out: Path | None = None,
    progress: bool = False,
    **client: Any,
) -> dict[str, Any]:
    """Run each of ``attacks`` on ``samples`` client batches (seeds ``seed``...) of the configuration
    ``client`` (the keyword options of :func:`~gradinv.experiment.run_attack`: model, data, batch_size,
    protocol, clients, defenses, ...). ``attack_settings`` maps an attack's name to its settings.

    Returns the rows (one per attack: median and best PSNR, SSIM, label accuracy, or the reason it declined)
    and the strongest attack; with ``out``, writes ``audit.md``, ``audit.json`` and the strongest attack's
    run (``metrics.json``, ``reconstruction.png``) under ``out/strongest``.
    """
    for name in attacks:
        ATTACKS.lookup(name)
    client["defenses"] = tuple(as_defense(d) for d in client.get("defenses", ()))
    settings = dict(attack_settings or {})
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(attacks) * samples, desc="audit", unit="run")
    rows, best_run = [], None
    for name in attacks:
        runs: list[RunResult] = []
        declined = None
        for s in range(seed, seed + samples):
            if bar is not None:
                bar.set_postfix_str(f"{name} seed {s}")
            try:
                runs.append(run_attack(name, seed=s, attack_settings=settings.get(name), **client))
            except GradinvError as exc:
                declined = str(exc)
            if bar is not None:
                bar.update(1)
        rows.append(_row(name, runs, declined))
        scored = [r for r in runs if r.metrics["psnr"] is not None]
        if scored:
            top = max(scored, key=lambda r: r.metrics["psnr"])
            if best_run is None or top.metrics["psnr"] > best_run.metrics["psnr"]:
                best_run = top
    if bar is not None:
        bar.close()
    answered = [r for r in rows if r["psnr_median"] is not None]
    strongest = max(answered, key=lambda r: r["psnr_median"])["attack"] if answered else None
    result = {"config": _config(client, samples, seed), "rows": rows, "strongest": strongest}
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        if best_run is not None:
            save_run(best_run, out / "strongest")
        write_json_atomic(result, out / "audit.json")
        with atomic_path(out / "audit.md") as tmp:
            Path(tmp).write_text(markdown(result))
    return result


def _row(name: str, runs: Sequence[RunResult], declined: str | None) -> dict[str, Any]:
    psnr = [r.metrics["psnr"] for r in runs if r.metrics["psnr"] is not None]
    ssim = [r.metrics["ssim"] for r in runs if r.metrics["ssim"] is not None]
    labels = [r.metrics["label_accuracy"] for r in runs if r.metrics["label_accuracy"] is not None]
    return {
        "attack": name,
        "runs": len(runs),
        "psnr_median": statistics.median(psnr) if psnr else None,
        "psnr_best": max(psnr) if psnr else None,
        "ssim_median": statistics.median(ssim) if ssim else None,
        "label_accuracy": statistics.fmean(labels) if labels else None,
        "seconds_median": statistics.median(r.metrics["seconds"] for r in runs) if runs else None,
        "declined": declined if not runs else None,
    }


def _config(client: Mapping[str, Any], samples: int, seed: int) -> dict[str, Any]:
    protocol = client.get("protocol")
    return {
        "model": client.get("model", "convnet"),
        "data": str(client.get("data", "photos")),
        "batch_size": client.get("batch_size", 1),
        "protocol": protocol.to_dict() if protocol is not None else {"name": "fedsgd"},
        "clients": client.get("clients", 1),
        "defenses": [d.spec() for d in client["defenses"]],
        "samples": samples,
        "seed": seed,
    }


def markdown(result: Mapping[str, Any]) -> str:
    """The audit as a short Markdown report: the configuration, one row per attack, the verdict."""
    c = result["config"]
    lines = [
        f"Audit: {c['model']} on {c['data']}, batch {c['batch_size']}, {c['protocol']['name']}"
        + (f" ({c['protocol'].get('local_steps')} local steps)" if c["protocol"]["name"] == "fedavg" else "")
        + (f", {c['clients']} clients aggregated" if c["clients"] > 1 else "")
        + f", defenses: {', '.join(c['defenses']) or 'none'}; {c['samples']} client batches",
        "",
        "| attack | PSNR dB (median) | PSNR dB (best) | SSIM | label acc. | s per run |",
        "| --- | --- | --- | --- | --- | --- |",
    ]

    def f(v: float | None, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    for r in result["rows"]:
        if r["declined"]:
            lines.append(f"| {r['attack']} | declined: {r['declined']} | | | | |")
            continue
        lines.append(
            f"| {r['attack']} | {f(r['psnr_median'], '.1f')} | {f(r['psnr_best'], '.1f')} | "
            f"{f(r['ssim_median'], '.3f')} | {f(r['label_accuracy'], '.2f')} | {f(r['seconds_median'], '.1f')} |"
        )
    best = next((r for r in result["rows"] if r["attack"] == result["strongest"]), None)
    lines.append("")
    if best is None:
        lines.append("No attack ran on this configuration.")
    else:
        lines.append(
            f"Strongest attack: {best['attack']}, median PSNR {best['psnr_median']:.1f} dB "
            f"(best {best['psnr_best']:.1f} dB, SSIM {best['ssim_median']:.3f}); labels recovered "
            + ("-" if best["label_accuracy"] is None else f"{100 * best['label_accuracy']:.0f}%")
            + "."
        )
    return "\n".join(lines) + "\n"
