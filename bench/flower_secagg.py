"""Does Flower's SecAgg+ hide the clients from a closed-form attack? Measured in real Flower simulations.

To an attack, the aggregate of N FedSGD clients with batch B each is one batch of N·B samples (FedAvg weights
the clients by their B, so it is the gradient of the mean loss over all N·B). For every N in 2, 4, 8, 16 and B
in 1, 8, one round of FedSGD (one step of lr 0.1) runs twice through :func:`gradinv.integrations.flower.simulate`
(Ray backend): without SecAgg+ the audit (:class:`~gradinv.integrations.flower.AuditStrategy`) attacks each
client's own update and the table gives the mean over the clients; with SecAgg+ (Flower's ``SecAggPlusWorkflow``,
:class:`~gradinv.integrations.flower.LegacyAuditStrategy`) it attacks the unmasked aggregate as one batch of
N·B. A third row per cell attacks the mean of the clients' own updates (read from the truth they wrote in the
SecAgg+ run), i.e. the same aggregate in the clear: it separates what aggregation hides from what SecAgg+'s
quantisation (2^22 levels over [-8, 8], Flower's defaults) adds.

Attacks, on an MLP (hidden 256, 256) over the bundled digits at 16x16x3:

- ``rtf``, Robbing the Fed (Fowl et al. 2022) with 64 bins: the server sends the imprinted model as round 1's
  arrays, its thresholds fitted to its own held-out digits (the test split; ``case.server``). Its gain is
  ``1e-5`` (``imprint:bins=64,gain=1e-5``): the server knows it runs SecAgg+ and makes the imprint rows'
  update large against its quantisation step (the default gain 1e-3 guards only against float32 rounding).
- ``analytic`` (Phong et al. 2018), the honest server's closed form on the MLP's first layer: exact for one
  sample, rows fired by a single sample of a batch otherwise, with ``duplicate_tolerance=1e-2`` (rows within 1 %
  are one sample: the quantisation noise keeps the default 1e-3 from merging them).

Both adaptations are the server's choice, given the public fact that it runs SecAgg+; rows at B = 1 and N = 2, 4
with the defaults (gain 1e-3, tolerance 1e-3) show what the quantisation alone does to an attack not adapted.

Scores: each true image against its best recovered image (``score_recovered``), the mean of those PSNRs and the
share above 40 dB; ``ideal`` is the share of samples alone in their bin for 64 equal-mass bins, (1 - 1/64)^(n-1).
Seed 0 only (one batch per client). Ray gets 2 CPUs (one client actor per CPU). Usage:
python bench/flower_secagg.py [--quick] [--out bench/results]
"""

from __future__ import annotations

import logging
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from _common import fmt, parser, setup, write_results
from gradinv.attacks import build_attack
from gradinv.attacks.imprint import score_recovered
from gradinv.experiments.case import Case, Seeds
from gradinv.fl import FedSGD
from gradinv.integrations.flower import AGGREGATE, Auditor, Federation, evaluate_audit, simulate, train_config

MODEL, DATA, IMAGE_SIZE = "mlp", "digits", 16
LR = 0.1
BINS = 64
#: attack -> (the server that sends the model, the attack's settings): adapted to SecAgg+'s quantisation
ATTACKS = {
    "rtf": (f"imprint:bins={BINS},gain=1e-5", {}),
    "analytic": ("honest", {"duplicate_tolerance": 1e-2}),
}
#: the library's defaults (imprint gain 1e-3, duplicate tolerance 1e-3), and how a row names them
DEFAULTS = {"rtf": (f"imprint:bins={BINS}", {}), "analytic": ("honest", {})}
DEFAULT_NAMES = {"rtf": "gain 1e-3", "analytic": "tolerance 1e-3"}
DEFAULT_CLIENTS = (2, 4)
CLIENTS = (2, 4, 8, 16)
BATCHES = (1, 8)
CPUS = 2  # Ray's CPUs: one client actor each
THRESHOLD_DB = 40.0
CLEAR = "aggregate in the clear"


