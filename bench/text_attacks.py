"""TAG (Deng et al., Findings of EMNLP 2021) against LAMP (Balunović et al., NeurIPS 2022) on BertTiny (sequence
classifier, cross-entropy) and GPT2Tiny (causal LM, next-token loss), batch 1 and 4, bundled text sequences of 16
tokens (bundled word tokenizer, 5,000-token vocabulary).

Case: the attacked sequences are drawn (seed = sample index) from the *held-out* sentences of the bundled text
(:func:`gradinv.models.language.is_held_out`), which LAMP's language model prior never saw; the prior is the
bundled GPT2Tiny (:func:`~gradinv.models.language.bundled_language_model`, trained on the other sentences, cached;
its training time and held-out perplexity against a unigram baseline are recorded). The attacked models (width
``--width``, 2 layers, 2 heads) are either at initialisation or trained ``--trained-steps`` Adam steps (lr 1e-3,
batch 32) on the training sentences (BertTiny on the 2 topic-group classes, GPT2Tiny as a language model). FedSGD,
one client, labels unknown to the server (TAG optimises them, LAMP recovers them from the classifier's gradient),
B and L known. Each attack runs its defaults (TAG: 500 Adam steps; LAMP_cos: 400 steps, discrete steps every 20;
both with decoding restricted to the token-set leak where it applies). Scores after matching sequences
(Hungarian): ROUGE-1/2 F1, token accuracy, exact sequences; label accuracy for the classifier (as multisets: the
batch order is not recoverable); seconds per attack. Ablations: ``lamp-unrestricted`` is LAMP without the
restriction (its paper's default), ``lamp-no-prior`` that with alpha_lm = 0; ``tag-nearest`` and ``lamp-nearest``
decode each position to its nearest leaked token without the constraint that every leaked token is used.
``--defenses noise:1e-3 dpsgd ...`` runs every cell once more per client defense (through ``Scenario``, so the
defense acts as everywhere in gradinv); ``--models``, ``--batches``, ``--attacks`` choose the rows.
Writes OUT/NAME.{json,md} (default OUT: bench/results, NAME: text_attacks). Usage:
    python bench/text_attacks.py [--threads 2] [--samples 3] [--width 128] [--trained-steps 0 300] [--resume] [--quick]
        [--models bert-tiny,gpt2-tiny] [--batches 1 4] [--attacks tag,lamp,...]
        [--defenses none noise:1e-3] [--name text_attacks]
"""

from __future__ import annotations

import itertools
import json
import statistics
import time
from typing import Any

import torch
import torch.nn.functional as F

from _common import fmt, parser, setup, write_results
from gradinv.attacks.lamp import Lamp
from gradinv.attacks.tag import Tag
from gradinv.data.text import load_text
from gradinv.fl.scenario import Scenario
from gradinv.metrics.text import score_text
from gradinv.models.language import bundled_language_model, is_held_out, language_model_record
from gradinv.models.transformer import BertTiny, GPT2Tiny, next_token_loss
from gradinv.types import Observation

SEQ_LEN = 16
VOCAB = 5000
MODELS = ("bert-tiny", "gpt2-tiny")
BATCHES = (1, 4)
#: ablations: "lamp-no-prior" is LAMP with alpha_lm = 0 (its discrete steps then see the gradient distance only);
#: "-nearest" decodes each position to its nearest leaked token, without using every leaked token at least once
ATTACKS = ("tag", "lamp", "lamp-unrestricted", "lamp-no-prior", "tag-nearest", "lamp-nearest")


def build(kind: str, vocab: int, width: int, seed: int) -> torch.nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if kind == "gpt2-tiny":
            return GPT2Tiny(vocab, width=width, layers=2, heads=2)
        return BertTiny(vocab, width=width, layers=2, heads=2, num_classes=2)


