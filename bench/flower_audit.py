"""The Flower integration, measured in Flower simulations (Ray backend): what the server-side audit sees under
gradinv's defense mods, what the defenses cost the federation, and what the audit costs the server.

1. Audit PSNR under the noise mod (3 strengths) and the prune mod (3 fractions) against no defense: 2 clients,
   1 round, FedSGD (one step of lr 0.1 on a batch of 1 digit, LeNet at 16 px), the audit running iDLG (50
   L-BFGS steps) on both clients' replies; the PSNR is against the truth the clients wrote, joined afterwards.
   The noise std is on the weight delta (= lr x the gradient's std, so 1e-3 here is 1e-2 on the gradient).
2. Utility: 2 clients, R rounds of FedAvg (5 local steps of lr 0.1 on a batch of 32 digits a round), under no
   defense and each defense at its middle strength (and sign compression): the global model's test accuracy on
   held-out digits, the wall time of the whole simulation and the bytes a client sends a round (Flower's
   ArrayRecord, dense float32) beside the bytes the defense's own encoding would need
   (``gradinv.defenses.round_bytes``: QSGD's levels, PowerSGD's factors, the kept entries and their indices...;
   a defense without an encoding prices every entry as a float32). The audit is off in these runs.
3. Audit overhead: the audit's seconds per audited round (from 1.) against the same round's time.

Each simulation starts Ray and two actors that import torch and gradinv (about 25-35 s on two shared cores); that
start-up is in the wall times. Usage: python bench/flower_audit.py [--rounds 10] [--out bench/results]
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

from _common import fmt, parser, setup, write_results
from gradinv.defenses import as_defense, round_bytes
from gradinv.experiments.case import Case, Seeds
from gradinv.integrations.flower import Federation, run_flower_demo

NOISE = ("noise:0.0001", "noise:0.001", "noise:0.01")
PRUNE = ("prune:0.5", "prune:0.9", "prune:0.99")
UTILITY = ((), ("noise:0.001",), ("prune:0.9",), ("sign",), ("quantize:4",), ("powersgd:2",))


def audit_psnr(root: Path) -> list[dict]:
    rows = []
    for defenses in [(), *((d,) for d in NOISE), *((d,) for d in PRUNE)]:
        out = root / ("psnr-" + ("none" if not defenses else defenses[0].replace(":", "-")))
        s = run_flower_demo(
            out=out,
            clients=2,
            rounds=1,
            batch_size=1,
            defenses=defenses,
            attacks=("idlg",),
            attack_settings={"idlg": {"iterations": 50}},
            num_cpus=2,
        )
        psnr = [r["psnr"] for r in s["audit"] if r.get("psnr") is not None]
        labels = [r["label_accuracy"] for r in s["audit"] if r.get("label_accuracy") is not None]
        rows.append(
            {
                "defense": defenses[0] if defenses else "none",
                "psnr_mean": statistics.fmean(psnr) if psnr else None,
                "psnr_per_client": psnr,
                "label_accuracy": statistics.fmean(labels) if labels else None,
                "audit_seconds": s["audit_seconds_per_round"].get("1"),
                "round_seconds": s["round_seconds"].get("1"),
                "wall_seconds": s["wall_seconds"],
            }
        )
        print(rows[-1], flush=True)
    return rows


def utility(root: Path, rounds: int) -> list[dict]:
    # the delta a defense mod transforms: the floating tensors of the demo's model (LeNet at 16 px)
    case = Case(model="lenet", data="digits", image_size=16, seeds=Seeds.all(0))
    state = Federation(case, 2, 32).build()["model"].state_dict()
    delta = {k: v for k, v in state.items() if v.is_floating_point()}
    rows = []
    for defenses in UTILITY:
        out = root / ("utility-" + ("none" if not defenses else defenses[0].replace(":", "-")))
        start = time.perf_counter()
        s = run_flower_demo(
            out=out,
            clients=2,
            rounds=rounds,
            batch_size=32,
            local_steps=5,
            lr=0.1,
            defenses=defenses,
            audit=False,
            num_cpus=2,
        )
        rounds_s = list(s["round_seconds"].values())
        rows.append(
            {
                "defense": defenses[0] if defenses else "none",
                "accuracy": s["accuracy"],
                "accuracy_initial": s["accuracy_initial"],
                "wall_seconds": time.perf_counter() - start,
                "round_seconds_median": statistics.median(rounds_s) if rounds_s else None,
                "bytes_per_client_per_round": s["bytes_per_client_per_round"],
                "encoded_bytes": round_bytes([as_defense(d) for d in defenses], delta),
            }
        )
        print(rows[-1], flush=True)
    return rows


def table(psnr: list[dict], util: list[dict], rounds: int) -> str:
    lines = [
        "# Flower integration: audit under defense mods, utility, overhead",
        "",
        "## 1. Audit PSNR under gradinv's defense mods (2 clients, FedSGD batch 1, LeNet 16 px, iDLG 50 steps)",
        "",
        "| client mod | audit PSNR dB (mean of 2 clients) | per client | labels right | audit s / round | round s |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in psnr:
        per = ", ".join(f"{p:.1f}" for p in r["psnr_per_client"])
        lines.append(
            f"| {r['defense']} | {fmt(r['psnr_mean'], '.1f')} | {per} | {fmt(r['label_accuracy'], '.0%')} | "
            f"{fmt(r['audit_seconds'], '.1f')} | {fmt(r['round_seconds'], '.1f')} |"
        )
    base = next(u for u in util if u["defense"] == "none")
    lines += [
        "",
        f"## 2. Utility: 2 clients, {rounds} rounds of FedAvg (5 local steps of lr 0.1, batch 32), audit off",
        "",
        "| client mod | test accuracy | vs none | wall s (with Ray start) | round s (median) | bytes/client/round "
        "(Flower, dense) | bytes its encoding needs |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for u in util:
        lines.append(
            f"| {u['defense']} | {fmt(u['accuracy'], '.3f')} | {u['accuracy'] - base['accuracy']:+.3f} | "
            f"{u['wall_seconds']:.1f} | {fmt(u['round_seconds_median'], '.2f')} | "
            f"{fmt(u['bytes_per_client_per_round'], ',.0f')} | {fmt(u.get('encoded_bytes'), ',.0f')} |"
        )
    lines.append(
        f"\nInitial (untrained) test accuracy {base['accuracy_initial']:.3f}. Flower sends the defended weights as "
        "dense float32 arrays (the ArrayRecord adds a little per tensor), so pruning, sign, quantisation and "
        "PowerSGD do not shrink the bytes by themselves; the last column is what the defense's own encoding "
        "(`gradinv.defenses.round_bytes`) would send, which a deployment needs its own serialisation (or a mod "
        "that packs it) to realise."
    )
    audit = [r["audit_seconds"] for r in psnr if r["audit_seconds"]]
    rnd = [r["round_seconds"] for r in psnr if r["round_seconds"]]
    plain = [u["round_seconds_median"] for u in util if u["round_seconds_median"]]
    lines += [
        "",
        "## 3. Audit overhead",
        "",
        f"The audit (label method + iDLG, 50 L-BFGS steps, on 2 batch-1 replies) took a median "
        f"{statistics.median(audit):.1f} s per audited round on the server ({min(audit):.1f}-{max(audit):.1f} s; "
        "a defended update makes L-BFGS run longer). Those audited rounds were the runs' first, median "
        f"{statistics.median(rnd):.1f} s including the Ray actors' start-up; an unaudited round of the utility "
        f"runs (after the first) took a median {statistics.median(plain):.2f} s, so the audit dominates a round "
        "it audits. Limit it with `Auditor(rounds=..., clients=..., max_clients=...)` (`--audit-rounds`, "
        "`--audit-clients`): unaudited rounds and clients add nothing beyond the bytes count.",
    ]
    return "\n".join(lines)


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--rounds", type=int, default=10, help="rounds of the utility runs (default 10)")
    args = p.parse_args()
    run = setup(args)
    with tempfile.TemporaryDirectory(prefix="gradinv-flower-bench-") as tmp:
        root = Path(tmp)
        rounds = 2 if args.quick else args.rounds
        util = utility(root, rounds)
        psnr = audit_psnr(root)
    write_results(
        args.out,
        "flower_audit",
        run,
        {"audit_psnr": psnr, "utility": util, "rounds": rounds},
        table(psnr, util, rounds),
    )


if __name__ == "__main__":
    main()
