"""DAGER (Petrov, Dimitrov, Baader, Müller, Vechev, "DAGER: Exact Gradient Inversion for Large Language Models",
NeurIPS 2024) and the token-set leak (Melis, Song, De Cristofaro, Shmatikov, IEEE S&P 2019) on the bundled
English text.

Case: the registered ``gpt2-tiny`` at its defaults (width 768, 2 layers, 12 heads, 64 positions, untied head,
untrained: weights of model seed 0), the bundled text (``load_text("text")``, word tokenizer, vocabulary 5,000),
sequences of 16 tokens, next-token loss, FedSGD, one client, no padding. Client batches are seeds of the data
(``Seeds(model=0).vary(seed)``). Every attack run goes through the experiments layer (``Case`` + ``run_cell``,
scored there with ROUGE and token accuracy after the optimal matching of sequences); the token-set leak and the
span diagnostics read the observation of ``build_client``. DAGER runs at its default settings (τ₁ 1e-5, τ₂ 1e-3,
the last token from the output head).

1. DAGER at batch 1, 8 and 32: ROUGE-1/2, token accuracy, exact-sequence rate, attack seconds per batch.
2. Where recovery breaks as ``B·L`` approaches the width: L = 16, B from 32 to 64. Beside each run, the span
   diagnostics (cheap, also for a run cut by the timeout): the two attention gradients' ranks, the input rank,
   the ``rank_saturated`` flag as DAGER computes it, the largest span distance of the batch's own layer inputs
   (layer 1 at positions 0..L-2, layer 2 of every true prefix) and the smallest of sampled wrong ones (tokens
   outside the batch for layer 1, true prefixes extended by a wrong batch token for layer 2). DAGER's search keeps
   exactly the true prefixes when the true distances are under τ and the wrong ones above.
3. The token-set leak (``token_leak.token_set``, default threshold) from the FedSGD update at batch 1, 8, 32:
   recall of the batch's token set (over all its tokens, and over the tokens at input positions 0..L-2, the only
   ones whose embedding row can receive gradient under next-token loss) and precision.
4. DAGER under Gaussian noise on the update (``noise:STD``, absolute; the levels are set against the clean
   update's RMS entry, reported) and under DP-SGD (``dpsgd``: its default sigma 1, clip 1, and clipping alone,
   sigma 0), batch 1 and 8.

Each DAGER run is cut after ``--timeout`` seconds (a SIGALRM inside the run; the row then says ``timeout``). A
run that fails is recorded with its traceback and the benchmark goes on. Timings are wall-clock seconds on
``--threads`` threads.

Writes OUT/dager.{json,md} (default OUT: bench/results). ``--quick``: batch 1 (and the leak at 1 and 8), the
span diagnostics at B = 64 without the attack, one noise level and DP-SGD, one client batch; under a minute.
``--reuse batches,break,leak,defenses``: take those sections' rows from the existing OUT/dager.json instead of
running them again (the table header says which), e.g. to re-measure one section after a change that touches only
it.
Usage: python bench/dager.py [--threads 2] [--quick] [--timeout 900] [--reuse SECTIONS]
"""

# ruff: noqa: E402  (OMP_WAIT_POLICY is set before torch is imported)
from __future__ import annotations

import os

# Before torch loads its OpenMP runtime: threads that sleep instead of spinning while they wait. On a machine
# shared with other jobs, MKL's float64 SVD of a 2304 x 768 gradient took 24 s on 2 spinning threads against
# 0.6 s on 1 (or on 2 passive ones); DAGER takes three such SVDs per run. An OMP_WAIT_POLICY already set wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import dataclasses
import json
import signal
import statistics
import time
import traceback
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from _common import fmt, parser, setup, write_results
from gradinv.attacks.dager import (
    DagerSettings,
    attention_gradient,
    input_rank,
    module_input,
    second_attention_names,
    span_basis,
)
from gradinv.attacks.token_leak import DEFAULT_THRESHOLD, target_token_set, token_set
from gradinv.experiments import Case, Cell, ModelCache, Seeds, build_client, run_cell
from gradinv.experiments.case import Client
from gradinv.fl.functional import stateless_twin
from gradinv.models.transformer import text_model_spec