def loss_of(model: torch.nn.Module, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    out = model(ids)
    return next_token_loss(out, ids) if out.dim() == 3 else F.cross_entropy(out, labels)


def train(model: torch.nn.Module, data: Any, train_rows: torch.Tensor, steps: int, seed: int) -> float:
    """Adam (lr 1e-3, batch 32) on the training sentences; the last loss."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    value = float("nan")
    for _ in range(steps):
        rows = train_rows[torch.randint(0, train_rows.numel(), (32,), generator=generator)]
        loss = loss_of(model, data.tokens[rows], data.labels[rows])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        value = float(loss.detach())
    return value


def observe(
    model: torch.nn.Module, ids: torch.Tensor, labels: torch.Tensor, *, defense: str | None = None, seed: int = 0
) -> Observation:
    """The server's view of one FedSGD round of the client, through :class:`~gradinv.Scenario` (so a defense acts
    as it does everywhere: ``noise:STD``, ``dpsgd:...``); labels unknown to the server."""
    is_lm = isinstance(model, GPT2Tiny)
    scenario = Scenario.from_tokens(
        model, ids, None if is_lm else labels, defenses=() if defense is None else (defense,), seed=seed
    )
    return scenario.observe()


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--samples", type=int, default=3, help="client batches per cell (default 3)")
    p.add_argument("--width", type=int, default=128, help="model width (default 128)")
    p.add_argument("--trained-steps", type=int, nargs="+", default=[0, 300], help="default: 0 300")
    p.add_argument("--resume", action="store_true", help="keep the finished runs of OUT/text_attacks.partial.jsonl")
    p.add_argument("--models", default=",".join(MODELS), help=f"default: {','.join(MODELS)}")
    p.add_argument("--batches", type=int, nargs="+", default=list(BATCHES), help="default: 1 4")
    p.add_argument("--attacks", default=",".join(ATTACKS), help=f"default: {','.join(ATTACKS)}")
    p.add_argument(
        "--defenses",
        nargs="+",
        default=["none"],
        help="client defenses, one run each (none, noise:STD, dpsgd:...); default: none",
    )
    p.add_argument("--name", default="text_attacks", help="results file name (default text_attacks)")
    args = p.parse_args()
    run = setup(args)
    samples, steps_list = args.samples, args.trained_steps
    models = [m for m in args.models.split(",") if m]
    attacks = [a for a in args.attacks.split(",") if a]
    defenses = [None if d == "none" else d for d in args.defenses]
    unknown = sorted((set(models) - set(MODELS)) | (set(attacks) - set(ATTACKS)))
    if unknown:
        p.error(f"unknown models or attacks: {', '.join(unknown)}")
    options: dict[str, dict[str, Any]] = {
        "tag": {},
        "lamp": {},
        "lamp-unrestricted": {"restrict_to_leaked": False},
        "lamp-no-prior": {"lm_weight": 0.0, "restrict_to_leaked": False},
        "tag-nearest": {"cover_leaked": False},
        "lamp-nearest": {"cover_leaked": False},
    }
    if args.quick:
        samples, steps_list = 1, [0]
        small = {"iterations": 4, "candidates": 3, "init_candidates": 2}
        options = {
            "tag": {"iterations": 4},
            "lamp": small,
            "lamp-unrestricted": {**small, "restrict_to_leaked": False},
            "lamp-no-prior": {**small, "lm_weight": 0.0, "restrict_to_leaked": False},
            "tag-nearest": {"iterations": 4, "cover_leaked": False},
            "lamp-nearest": {**small, "cover_leaked": False},
        }

    data = load_text("text", seq_len=SEQ_LEN, vocab_size=VOCAB)
    vocab = data.vocab_size
    held = torch.tensor([i for i, t in enumerate(data.texts) if is_held_out(t)])
    train_rows = torch.tensor([i for i, t in enumerate(data.texts) if not is_held_out(t)])
    start = time.perf_counter()
    prior = bundled_language_model(vocab)
    prior_seconds = time.perf_counter() - start
    prior_record = language_model_record(vocab)
    print(f"prior ready in {prior_seconds:.1f} s: {prior_record}", flush=True)

    partial = args.out / f"{args.name}.partial.jsonl"  # one line per finished run, so a killed run can resume
    rows: list[dict[str, Any]] = []
    if args.resume and partial.is_file():
        rows = [json.loads(line) for line in partial.read_text().splitlines() if line.strip()]
    elif partial.exists():
        partial.unlink()
    done = {(r["model"], r["trained_steps"], r["batch"], r["sample"], r["attack"], r.get("defense")) for r in rows}
    for kind in models:
        for steps in steps_list:
            for batch in args.batches:
                for sample in range(samples):
                    todo = [(n, d) for d in defenses for n in attacks if (kind, steps, batch, sample, n, d) not in done]
                    if not todo:
                        continue
                    model = build(kind, vocab, args.width, seed=sample)
                    train_loss = train(model, data, train_rows, steps, seed=sample) if steps else None
                    pick = held[torch.randperm(held.numel(), generator=torch.Generator().manual_seed(sample))[:batch]]
                    ids, labels = data.tokens[pick], data.labels[pick]
                    seen: dict[str | None, Observation] = {}
                    for name, defense in todo:
                        if defense not in seen:
                            seen[defense] = observe(model, ids, labels, defense=defense, seed=sample)
                        obs = seen[defense]
                        tag = name.startswith("tag")
                        attack = Tag(**options[name]) if tag else Lamp(prior=prior, **options[name])
                        t0 = time.perf_counter()
                        rec = attack.reconstruct(obs, seed=sample)
                        seconds = time.perf_counter() - t0
                        scores = score_text(rec.inputs, ids)
                        label_acc = None
                        if rec.labels is not None:  # as multisets: the batch order is not recoverable
                            counts = torch.bincount(rec.labels, minlength=2)[:2]
                            truth = torch.bincount(labels, minlength=2)[:2]
                            label_acc = float(torch.minimum(counts, truth).sum()) / batch
                        row = {
                            "model": kind,
                            "trained_steps": steps,
                            "train_loss": train_loss,
                            "batch": batch,
                            "attack": name,
                            "defense": defense,
                            "sample": sample,
                            **scores,
                            "label_accuracy": label_acc,
                            "seconds": seconds,
                            "restricted": rec.extras.get("restricted"),
                            "leaked_tokens": rec.extras.get("leaked_tokens"),
                            "truth": data.decode(ids),
                            "reconstruction": data.decode(rec.inputs),
                        }
                        rows.append(row)
                        with partial.open("a") as f:
                            f.write(json.dumps(row) + "\n")
                        print(
                            f"{kind} steps={steps} B={batch} {name} {defense or 'none'} #{sample}: "
                            f"R1 {scores['rouge1']:.3f} "
                            f"R2 {scores['rouge2']:.3f} acc {scores['token_accuracy']:.3f} {seconds:.1f}s",
                            flush=True,
                        )

    def mean(cell: list[dict[str, Any]], key: str) -> float | None:
        values = [r[key] for r in cell if r[key] is not None]
        return statistics.fmean(values) if values else None

    lines = [
        f"TAG vs LAMP, bundled held-out sentences of {SEQ_LEN} tokens, vocabulary {vocab}, width {args.width}, "
        f"{samples} client batches per row (means), {run['threads']} threads. Prior: GPT2Tiny trained in "
        f"{fmt((prior_record or {}).get('seconds'), '.0f')} s, held-out perplexity "
        f"{fmt((prior_record or {}).get('held_out_perplexity'), '.1f')} vs unigram "
        f"{fmt((prior_record or {}).get('unigram_perplexity'), '.1f')}.",
        "",
        "| model | trained steps | batch | defense | attack | ROUGE-1 | ROUGE-2 | token acc. | exact | label acc. | "
        "seconds |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    summary = []
    for kind, steps, batch, defense, name in itertools.product(models, steps_list, args.batches, defenses, attacks):
        cell = [
            r
            for r in rows
            if (r["model"], r["trained_steps"], r["batch"], r["attack"], r.get("defense"))
            == (kind, steps, batch, name, defense)
        ]
        if not cell:
            continue
        means = {k: mean(cell, k) for k in ("rouge1", "rouge2", "token_accuracy", "exact", "label_accuracy", "seconds")}
        summary.append(
            {"model": kind, "trained_steps": steps, "batch": batch, "defense": defense, "attack": name, **means}
        )
        lines.append(
            f"| {kind} | {steps} | {batch} | {defense or 'none'} | {name} | {fmt(means['rouge1'], '.3f')} | "
            f"{fmt(means['rouge2'], '.3f')} | {fmt(means['token_accuracy'], '.3f')} | "
            f"{fmt(means['exact'], '.2f')} | {fmt(means['label_accuracy'], '.2f')} | "
            f"{fmt(means['seconds'], '.1f')} |"
        )
    payload = {
        "seq_len": SEQ_LEN,
        "vocab_size": vocab,
        "width": args.width,
        "samples": samples,
        "trained_steps": steps_list,
        "prior": {"seconds_this_run": prior_seconds, "record": prior_record},
        "summary": summary,
        "runs": rows,
    }
    write_results(args.out, args.name, run, payload, "\n".join(lines))
    partial.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