def ideal(samples: int) -> float:
    """The expected share of samples alone in their bin for ``BINS`` equal-mass bins."""
    return (1 - 1 / BINS) ** (samples - 1)


def _auditor(world: dict[str, Any], attack: str, settings: dict[str, Any], out: Path | None) -> Auditor:
    return Auditor(
        model=world["model"],
        input_shape=tuple(world["inputs"].shape[1:]),
        normalization=world["normalization"],
        attacks=(build_attack(attack, **settings),),
        out=out,
    )


def _truths(truth_dir: Path) -> list[dict[str, torch.Tensor]]:
    return [load_file(str(p)) for p in sorted((truth_dir / "round-001").glob("node-*.safetensors"))]


def in_the_clear(
    folder: Path, world: dict[str, Any], attack: str, settings: dict[str, Any], received: dict[str, torch.Tensor]
) -> dict:
    """The attack on the mean of the clients' own updates (their truth files): the aggregate without SecAgg+'s
    quantisation; and how far SecAgg+'s aggregate (``received``) is from it."""
    sent = load_file(str(folder / "audit" / "sent" / "round-001.safetensors"))
    truths = _truths(folder / "truth")
    mean = {k: sum(t[f"delta.{k}"] for t in truths) / len(truths) for k in sent if f"delta.{k}" in truths[0]}
    returned = {k: sent[k] + mean[k] if k in mean else sent[k] for k in sent}
    samples = sum(int(t["labels"].numel()) for t in truths)
    auditor = _auditor(world, attack, settings, None)
    config = dict(train_config(FedSGD(), lr=LR))
    observation = auditor.observation(sent, returned, config, samples, clients=len(truths))
    (record,) = auditor.audit(1, AGGREGATE, observation)
    images = torch.cat([t["images"] for t in truths])
    row: dict[str, Any] = {"status": record["status"], "reason": record["reason"], "samples": samples}
    if record["status"] == "ok":
        found = score_recovered(record["_images"], images, threshold_db=THRESHOLD_DB)
        row.update(psnr_best_match=float(found.psnr.mean()), recovered=found.fraction)
    else:
        row.update(psnr_best_match=None, recovered=0.0)
    row["audit_seconds"] = auditor.seconds.get(1)
    error = torch.cat([(received[k] - sent[k] - mean[k]).flatten() for k in mean])
    signal = torch.cat([mean[k].flatten() for k in mean])
    row["secagg_relative_error"] = float(error.norm() / signal.norm())
    row["secagg_max_error"] = float(error.abs().max())
    return row