MODEL, DATA, SEQ_LEN, VOCAB = "gpt2-tiny", "text", 16, 5000
BATCHES = {1: 3, 8: 3, 32: 2}  # batch -> client batches (seeds 0..n-1)
BREAK_BATCHES = (32, 40, 44, 47, 48, 52, 53, 56, 64)  # seed 0 each; B·L from 512 to 1024 against width 768
LEAK_BATCHES = {1: 3, 8: 3, 32: 3}
NOISE = (1e-5, 1e-4, 1e-3, 1e-2)
DPSGD = ("dpsgd", "dpsgd:noise_multiplier=0,clip=1")
DEFENSE_BATCHES = {1: 3, 8: 3}
WRONG_SAMPLES = 512  # sampled wrong layer inputs per span diagnostic
TIMEOUT = 900.0
SPAN_LAST = (("last_token", "span"),)  # retried with it when the default declines (the head step failed)


def text_case(batch: int, seed: int, defenses: Sequence[str] = ()) -> Case:
    return Case(
        model=MODEL,
        data=DATA,
        seq_len=SEQ_LEN,
        vocab_size=VOCAB,
        batch_size=batch,
        defenses=tuple(defenses),
        seeds=Seeds(model=0).vary(seed),
    )


# -- one DAGER run, cut by a timeout ---------------------------------------------------------------------------


class RunTimeout(BaseException):
    """Raised inside a run when its time is up (a BaseException, so no ``except Exception`` swallows it)."""


@contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    def expire(_signum: int, _frame: Any) -> None:
        raise RunTimeout

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


DETAILS = (
    "rank_layer1",
    "rank_layer2",
    "input_rank",
    "rank_saturated",
    "tokens_scanned",
    "candidates_per_position",
    "relaxed_positions",
    "prefix_relaxed_positions",
    "prefix_capped_positions",
    "last_token_source",
    "last_tokens_guessed",
    "sequences_found",
)


def dager_run(
    case: Case,
    cache: ModelCache,
    *,
    timeout: float,
    compare_clean: bool = False,
    settings: tuple[tuple[str, Any], ...] = (),
    defense: str = "none",
) -> dict[str, Any]:
    """One DAGER cell: its scores, seconds and DAGER's diagnostics; ``status`` ok, declined, failed, timeout or
    crashed (an exception outside gradinv's errors: the traceback is kept). ``defense``: its name in tables."""
    row: dict[str, Any] = {
        "batch": case.batch_size,
        "seq_len": case.seq_len,
        "seed": case.seed,
        "defense": defense,
        "defenses": [d.spec() for d in case.defenses],
        "settings": dict(settings),
    }
    start = time.perf_counter()
    try:
        with time_limit(timeout):
            r = run_cell(Cell(case, "dager", settings), cache=cache, compare_clean=compare_clean).record
    except RunTimeout:
        row.update(status="timeout", reason=f"cut after {timeout:g} s", seconds_total=time.perf_counter() - start)
        return row
    except Exception as exc:  # noqa: BLE001 - a crash of the attack is a finding: keep it and go on
        row.update(
            status="crashed",
            reason=f"{type(exc).__name__}: {exc}",
            traceback=traceback.format_exc(),
            seconds_total=time.perf_counter() - start,
        )
        return row
    row.update(
        status=r.status,
        reason=r.reason,
        rouge1=r.rouge1,
        rouge2=r.rouge2,
        rougeL=r.rougeL,
        token_accuracy=r.token_accuracy,
        exact=r.exact,
        seconds=r.seconds,
        seconds_total=r.seconds_total,
        update_cosine=r.update_cosine,
        dp_epsilon=r.dp_epsilon,
        **{k: r.details[k] for k in DETAILS if k in r.details},
    )
    return row


def show(row: dict[str, Any]) -> str:
    if row["status"] != "ok":
        return f"{row['status']} ({row.get('reason')}) after {row['seconds_total']:.0f} s"
    return (
        f"R1 {row['rouge1']:.3f} R2 {row['rouge2']:.3f} acc {row['token_accuracy']:.3f} exact {row['exact']:.3f}, "
        f"{row['seconds']:.1f} s, ranks {row.get('rank_layer1')}/{row.get('rank_layer2')}, "
        f"saturated {row.get('rank_saturated')}"
    )


# -- span diagnostics ------------------------------------------------------------------------------------------


def span_diagnostics(client: Client, *, samples: int, seed: int) -> dict[str, Any]:
    """The spans DAGER reads and how well they separate the batch's own layer inputs from wrong ones (module
    docstring, section 2), computed with DAGER's own span functions at its defaults."""
    obs = client.observation
    spec = text_model_spec(obs.model)
    tokens = client.truth.inputs.cpu()
    batch, length = tokens.shape
    params = {k: v.detach() for k, v in obs.parameters.items()}
    buffers = {k: v.detach() for k, v in obs.buffers.items()}
    dtype = obs.update[spec.first_attention[0]].dtype
    names2 = second_attention_names(spec)
    span1 = span_basis(
        attention_gradient(obs.update, spec.first_attention), source_dtype=dtype, max_rank=batch * length
    )
    span2 = span_basis(attention_gradient(obs.update, names2), source_dtype=dtype, max_rank=batch * length)
    space = input_rank(spec, params, source_dtype=dtype)
    g = torch.Generator().manual_seed(seed)
    scored = length - 1  # input positions 0..L-2 (the last one leaves no trace in the spans)
    with torch.no_grad():
        positions = torch.arange(scored).repeat(batch)
        d1_true = span1.distance(spec.layer_inputs(tokens[:, :scored].reshape(-1), positions, params))
        outside = torch.ones(int(spec.vocab_size), dtype=torch.bool)
        outside[tokens.unique()] = False
        others = torch.nonzero(outside)[:, 0]
        picks = others[torch.randint(others.numel(), (samples,), generator=g)]
        d1_other = span1.distance(spec.layer_inputs(picks, torch.randint(scored, (samples,), generator=g), params))
        twin = stateless_twin(obs.model, train_mode=obs.train_mode)
        layer2 = module_input(twin, params, buffers, names2[0].rpartition(".")[0])
        z2 = layer2(tokens)  # causal: position p's input depends on the prefix 0..p only
        d2_true = span2.distance(z2[:, :scored].reshape(-1, z2.shape[-1]))
        # wrong extensions: a true prefix 0..p-1 followed by another token of the batch that no true sequence
        # has there after that prefix
        prefixes = {tuple(row[: p + 1]) for row in tokens.tolist() for p in range(scored)}
        pool = tokens.unique()
        wrong: dict[int, list[list[int]]] = {}
        for _ in range(20 * samples):
            if sum(len(v) for v in wrong.values()) >= samples:
                break
            b = int(torch.randint(batch, (1,), generator=g))
            p = int(torch.randint(scored, (1,), generator=g))
            seq = tokens[b, : p + 1].tolist()
            seq[p] = int(pool[int(torch.randint(pool.numel(), (1,), generator=g))])
            if tuple(seq) not in prefixes:
                wrong.setdefault(p, []).append(seq)
        d2_wrong = torch.cat(
            [span2.distance(layer2(torch.tensor(seqs))[:, -1]) for seqs in wrong.values()]
            or [torch.ones(1, dtype=torch.float64)]
        )
    tau = DagerSettings()
    return {
        "rank_layer1": span1.rank,
        "rank_layer2": span2.rank,
        "input_rank": space,
        "rank_saturated": span1.rank >= space or span2.rank >= space,
        "layer1_true_max": float(d1_true.max()),
        "layer1_other_min": float(d1_other.min()),
        "layer1_other_pass": float((d1_other < tau.span_threshold).double().mean()),
        "layer2_true_max": float(d2_true.max()),
        "layer2_true_pass": float((d2_true < tau.prefix_threshold).double().mean()),
        "layer2_wrong_min": float(d2_wrong.min()),
        "layer2_wrong_pass": float((d2_wrong < tau.prefix_threshold).double().mean()),
        "wrong_samples": int(d2_wrong.numel()),
    }


# -- the token-set leak ----------------------------------------------------------------------------------------


def leak_run(case: Case, cache: ModelCache) -> dict[str, Any]:
    client = build_client(case, cache=cache)
    tokens = client.truth.inputs.cpu()
    start = time.perf_counter()
    found = set(token_set(client.observation).tolist())
    seconds = time.perf_counter() - start
    every = set(tokens.unique().tolist())
    reached = set(tokens[:, :-1].unique().tolist())  # input positions 0..L-2: the ones that reach the loss
    hit = found & every
    start = time.perf_counter()
    targets = set(target_token_set(client.observation).tolist())
    target_seconds = time.perf_counter() - start
    true_targets = set(tokens[:, 1:].unique().tolist())  # positions 1..L-1: the next-token targets
    union = found | targets
    return {
        "batch": case.batch_size,
        "seed": case.seed,
        "tokens": len(every),
        "tokens_reached": len(reached),
        "last_only": len(every - reached),
        "found": len(found),
        "recall_all": len(hit) / len(every),
        "recall_reached": len(found & reached) / len(reached),
        "precision": len(hit) / len(found) if found else None,
        "missed_last_only": len(every - reached - found),
        "seconds": seconds,
        "targets_found": len(targets),
        "targets_recall": len(targets & true_targets) / len(true_targets),
        "targets_precision": len(targets & true_targets) / len(targets) if targets else None,
        "union_recall_all": len(union & every) / len(every),
        "union_precision": len(union & every) / len(union) if union else None,
        "targets_seconds": target_seconds,
    }