def run(root: Path, *, attack: str, default: bool, clients: int, batch: int, secagg: bool, clear: bool) -> list[dict]:
    """One Flower simulation of one round; its row (and with ``clear`` the in-the-clear aggregate's row).
    ``default``: the library's default server and settings instead of the adapted ones."""
    server, settings = (DEFAULTS if default else ATTACKS)[attack]
    name = f"{attack}-{'default' if default else 'adapted'}-n{clients}-b{batch}"
    folder = root / (name + ("-secagg" if secagg else "-plain"))
    case = Case(model=MODEL, data=DATA, image_size=IMAGE_SIZE, server=server, seeds=Seeds.all(0))
    federation = Federation(case, clients, batch)
    world = federation.build()
    auditor = _auditor(world, attack, settings, folder / "audit")
    start = time.perf_counter()
    history = simulate(
        federation,
        auditor,
        protocol=FedSGD(),
        lr=LR,
        rounds=1,
        defenses=(),
        secagg=secagg,
        truth_dir=folder / "truth",
        seed=0,
        num_cpus=CPUS,
    )
    wall = time.perf_counter() - start
    records = evaluate_audit(folder / "audit", folder / "truth")
    ok = [r for r in records if r["status"] == "ok" and r.get("psnr_best_match") is not None]
    base = {"attack": attack, "default": default, "server": server, "settings": settings}
    base.update(clients=clients, batch=batch)
    row = {
        **base,
        "secagg": "on" if secagg else "off",
        "samples": clients * batch if secagg else batch,
        "attacked": len(records),
        "ok": len(ok),
        "reasons": sorted({r["reason"] for r in records if r["status"] != "ok"}),
        "psnr_best_match": statistics.fmean(r["psnr_best_match"] for r in ok) if ok else None,
        "psnr_per_record": [r.get("psnr_best_match") for r in records],
        # a declined or failed attack recovers nothing
        "recovered": statistics.fmean(r.get("recovered_fraction_40db") or 0.0 for r in records) if records else None,
        "audit_seconds": auditor.seconds.get(1),
        "accuracy": history["accuracy"],
        "accuracy_initial": history["accuracy_initial"],
        "wall_seconds": wall,
    }
    rows = [row]
    if clear:
        received = history["strategy"].received[1][0]
        clear_row = in_the_clear(folder, world, attack, settings, received)
        rows.append({**base, "secagg": CLEAR, "attacked": 1, **clear_row})
    for r in rows:
        shown = {k: r.get(k) for k in ("attack", "server", "clients", "batch", "secagg", "psnr_best_match")}
        print({**shown, "recovered": r.get("recovered"), "s": round(r.get("wall_seconds") or 0, 1)}, flush=True)
    return rows


def protection(rows: list[dict], attack: str, batch: int) -> str:
    """Where SecAgg+ starts to protect for one attack and batch: the first N at which the aggregate's recovered
    share falls below 50 % and below 10 %, against the clients' own updates."""
    cell = {(r["clients"], r["secagg"]): r for r in rows if r["attack"] == attack and r["batch"] == batch}
    on = [(n, cell[(n, "on")]["recovered"]) for n in CLIENTS if (n, "on") in cell]
    off = [cell[(n, "off")]["recovered"] for n in CLIENTS if (n, "off") in cell]
    below = {t: next((n for n, f in on if f < t), None) for t in (0.5, 0.1)}

    def say(t: float) -> str:
        n = below[t]
        if n is None:
            return f"never below {t:.0%} up to N = {on[-1][0]}"
        return f"below {t:.0%} from N = {n} (N·B = {n * batch})"

    shares = ", ".join(f"{f:.0%}" for _, f in on)
    clear = ", ".join(f"{cell[(n, CLEAR)]['recovered']:.0%}" for n, _ in on if (n, CLEAR) in cell)
    return (
        f"- `{attack}`, B = {batch}: recovered with SecAgg+ {shares} for N = {', '.join(str(n) for n, _ in on)} "
        f"(the same aggregate in the clear: {clear}; each client alone: {min(off):.0%}-{max(off):.0%}); "
        f"{say(0.5)}, {say(0.1)}."
    )