def update_rms(case: Case, cache: ModelCache) -> float:
    update = build_client(case, cache=cache).observation.update
    total = sum(v.numel() for v in update.values())
    return float(torch.sqrt(sum(v.double().pow(2).sum() for v in update.values()) / total))


# -- tables ----------------------------------------------------------------------------------------------------


def mean(rows: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in rows if r.get(key) is not None]
    return statistics.mean(values) if values else None


def seconds_cell(rows: list[dict[str, Any]]) -> str:
    values = [r["seconds"] for r in rows if r.get("seconds") is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ({min(values):.1f}-{max(values):.1f})"


def statuses(rows: list[dict[str, Any]]) -> str:
    ok = sum(r["status"] == "ok" for r in rows)
    other = [f"{r['status']} (seed {r['seed']})" for r in rows if r["status"] != "ok"]
    return ", ".join([f"{ok}/{len(rows)} ok", *other])


def score_cells(rows: list[dict[str, Any]]) -> str:
    ok = [r for r in rows if r["status"] == "ok"]
    keys = ("rouge1", "rouge2", "token_accuracy", "exact")
    return " | ".join(fmt(mean(ok, k), ".3f") for k in keys)


def table_batches(rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| batch | B·L | client batches | ROUGE-1 | ROUGE-2 | token accuracy | exact | s / batch (mean, range) | "
        "rank layer 1 / 2 | candidates / position | tokens scanned |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for batch in sorted({r["batch"] for r in rows}):
        mine = [r for r in rows if r["batch"] == batch]
        ok = [r for r in mine if r["status"] == "ok"]
        ranks = ", ".join(f"{r['rank_layer1']}/{r['rank_layer2']}" for r in ok)
        cands = ", ".join(str(round(statistics.mean(r["candidates_per_position"][:-1]))) for r in ok)
        scanned = ", ".join(str(r["tokens_scanned"]) for r in ok)
        lines.append(
            f"| {batch} | {batch * SEQ_LEN} | {statuses(mine)} | {score_cells(mine)} | {seconds_cell(ok)} | "
            f"{ranks or '-'} | {cands or '-'} | {scanned or '-'} |"
        )
    return lines


def table_break(rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| B | B·L | B·(L-1) | rank layer 1 / 2 | input rank | rank_saturated | layer 1: true max / outside min | "
        "layer 2: true max / wrong min (wrong < τ₂) | DAGER | ROUGE-1 | exact | s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        d = r["diagnostics"]
        run = r["run"]
        flag = str(d["rank_saturated"])
        if run.get("rank_saturated") is not None and run["rank_saturated"] != d["rank_saturated"]:
            flag += f" (run: {run['rank_saturated']})"
        status = run["status"] if run["status"] != "ok" else "ok"
        seconds = run.get("seconds") if run["status"] == "ok" else run.get("seconds_total")
        lines.append(
            f"| {r['batch']} | {r['batch'] * SEQ_LEN} | {r['batch'] * (SEQ_LEN - 1)} | "
            f"{d['rank_layer1']} / {d['rank_layer2']} | {d['input_rank']} | {flag} | "
            f"{d['layer1_true_max']:.1e} / {d['layer1_other_min']:.1e} | "
            f"{d['layer2_true_max']:.1e} / {d['layer2_wrong_min']:.1e} ({d['layer2_wrong_pass']:.0%} of "
            f"{d['wrong_samples']}) | {status} | {fmt(run.get('rouge1'), '.3f')} | {fmt(run.get('exact'), '.3f')} | "
            f"{fmt(seconds, '.0f')} |"
        )
    return lines


def table_leak(rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| batch | client batches | distinct tokens | of them at positions 0..L-2 | only at position L-1 | "
        "found | recall (all tokens) | recall (positions 0..L-2) | precision | ms | head targets: recall / "
        "precision | embedding + head: recall (all tokens) / precision | ms (head) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for batch in sorted({r["batch"] for r in rows}):
        mine = [r for r in rows if r["batch"] == batch]
        lines.append(
            f"| {batch} | {len(mine)} | {mean(mine, 'tokens'):.1f} | {mean(mine, 'tokens_reached'):.1f} | "
            f"{mean(mine, 'last_only'):.1f} | {mean(mine, 'found'):.1f} | {mean(mine, 'recall_all'):.3f} | "
            f"{mean(mine, 'recall_reached'):.3f} | {fmt(mean(mine, 'precision'), '.3f')} | "
            f"{1000 * mean(mine, 'seconds'):.0f} | {fmt(mean(mine, 'targets_recall'), '.3f')} / "
            f"{fmt(mean(mine, 'targets_precision'), '.3f')} | {fmt(mean(mine, 'union_recall_all'), '.3f')} / "
            f"{fmt(mean(mine, 'union_precision'), '.3f')} | {fmt(1000 * (mean(mine, 'targets_seconds') or 0), '.0f')} |"
        )
    return lines


def table_defenses(
    rows: list[dict[str, Any]], rms: dict[int, float], diagnostics: dict[str, dict[str, Any]]
) -> list[str]:
    lines = [
        "| batch | defense | DAGER settings | std / clean RMS | update cosine | ε (δ 1e-5) | client batches | "
        "ROUGE-1 | ROUGE-2 | token accuracy | exact | s / batch | tokens scanned | relaxed positions (layer 1 / 2) | "
        "seed 0: layer 1 true max / outside min | seed 0: layer 2 true max / wrong min |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    keys = dict.fromkeys((r["batch"], r["defense"], tuple(r["settings"].items())) for r in rows)
    for batch, defense, settings in keys:
        mine = [
            r for r in rows if (r["batch"], r["defense"], tuple(r["settings"].items())) == (batch, defense, settings)
        ]
        ok = [r for r in mine if r["status"] == "ok"]
        ratio = f"{float(defense.split(':')[1]) / rms[batch]:.2g}" if defense.startswith("noise:") else "-"
        relaxed = ", ".join(
            f"{len(r.get('relaxed_positions', []))}/{len(r.get('prefix_relaxed_positions', []))}" for r in ok
        )
        scanned = ", ".join(sorted({str(r.get("tokens_scanned")) for r in ok}))
        shown = ", ".join(f"{k}={v}" for k, v in settings) or "defaults"
        d = diagnostics[f"{batch} {defense}"]
        lines.append(
            f"| {batch} | {defense} | {shown} | {ratio} | {fmt(mean(mine, 'update_cosine'), '.3f')} | "
            f"{fmt(mean(mine, 'dp_epsilon'), '.3g')} | {statuses(mine)} | {score_cells(mine)} | {seconds_cell(ok)} | "
            f"{scanned or '-'} | {relaxed or '-'} | {d['layer1_true_max']:.1e} / {d['layer1_other_min']:.1e} | "
            f"{d['layer2_true_max']:.1e} / {d['layer2_wrong_min']:.1e} |"
        )
    return lines


# -- main ------------------------------------------------------------------------------------------------------


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--timeout", type=float, default=TIMEOUT, help=f"seconds per DAGER run (default {TIMEOUT:g})")
    p.add_argument("--reuse", default="", help="sections to take from OUT/dager.json: batches, break, leak, defenses")
    args = p.parse_args()
    reuse = {name for name in args.reuse.split(",") if name}
    if reuse - {"batches", "break", "leak", "defenses"}:
        p.error(f"--reuse takes batches, break, leak, defenses; got {args.reuse!r}")
    run = {**setup(args), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}
    earlier = json.loads((Path(args.out) / "dager.json").read_text()) if reuse else {}
    quick = args.quick
    batches = {1: 1} if quick else BATCHES
    break_batches = (64,) if quick else BREAK_BATCHES
    leak_batches = {1: 1, 8: 1} if quick else LEAK_BATCHES
    noise = NOISE[2:3] if quick else NOISE
    dpsgd = DPSGD[:1] if quick else DPSGD
    defense_batches = {1: 1} if quick else DEFENSE_BATCHES
    cache = ModelCache()
    start = time.perf_counter()
    seconds: dict[str, float] = {}

    # 1. DAGER at batch 1, 8, 32
    t0 = time.perf_counter()
    batch_rows = list(earlier.get("batches", [])) if "batches" in reuse else []
    for batch, n in {} if "batches" in reuse else batches.items():
        for seed in range(n):
            row = dager_run(text_case(batch, seed), cache, timeout=args.timeout)
            batch_rows.append(row)
            print(f"[1] B {batch} seed {seed}: {show(row)}", flush=True)
    seconds["batches"] = time.perf_counter() - t0

    # 2. towards the width
    t0 = time.perf_counter()
    break_rows = list(earlier.get("break", [])) if "break" in reuse else []
    for batch in () if "break" in reuse else break_batches:
        case = text_case(batch, 0)
        diag = span_diagnostics(build_client(case, cache=cache), samples=WRONG_SAMPLES, seed=0)
        if quick:
            result: dict[str, Any] = {"status": "skipped (--quick)", "seconds_total": None}
        else:
            done = [r for r in batch_rows if r["batch"] == batch and r["seed"] == 0]
            result = done[0] if done else dager_run(case, cache, timeout=args.timeout)
        break_rows.append({"batch": batch, "diagnostics": diag, "run": result})
        print(
            f"[2] B {batch}: ranks {diag['rank_layer1']}/{diag['rank_layer2']} of {diag['input_rank']}, saturated "
            f"{diag['rank_saturated']}, layer 2 true max {diag['layer2_true_max']:.1e} wrong min "
            f"{diag['layer2_wrong_min']:.1e}; " + (result["status"] if quick else show(result)),
            flush=True,
        )
    seconds["break"] = time.perf_counter() - t0

    # 3. the token-set leak
    t0 = time.perf_counter()
    leak_rows = list(earlier.get("leak", [])) if "leak" in reuse else []
    for batch, n in {} if "leak" in reuse else leak_batches.items():
        for seed in range(n):
            row = leak_run(text_case(batch, seed), cache)
            leak_rows.append(row)
            print(
                f"[3] B {batch} seed {seed}: {row['found']} found of {row['tokens']} tokens, recall "
                f"{row['recall_all']:.3f} (positions 0..L-2: {row['recall_reached']:.3f}), precision "
                f"{row['precision']}",
                flush=True,
            )
    seconds["leak"] = time.perf_counter() - t0

    # 4. noise and DP-SGD
    t0 = time.perf_counter()
    if "defenses" in reuse:
        rms = {int(b): v for b, v in earlier["update_rms"].items()}
        defense_rows, defense_diagnostics = list(earlier["defenses"]), dict(earlier["defense_diagnostics"])
    else:
        rms = {
            b: statistics.mean(update_rms(text_case(b, s), cache) for s in range(n)) for b, n in defense_batches.items()
        }
        defense_rows, defense_diagnostics = [], {}
    for batch, n in {} if "defenses" in reuse else defense_batches.items():
        specs = [f"noise:{std:g}" for std in noise] + list(dpsgd)
        for spec in specs:
            client = build_client(text_case(batch, 0, (spec,)), cache=cache)
            diag = span_diagnostics(client, samples=WRONG_SAMPLES, seed=0)
            defense_diagnostics[f"{batch} {spec}"] = diag
            retry = []
            for seed in range(n):
                case = text_case(batch, seed, (spec,))
                row = dager_run(case, cache, timeout=args.timeout, compare_clean=True, defense=spec)
                defense_rows.append(row)
                print(f"[4] B {batch} {spec} seed {seed}: {show(row)}", flush=True)
                if row["status"] == "declined":
                    retry.append(case)
            for case in retry:  # the paper's reading of the last position, when the head step gave up
                row = dager_run(case, cache, timeout=args.timeout, compare_clean=True, settings=SPAN_LAST, defense=spec)
                defense_rows.append(row)
                print(f"[4] B {batch} {spec} seed {case.seed} last_token=span: {show(row)}", flush=True)
    seconds["defenses"] = time.perf_counter() - t0
    total = time.perf_counter() - start
    for name in reuse:  # the reused sections' own seconds, from the run that measured them
        seconds[name] = earlier["seconds"][name]

    crashed = [r for r in [*batch_rows, *(r["run"] for r in break_rows), *defense_rows] if r["status"] == "crashed"]
    tau = DagerSettings()
    lines = [
        f"DAGER and the token-set leak: {MODEL} at its defaults (width 768, 2 layers, 12 heads, 64 positions, "
        f"untied head, untrained, model seed 0), bundled English text (word tokenizer, vocabulary {VOCAB}), "
        f"{SEQ_LEN} tokens per sequence, next-token loss, FedSGD, one client; DAGER at its defaults (τ₁ "
        f"{tau.span_threshold:g}, τ₂ {tau.prefix_threshold:g}, last token from the output head); each run cut at "
        f"{args.timeout:g} s. {run['threads']} thread(s) (OMP_WAIT_POLICY={run['omp_wait_policy']}), {total:.0f} s "
        f"in all (DAGER at batch 1/8/32 {seconds['batches']:.0f} s, towards the width {seconds['break']:.0f} s, "
        f"token-set leak {seconds['leak']:.0f} s, defenses {seconds['defenses']:.0f} s). The machine was shared "
        "with other workers during the run: the seconds are indicative only."
        + (
            f" The sections {', '.join(sorted(reuse))} are the rows of an earlier run (--reuse; their seconds are that "
            "run's, not in the total)."
            if reuse
            else ""
        ),
        "",
        "DAGER at batch 1, 8 and 32 (scores: mean over the client batches; seconds: the attack alone; candidates: "
        "layer-1 candidates per position, mean over positions 0..L-2, per client batch):",
        "",
        *table_batches(batch_rows),
        "",
        f"Towards the width (L {SEQ_LEN}, client batch of seed 0; width 768). Span diagnostics with DAGER's own "
        "span functions: rank of the first and second attention layer's gradient, the rank the layer inputs fill "
        "(`rank_saturated` when a span reaches it), the largest relative span distance of the batch's own layer "
        "inputs (layer 1: its tokens at positions 0..L-2; layer 2: every true prefix) against the smallest of "
        f"{WRONG_SAMPLES} sampled wrong ones (layer 1: tokens outside the batch; layer 2: a true prefix extended by "
        f"a batch token no true sequence has there), and the share of wrong ones under τ₂ {tau.prefix_threshold:g}. "
        "DAGER column: the run's status (timeout: cut, no scores).",
        "",
        *table_break(break_rows),
        "",
        "Token-set leak (`token_leak.token_set`, relative row-norm threshold "
        f"{DEFAULT_THRESHOLD:g}) from the FedSGD update; counts are means over the client batches. Under the "
        "next-token loss the input at position L-1 reaches no scored output (its output is not scored, no earlier "
        "position attends to it), so a token that occurs only there leaves a zero embedding row: recall over all "
        "tokens misses exactly those, recall over the tokens at positions 0..L-2 is the leak's own. The output head's "
        "gradient fills that blind spot: `token_leak.target_token_set` reads the next-token targets (positions "
        "1..L-1) from the untied head's rows, and its union with the embedding's rows is the whole token set.",
        "",
        *table_leak(leak_rows),
        "",
        "DAGER under defenses (noise std absolute per entry; clean update RMS entry "
        + ", ".join(f"{rms[b]:.2e} at batch {b}" for b in rms)
        + "; DP-SGD: per-sample clipping to C and noise sigma·C on the sum, divided by B; update cosine against "
        "the clean update; relaxed positions: where no token passed τ₁ / no extension passed τ₂ and DAGER took "
        "the closest ones instead, per client batch; scores over the runs that finished ok (a declined run returns "
        "nothing); a run the default settings declined is run again with last_token=span, the paper's reading of "
        "every position from the spans; the span diagnostics of section 2 on the defended update of seed 0, with "
        "DAGER's rank rule, which under noise keeps B·L directions):",
        "",
        *table_defenses(defense_rows, rms, defense_diagnostics),
    ]
    if crashed:
        lines += ["", "Crashed runs:", ""]
        lines += [f"- B {r['batch']} seed {r['seed']} {r['defenses']}: {r['reason']}" for r in crashed]
    payload = {
        "case": text_case(1, 0).to_dict(),
        "dager_settings": dataclasses.asdict(DagerSettings()),
        "timeout": args.timeout,
        "quick": quick,
        "seconds": {**seconds, "total": total},
        "update_rms": rms,
        "batches": batch_rows,
        "break": break_rows,
        "leak": leak_rows,
        "defenses": defense_rows,
        "defense_diagnostics": defense_diagnostics,
    }
    write_results(args.out, "dager", run, payload, "\n".join(lines))


if __name__ == "__main__":
    main()