def table(rows: list[dict], seconds: float) -> str:
    lines = [
        "# Flower's SecAgg+ against closed-form attacks: per-client updates vs the aggregate",
        "",
        f"One round of FedSGD (lr {LR}) in a Flower simulation (flwr, Ray backend with {CPUS} CPUs), MLP (256, 256) "
        f"on digits at {IMAGE_SIZE}x{IMAGE_SIZE}x3, seed 0. `rtf`: Robbing the Fed, {BINS} bins, the imprinted "
        "model sent as round 1's arrays, thresholds fitted to the server's held-out digits, gain 1e-5. `analytic`: "
        "the honest server's closed form on the first layer, rows within 1 % taken as one sample (tolerance 1e-2). "
        "Both are chosen for SecAgg+'s quantisation (2^22 levels over [-8, 8], Flower's defaults); rows marked "
        "gain 1e-3 or tolerance 1e-3 use the library's defaults. SecAgg+ off: each client's own update attacked, "
        "mean over the N clients; on: the unmasked aggregate attacked as one batch of N·B; aggregate in the "
        "clear: the mean of the clients' own updates (what SecAgg+ computes, without its quantisation), attacked "
        "the same way, with the relative L2 distance of SecAgg+'s aggregate from it in the last column.",
        "",
        "Best-match PSNR: each true image against its best recovered image, mean over the images (and over the "
        f"clients); recovered: the share above {THRESHOLD_DB:.0f} dB (a declined attack counts 0). Ideal: the share "
        f"of samples alone in their bin for {BINS} equal-mass bins, (1 - 1/{BINS})^(n-1). Audit s: the audit's "
        "seconds for the round (all clients when off). Accuracy: the federation's test accuracy after the round.",
        "",
        "| attack | N | B | SecAgg+ | samples attacked | best-match PSNR dB | recovered > 40 dB | ideal (rtf) | "
        "audit s | test acc. after (before) | SecAgg+ vs clear (rel. L2) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        name = r["attack"] + (f" ({DEFAULT_NAMES[r['attack']]})" if r["default"] else "")
        samples = f"{r['samples']}" + (f" x {r['clients']} clients" if r["secagg"] == "off" else "")
        acc = "-" if r.get("accuracy") is None else f"{r['accuracy']:.3f} ({r['accuracy_initial']:.3f})"
        psnr = fmt(r.get("psnr_best_match"), ".1f")
        best = f"{ideal(r['samples']):.0%}" if r["attack"] == "rtf" else "-"
        if r.get("reasons") or r.get("reason"):
            psnr += " (declined/failed: " + "; ".join(r.get("reasons") or [r["reason"]]) + ")"
        lines.append(
            f"| {name} | {r['clients']} | {r['batch']} | {r['secagg']} | {samples} | {psnr} | "
            f"{fmt(r.get('recovered'), '.0%')} | {best} | "
            f"{fmt(r.get('audit_seconds'), '.2f')} | {acc} | {fmt(r.get('secagg_relative_error'), '.1e')} |"
        )
    main = [r for r in rows if not r["default"]]
    lines += ["", "## Where SecAgg+ starts to protect", ""]
    lines += [
        protection(main, attack, b)
        for attack in ATTACKS
        for b in BATCHES
        if any(r["attack"] == attack and r["batch"] == b for r in main)
    ]
    lines += ["", f"Total time {seconds / 60:.1f} min."]
    return "\n".join(lines)


def main() -> None:
    p = parser(__doc__)
    args = p.parse_args()
    settings = setup(args)
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    logging.getLogger("flwr").setLevel(logging.WARNING)
    clients, batches = ((2,), (1,)) if args.quick else (CLIENTS, BATCHES)
    start = time.perf_counter()
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="gradinv-flower-secagg-") as tmp:
        root = Path(tmp)
        for attack in ATTACKS:
            for batch in batches:
                for n in clients:
                    for on in (False, True):
                        rows += run(root, attack=attack, default=False, clients=n, batch=batch, secagg=on, clear=on)
            # the defaults under SecAgg+'s quantisation, where aggregation alone hides little
            for n in clients if args.quick else DEFAULT_CLIENTS:
                rows += run(root, attack=attack, default=True, clients=n, batch=1, secagg=True, clear=False)
    seconds = time.perf_counter() - start
    payload = {
        "model": MODEL,
        "image_size": IMAGE_SIZE,
        "lr": LR,
        "bins": BINS,
        "adapted": ATTACKS,
        "defaults": DEFAULTS,
        "ray_cpus": CPUS,
        "threshold_db": THRESHOLD_DB,
        "rows": rows,
        "seconds": seconds,
    }
    write_results(args.out, "flower_secagg", settings, payload, table(rows, seconds))


if __name__ == "__main__":
    main()
