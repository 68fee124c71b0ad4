"""The ``gradinv`` command line: flags -> a :class:`~gradinv.experiments.case.Case` (in one place,
:func:`case_from_args`) -> the experiments layer.

A user's mistake (unknown name, missing file, bad size...) is reported on one line with exit code 2, never as a
traceback, and nothing is written to ``--out`` unless the run succeeded. Heavy modules (torch, scipy) are imported
only when a command runs, so ``--help`` and ``--version`` answer at once.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gradinv.errors import ConfigError, GradinvError

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage mistake on one line with exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"gradinv: error: {message} (see `{self.prog} --help`)\n")
        sys.exit(EXIT_USAGE)


def _int_at_least(minimum: int):
    """An argparse type for integers >= ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {value}")
        return value

    return parse


_positive = _int_at_least(1)
_nonneg = _int_at_least(0)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _names(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"expected comma-separated names, got {text!r}")
    return names


def _int_list(text: str) -> list[int]:
    return [_nonneg(t) for t in _names(text)]


def _scalar(text: str) -> int | float | str:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _key_value(text: str) -> tuple[str, object]:
    """``KEY=VALUE`` for a model's builder or an attack's settings; a comma-separated VALUE becomes a tuple
    (``channels=12,36,4``)."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip() or not value.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (e.g. activation=sigmoid), got {text!r}")
    parts = [_scalar(v.strip()) for v in value.split(",")]
    return key.strip(), tuple(parts) if "," in value else parts[0]


def _add_key_values(p: argparse.ArgumentParser, flag: str, help: str) -> None:
    dest = flag.removeprefix("--").replace("-", "_") + "s"
    p.add_argument(flag, dest=dest, type=_key_value, action="append", default=[], metavar="KEY=VALUE", help=help)


def _add_model_options(p: argparse.ArgumentParser) -> None:
    _add_key_values(
        p,
        "--model-option",
        "an option of the model's builder, repeatable (e.g. activation=sigmoid, channels=12,36,4,36,64,128)",
    )


def _add_case_options(p: argparse.ArgumentParser, *, model: str, data: str) -> None:
    """The flags that describe a client and its observer: each maps to one field of the case."""
    p.set_defaults(default_model=model, default_data=data)
    p.add_argument("--model", help=f"model name (default {model}; text models such as gpt2-tiny: see `gradinv list`)")
    _add_model_options(p)
    p.add_argument(
        "--data",
        help=f"digits, photos, a folder of images or an .npz file (default {data}); for a text model: text, "
        "synthetic, a .txt file or a folder of .txt files (default text)",
    )
    p.add_argument("--image-size", type=_positive, help="image side in pixels (default 32)")
    p.add_argument("--seq-len", type=_positive, help="text models: tokens per sequence (default 16)")
    p.add_argument(
        "--vocab-size", type=_positive, help="text models: the tokenizer's largest vocabulary (default 5000)"
    )
    p.add_argument("--batch-size", type=_positive, help="client batch size (default 1)")
    p.add_argument("--seed", type=int, help="seed of model, data, defenses and attack (default 0)")
    p.add_argument("--trained-steps", type=_nonneg, default=0, help="train the model this many SGD steps first")
    p.add_argument("--train-data", default="digits", help="data for --trained-steps (default digits)")
    p.add_argument("--weights", type=Path, help="safetensors file with the model's parameters")
    p.add_argument("--num-classes", type=_positive, help="classes of the model (default: from the data)")
    p.add_argument("--local-steps", type=_positive, help="FedAvg: local SGD steps (default: FedSGD)")
    p.add_argument("--local-lr", type=_positive_float, help="FedAvg: local learning rate (default 0.1)")
    p.add_argument("--local-batch-size", type=_positive, help="FedAvg: local batch size (default: full batch)")
    p.add_argument(
        "--train-mode",
        action="store_true",
        help="client computes its update in train mode (BatchNorm uses the private batch's statistics)",
    )
    p.add_argument(
        "--clients",
        type=_positive,
        default=1,
        help="clients sharing the batch; the server sees only the mean of their updates (secure aggregation)",
    )
    p.add_argument(
        "--aggregation",
        choices=("mean", "ckks"),
        default="mean",
        help="how the clients' mean is formed: mean (in the clear) or ckks (TenSEAL CKKS encryption, only the sum "
        "decrypted; pip install gradinv[he])",
    )
    p.add_argument(
        "--defense",
        dest="defenses",
        action="append",
        default=[],
        metavar="SPEC",
        help="a client defense, repeatable, in the order they act: NAME, NAME:VALUE or NAME:KEY=VALUE,... "
        "(e.g. noise:0.01, dpsgd:noise_multiplier=1,clip=1, prune:0.9, soteria:0.6, mixup:2; see `gradinv list`)",
    )
    p.add_argument("--out", type=Path, help="output folder")


def _add_attack_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--iterations", type=_positive, help="attack iterations (default: the paper's)")
    p.add_argument("--restarts", type=_positive, help="random restarts of iterative attacks (default 1)")
    p.add_argument(
        "--patience",
        type=_positive,
        help="stop an iterative attack when its matching cost has not improved for this many iterations",
    )
    p.add_argument(
        "--time-budget", type=_positive_float, metavar="SECONDS", help="stop an iterative attack after this long"
    )
    _add_key_values(
        p, "--attack-option", "one of the attack's settings, repeatable (e.g. smooth=0.1 for copa, tv=0.01)"
    )


def _add_grid_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--executor", choices=("local", "process", "ray"), default="local", help="default local")
    p.add_argument("--workers", type=_positive, default=1, help="parallel workers (process, ray; default 1)")
    p.add_argument("--address", help="ray: the address of an existing cluster (default: start one here)")
    p.add_argument("--threads", type=_positive, help="torch threads per cell (default: the cores over the workers)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out, skipping finished cells")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="gradinv", description="Gradient inversion attacks on federated-learning updates.")
    from gradinv import __version__

    parser.add_argument("--version", action="version", version=f"gradinv {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    a = sub.add_parser("attack", help="attack one client's update and score the reconstruction")
    a.add_argument("name", metavar="NAME", help="the attack (see `gradinv list`)")
    _add_case_options(a, model="convnet", data="photos")
    _add_attack_options(a)
    a.add_argument("--update", type=Path, help="captured update (safetensors) to attack instead of a simulation")
    a.add_argument("--known-labels", action="store_true", help="the threat model gives the attacker the labels")
    a.add_argument(
        "--server",
        default="honest",
        help="honest (default) or a malicious server's modification: imprint[:BINS] (Robbing the Fed), trap[:SCALE]",
    )
    a.add_argument("--quiet", action="store_true", help="no progress bar")

    c = sub.add_parser("capture", help="simulate a client and save its model and update (safetensors)")
    _add_case_options(c, model="convnet", data="photos")
    c.add_argument("--quiet", action="store_true", help="print nothing but errors")

    lab = sub.add_parser("labels", help="recover the labels of simulated client batches and score them")
    lab.add_argument("method", metavar="METHOD", help="a label method (see `gradinv list`) or 'auto'")
    _add_case_options(lab, model="mlp", data="digits")
    lab.add_argument("--trials", type=_positive, default=10, help="batches to try, seeds seed.. (default 10)")
    lab.add_argument("--quiet", action="store_true", help="no per-trial lines")

    au = sub.add_parser("audit", help="does this client configuration leak? every applicable attack, strongest named")
    _add_case_options(au, model="convnet", data="photos")
    _add_attack_options(au)
    au.add_argument(
        "--attacks", type=_names, default=["analytic", "rgap", "invgrad"], help="default analytic,rgap,invgrad"
    )
    au.add_argument("--samples", type=_positive, default=2, help="client batches, seeds seed.. (default 2)")
    au.add_argument("--resume", action="store_true", help="continue the audit in --out, skipping finished runs")
    au.add_argument("--quiet", action="store_true", help="no progress bar")

    bench = sub.add_parser(
        "bench", help="benchmarks: `gradinv bench GRID.yaml --out DIR`, or the `labels` and `defenses` sweeps"
    )
    bench_sub = bench.add_subparsers(dest="bench", required=True, parser_class=_Parser)
    bg = bench_sub.add_parser("grid", help="run a grid file (also `gradinv bench GRID.yaml`)")
    bg.add_argument("grid", type=Path, metavar="GRID.yaml", help="the grid (see docs/grids.md)")
    bg.add_argument("--out", type=Path, required=True, help="the results folder (store, report.html, results.csv)")
    _add_grid_options(bg)

    bl = bench_sub.add_parser("labels", help="every label method x model x batch size: CSV, table and plot")
    bl.add_argument("--methods", type=_names, help="comma-separated label methods (default: all)")
    bl.add_argument(
        "--models", type=_names, default=["mlp", "convnet", "resnet18"], help="default mlp,convnet,resnet18"
    )
    bl.add_argument(
        "--batch-sizes", type=_int_list, default=[1, 2, 4, 8, 16, 32, 64, 128, 256], help="default 1,2,4,...,256"
    )
    bl.add_argument("--trained-steps", type=_int_list, default=[0, 300], help="model states to test (default 0,300)")
    bl.add_argument("--trials", type=_positive, default=10, help="batches per point (default 10)")
    bl.add_argument("--data", default="digits", help="data set of the real-data cases (default digits)")
    bl.add_argument(
        "--synthetic-classes",
        type=_nonneg,
        default=1000,
        help="classes of the synthetic case; 0 to skip (default 1000)",
    )
    bl.add_argument("--image-size", type=_positive, default=32, help="image side in pixels (default 32)")
    bl.add_argument("--seed", type=int, default=0, help="seed of models and batches (default 0)")
    bl.add_argument(
        "--out", type=Path, default=Path("runs/bench-labels"), help="output folder (default runs/bench-labels)"
    )
    _add_grid_options(bl)

    bd = bench_sub.add_parser("defenses", help="one attack undefended and under each --defense: table and picture")
    bd.add_argument("--attack", default="invgrad", help="the attack (default invgrad; see `gradinv list`)")
    _add_case_options(bd, model="convnet", data="photos")
    _add_attack_options(bd)
    bd.add_argument("--samples", type=_positive, default=2, help="client batches, seeds seed.. (default 2)")
    bd.add_argument(
        "--utility-steps",
        type=_nonneg,
        default=0,
        help="also train the model this many defended FedSGD rounds on digits and report its accuracy (default 0)",
    )
    _add_grid_options(bd)
    bd.set_defaults(out_default=Path("runs/bench-defenses"))

    rp = sub.add_parser("report", help="regenerate report.html and results.csv from a results folder")
    rp.add_argument("dir", type=Path, metavar="DIR", help="a folder a grid, audit or benchmark wrote")

    rr = sub.add_parser("reproduce", help="the field's headline results as a regression grid: paper vs ours")
    rr.add_argument("--scale", choices=("cpu", "paper"), default="cpu", help="cpu (default, ~30 min) or paper sizes")
    rr.add_argument("--only", type=_names, help="comma-separated entry names (see --list)")
    rr.add_argument("--list", action="store_true", help="list the entries and exit")
    rr.add_argument("--out", type=Path, default=Path("runs/reproduce"), help="results folder (default runs/reproduce)")
    _add_grid_options(rr)

    an = sub.add_parser("analyze", help="rank analysis: which layers' updates determine their inputs (R-GAP)")
    an.add_argument("--model", default="cnn6", help="model name (default cnn6; see `gradinv list`)")
    _add_model_options(an)
    an.add_argument("--image-size", type=_positive, default=32, help="image side in pixels (default 32)")
    an.add_argument("--channels", type=_positive, default=3, help="input channels (default 3)")
    an.add_argument("--num-classes", type=_positive, default=10, help="classes of the model (default 10)")
    an.add_argument("--numeric", action="store_true", help="also measure each layer's rank at a random probe")
    an.add_argument("--out", type=Path, help="write analysis.md and analysis.json here")

    sub.add_parser("list", help="list attacks, label methods, defenses, models and data sources")

    d = sub.add_parser("demo", help="a small audit of a default deployment: what leaks, and what a defense changes")
    d.add_argument("--out", type=Path, default=Path("runs/demo"), help="output folder (default runs/demo)")
    d.add_argument("--quiet", action="store_true", help="no progress bar")

    fd = sub.add_parser(
        "flower-demo", help="a simulated Flower federation with the audit on the server (pip install gradinv[flower])"
    )
    fd.add_argument("--clients", type=_positive, default=2, help="simulated clients (default 2; 2+ with --secagg)")
    fd.add_argument("--rounds", type=_positive, default=2, help="federated rounds (default 2)")
    fd.add_argument("--model", default="lenet", help="model name (default lenet; see `gradinv list`)")
    fd.add_argument("--data", default="digits", help="bundled data the clients shard (default digits)")
    fd.add_argument("--image-size", type=_positive, default=16, help="image side in pixels (default 16)")
    fd.add_argument("--batch-size", type=_positive, default=1, help="samples per client and round (default 1)")
    fd.add_argument(
        "--local-steps",
        type=_positive,
        default=1,
        help="1: FedSGD, one step of --lr; K > 1: FedAvg, K full-batch steps",
    )
    fd.add_argument("--lr", type=_positive_float, default=0.1, help="the clients' learning rate (default 0.1)")
    fd.add_argument(
        "--defense",
        dest="defenses",
        action="append",
        default=[],
        metavar="SPEC",
        help="an update defense run as a client mod, repeatable (noise:0.01, prune:0.9, sign)",
    )
    fd.add_argument("--secagg", action="store_true", help="Flower's SecAgg+: the audit sees only the aggregate")
    fd.add_argument(
        "--server",
        default="honest",
        help="honest, or a malicious server whose modified model is sent from round 1 (imprint:bins=64,gain=1e-5; "
        "trap); audit it with --attacks rtf / trap-weights",
    )
    fd.add_argument("--attacks", type=_names, default=["idlg"], help="audited attacks, comma-separated (default idlg)")
    fd.add_argument("--iterations", type=_positive, help="iterations of the audited attacks (default: the paper's)")
    fd.add_argument("--audit-rounds", type=_int_list, help="audit only these rounds, comma-separated (default all)")
    fd.add_argument("--audit-clients", type=_nonneg, help="audit at most this many clients a round (default all)")
    fd.add_argument("--seed", type=int, default=0, help="seed of model, data split, defenses and attacks (default 0)")
    fd.add_argument("--out", type=Path, required=True, help="output folder (audit.json, report.md, audit/, truth/)")
    return parser


# -- flags -> case ------------------------------------------------------------------------------------------------


def _given(args: argparse.Namespace, name: str) -> bool:
    return getattr(args, name, None) is not None


def case_from_args(args: argparse.Namespace, *, needs_data: bool = True):
    """The one mapping from command-line flags to a :class:`~gradinv.experiments.case.Case` (checked as it is
    built). With ``--update``, what the file records (protocol, batch size, image size, seeds) fills the flags
    that were not given, and a flag that contradicts the file is an error."""
    from gradinv.experiments.case import Case, Seeds, file_case
    from gradinv.fl import FedAvg, FedSGD

    update = getattr(args, "update", None)
    if not _given(args, "local_steps") and (_given(args, "local_lr") or _given(args, "local_batch_size")):
        raise ConfigError("--local-lr and --local-batch-size set FedAvg's local training: add --local-steps K")
    protocol = (
        FedAvg(
            local_steps=args.local_steps,
            lr=args.local_lr if _given(args, "local_lr") else 0.1,
            local_batch_size=args.local_batch_size,
        )
        if _given(args, "local_steps")
        else FedSGD()
    )
    from gradinv.models import TEXT_MODELS

    model = args.model or args.default_model
    text = model in TEXT_MODELS
    if text and _given(args, "image_size"):
        raise ConfigError(f"{model} is a text model: --image-size does not apply (use --seq-len)")
    data = args.data if _given(args, "data") else ("text" if text else args.default_data)
    if str(data).lower() == "none":
        if needs_data:
            raise ConfigError(f"{args.command} simulates clients, so it needs --data")
        data = None
    seed = args.seed if _given(args, "seed") else 0
    case = Case(
        model=model,
        model_options=dict(args.model_options),
        weights=args.weights,
        num_classes=args.num_classes,
        trained_steps=args.trained_steps,
        train_data=args.train_data,
        data=data,
        image_size=args.image_size or 32,
        seq_len=getattr(args, "seq_len", None),
        vocab_size=getattr(args, "vocab_size", None),
        batch_size=args.batch_size or 1,
        protocol=protocol,
        clients=args.clients,
        aggregation=args.aggregation,
        defenses=tuple(args.defenses),
        train_mode=args.train_mode,
        known_labels=getattr(args, "known_labels", False),
        server=getattr(args, "server", "honest"),
        update=update,
        seeds=Seeds.all(seed),
    )
    if update is not None:
        explicit = [n for n in ("batch_size", "image_size", "seq_len", "vocab_size") if _given(args, n)]
        explicit += ["protocol"] if _given(args, "local_steps") else []
        explicit += ["seeds"] if _given(args, "seed") else []
        explicit += ["train_mode"] if args.train_mode else []
        case = file_case(case, explicit=explicit)
    return case


#: flags that set an iterative attack's engine settings of the same name
_ENGINE_FLAGS = ("iterations", "restarts", "patience", "time_budget")


def _attack_settings(args: argparse.Namespace, attack: str) -> dict[str, Any]:
    """``--attack-option`` plus ``--iterations`` / ``--restarts`` / ``--patience`` / ``--time-budget``: a flag the
    attack has no setting for is an error, as the same ``--attack-option`` would be."""
    from gradinv.attacks import ATTACKS

    settings = dict(args.attack_options)
    fields = ATTACKS.lookup(attack).Settings.__dataclass_fields__
    for key in _ENGINE_FLAGS:
        value = getattr(args, key, None)
        if value is None:
            continue
        if key not in fields:
            raise ConfigError(f"{attack} has no --{key.replace('_', '-')} (it is not iterative): drop the flag")
        settings[key] = value
    return settings


def _check_out(out: Path | None) -> None:
    """A folder we can write into, checked before any work."""
    if out is None:
        return
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out '{out}' exists and is not a folder: choose a folder path")
    probe = out.absolute()
    while not probe.exists():
        probe = probe.parent
    try:  # the only sure test (root passes os.access everywhere, /proc refuses anyway): make and drop a folder
        if not probe.is_dir():
            raise NotADirectoryError(f"'{probe}' is a file")
        os.rmdir(tempfile.mkdtemp(prefix=".gradinv-probe-", dir=probe))
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise ConfigError(f"--out '{out}' cannot be written ({reason}): choose another folder") from None


# -- commands -----------------------------------------------------------------------------------------------------


def _cmd_attack(args: argparse.Namespace) -> int:
    from gradinv.experiments.runner import Cell, run_cell
    from gradinv.experiments.save import save_run

    _check_out(args.out)
    case = case_from_args(args, needs_data=args.update is None)
    cell = Cell(case, args.name, tuple(_attack_settings(args, args.name).items()))
    result = run_cell(cell, progress=not args.quiet, raise_errors=True)
    r = result.record
    if r.status == "declined":
        raise ConfigError(f"{args.name} does not apply to this case: {r.reason}")
    line = f"{r.attack} on {case.model}"
    if case.defenses:
        line += f" defended by {', '.join(d.name for d in case.defenses)}"
        line += f" (epsilon {r.dp_epsilon:.2f})" if r.dp_epsilon is not None else ""
    line += f": {r.seconds:.1f} s"
    if r.rouge1 is not None:
        line += (
            f", ROUGE-1 {r.rouge1:.3f}, ROUGE-2 {r.rouge2:.3f}, ROUGE-L {r.rougeL:.3f}, token accuracy "
            f"{r.token_accuracy:.3f}, exact {r.exact:.2f}"
        )
    if r.psnr is not None:
        line += f", PSNR {r.psnr:.2f} dB, SSIM {r.ssim:.3f}"
        if case.batch_size > 1:
            n = len(r.psnr_per_sample)
            line += f", {round(r.recovered_fraction_40db * n)}/{n} samples above 40 dB"
    if r.label_accuracy is not None:
        line += f", label accuracy {r.label_accuracy:.2f}"
    if args.out is not None:
        save_run(result, args.out)
        line += f" -> {args.out}/"
    print(line)
    return 0


def _cmd_capture(args: argparse.Namespace) -> int:
    from gradinv.experiments.case import build_client, capture_metadata
    from gradinv.experiments.save import save_capture

    if args.out is None:
        raise ConfigError("capture needs --out FOLDER to write the model and update into")
    _check_out(args.out)
    case = case_from_args(args)
    client = build_client(case)
    save_capture(args.out, case, client, metadata=capture_metadata(case, client))
    if not args.quiet:
        print(f"wrote {args.out}/weights.safetensors, update.safetensors and capture.json")
    return 0


def _cmd_labels(args: argparse.Namespace) -> int:
    from gradinv.experiments.labels import plot_counts, run_label_trials, save_trials, summarize

    _check_out(args.out)
    case = case_from_args(args)
    records = run_label_trials(case, [args.method], trials=args.trials)
    if not args.quiet:
        for r in records:
            got = f"recovered {r['labels_recovered']}" if r["status"] == "ok" else f"{r['status']}: {r['reason']}"
            print(f"  seed {r['seed']}: true {r['labels_true']} {got}")
    (row,) = summarize(records)
    line = f"{args.method} on {case.model}, {case.data}, batch {case.batch_size}: "
    if row["answered"]:
        line += (
            f"existence {row['existence']:.3f}, count {row['count']:.3f} over {row['answered']}/{row['trials']} "
            f"trials, {row['seconds_median'] * 1000:.1f} ms per recovery"
        )
    else:
        line += f"declined on every trial: {row['declined_reason']}"
    if args.out is not None:
        save_trials(records, [row], args.out, name="labels")
        plot_counts(records[:1], args.out / "labels.png")
        line += f" -> {args.out}/"
    print(line)
    return 0


def _cmd_audit(args: argparse.Namespace) -> int:
    from gradinv.experiments.audit import audit, markdown

    _check_out(args.out)
    case = case_from_args(args)
    result = audit(
        case,
        attacks=args.attacks,
        samples=args.samples,
        attack_settings=_audit_settings(args),
        out=args.out,
        resume=args.resume,
        progress=not args.quiet,
    )
    print(markdown(result), end="")
    if args.out is not None:
        print(f"-> {args.out}/audit.md, audit.json, strongest/ (gradinv report {args.out} for report.html)")
    return 0


def _audit_settings(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """``--iterations``/``--restarts``/``--attack-option`` for each audited attack that has the setting; a setting
    that no audited attack has is an error."""
    from gradinv.attacks import ATTACKS

    given = dict(args.attack_options)
    given.update({k: getattr(args, k) for k in _ENGINE_FLAGS if getattr(args, k, None) is not None})
    out: dict[str, dict[str, Any]] = {}
    for name in args.attacks:
        fields = ATTACKS.lookup(name).Settings.__dataclass_fields__
        mine = {k: v for k, v in given.items() if k in fields}
        if mine:
            out[name] = mine
    unused = sorted(set(given) - {k for mine in out.values() for k in mine})
    if unused:
        raise ConfigError(f"no audited attack ({', '.join(args.attacks)}) has the setting(s) {unused}: drop them")
    return out


def _cmd_bench(args: argparse.Namespace) -> int:
    return {"grid": _bench_grid, "defenses": _bench_defenses, "labels": _bench_labels}[args.bench](args)


def _grid_options(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "executor": args.executor,
        "workers": args.workers,
        "address": args.address,
        "threads": args.threads,
        "resume": args.resume,
        "progress": not args.quiet,
    }


def _bench_grid(args: argparse.Namespace) -> int:
    from gradinv.experiments.grid import load_grid, run_grid

    _check_out(args.out)
    grid = load_grid(args.grid)
    records = run_grid(grid, args.out, **_grid_options(args))
    counts = {s: sum(r["status"] == s for r in records) for s in ("ok", "declined", "failed")}
    print(
        f"{len(records)} cells ({counts['ok']} ok, {counts['declined']} declined, {counts['failed']} failed) -> "
        f"{args.out}/report.html, results.csv"
    )
    return 0


def _bench_defenses(args: argparse.Namespace) -> int:
    from gradinv.experiments.defenses import bench_defenses, markdown_table

    out = args.out or args.out_default
    _check_out(out)
    if not args.defenses:
        raise ConfigError("bench defenses needs at least one --defense SPEC (e.g. --defense noise:0.01)")
    specs, args.defenses = list(args.defenses), []
    case = case_from_args(args)
    result = bench_defenses(
        case,
        attack=args.attack,
        defenses=specs,
        samples=args.samples,
        attack_settings=_attack_settings(args, args.attack),
        utility_steps=args.utility_steps,
        out=out,
        **_grid_options(args),
    )
    print(markdown_table(result["config"], result["summary"]), end="")
    print(f"-> {out}/defenses.md, defenses.json, defenses.png, report.html")
    return 0


def _bench_labels(args: argparse.Namespace) -> int:
    from gradinv.attacks.labels import LABEL_METHODS, check_methods
    from gradinv.experiments.labels import bench_labels, plot_accuracy, save_trials

    _check_out(args.out)
    methods = args.methods or sorted(LABEL_METHODS)
    check_methods(methods, allow_auto=False)
    records, rows = bench_labels(
        methods=methods,
        models=args.models,
        batch_sizes=args.batch_sizes,
        trained_steps=args.trained_steps,
        trials=args.trials,
        data=args.data,
        synthetic_classes=args.synthetic_classes or None,
        image_size=args.image_size,
        seed=args.seed,
        out=args.out,
        **_grid_options(args),
    )
    save_trials(records, rows, args.out, name="labels")
    plot_accuracy(rows, args.out / "labels.png")
    print(f"{len(records)} recoveries over {len(rows)} points -> {args.out}/labels.csv, labels.md, labels.png")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from gradinv.experiments.grid import write_report_for

    html, csv = write_report_for(args.dir)
    print(f"-> {html}, {csv}")
    return 0


def _cmd_reproduce(args: argparse.Namespace) -> int:
    from gradinv.experiments.reproduce import ENTRIES, markdown, reproduce

    if args.list:
        for e in ENTRIES:
            print(f"  {e.name:<18} {e.paper}: {e.claim}")
        return 0
    _check_out(args.out)
    result = reproduce(scale=args.scale, only=args.only, out=args.out, **_grid_options(args))
    print(markdown(result), end="")
    print(f"-> {args.out}/reproduce.md, report.html")
    return 0


def _cmd_analyze(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from gradinv.analysis import analyze_model
    from gradinv.io import write_json_atomic
    from gradinv.models import MODELS, build_model

    if args.model not in MODELS:
        raise ConfigError(f"unknown model {args.model!r}: choose one of {', '.join(sorted(MODELS))}")
    _check_out(args.out)
    model = build_model(
        args.model,
        num_classes=args.num_classes,
        in_channels=args.channels,
        image_size=args.image_size,
        seed=0,
        **dict(args.model_options),
    )
    report = analyze_model(model, (args.channels, args.image_size, args.image_size), numeric=args.numeric)
    print(f"{args.model} on {args.channels}x{args.image_size}x{args.image_size} inputs, batch 1\n")
    print(report.table())
    if args.out is not None:
        from gradinv._atomic import atomic_path

        with atomic_path(args.out / "analysis.md") as tmp:
            tmp.write_text(report.table() + "\n")
        layers = [{**asdict(r), "verdict": r.verdict, "deficit": r.deficit} for r in report.layers]
        write_json_atomic(
            {
                "model": args.model,
                "model_options": dict(args.model_options),
                "recoverable": report.recoverable,
                "reason": report.reason,
                "copa": report.copa_count,
                "layers": layers,
            },
            args.out / "analysis.json",
        )
    return 0


def _table1_line(row: dict[str, str]) -> str:
    """An attack's survey Table 1 row, indented under its summary in ``gradinv list``."""
    parts = (row.get(k, "-") for k in ("initialisation", "objective", "optimiser", "priors"))
    return f"  {'':<14}   {' | '.join(parts)}"


def _cmd_list(args: argparse.Namespace) -> int:
    from gradinv.attacks import ATTACKS
    from gradinv.attacks.labels import LABEL_METHODS
    from gradinv.data import list_data_sources
    from gradinv.data.text import TEXT_SOURCES
    from gradinv.defenses import DEFENSES
    from gradinv.experiments.runner import reconstructs_tokens
    from gradinv.models import list_models, list_text_models

    print("attacks (survey Table 1 row: initialisation | objective | optimiser | priors):")
    for name in sorted(ATTACKS):
        attack = ATTACKS[name]
        print(f"  {name:<14} {attack.summary}")
        if attack.table1:
            print(_table1_line(attack.table1))
    from gradinv.attacks.cafe import TABLE1 as CAFE
    from gradinv.attacks.disaggregation import TABLE1 as DISAGGREGATION

    print("attacks on other observations (Python API; bench/cafe.py, bench/disaggregation.py):")
    for name, summary, row in (
        ("cafe", "CAFE (Jin et al. 2021): a large batch from many iterations of vertical FL", CAFE),
        (
            "disaggregate",
            "Gradient disaggregation (Lam et al. 2021): clients' updates from sums + counts",
            DISAGGREGATION,
        ),
    ):
        print(f"  {name:<14} {summary}")
        print(_table1_line(row))
    print("label methods (gradinv labels METHOD; labels:METHOD in a grid):")
    for name in sorted(LABEL_METHODS):
        m = LABEL_METHODS[name]
        kind = "counts" if m.gives_counts else "set"
        print(f"  {name:<13} [{kind}] {m.summary}")
    print("defenses (--defense NAME[:VALUE]):")
    for name in sorted(DEFENSES):
        d = DEFENSES[name]
        print(f"  {name:<10} [{d.stage}] {d.summary}")
    print("protocols (--local-steps; protocols: in a grid): fedsgd, fedavg:local_steps=K,lr=LR,local_batch_size=B")
    print("servers (--server): honest, imprint[:BINS] (Robbing the Fed), trap[:SCALE] (trap weights)")
    print("models:")
    for name, summary in list_models():
        print(f"  {name:<10} {summary}")
    print("data:")
    for name, summary in list_data_sources():
        print(f"  {name:<10} {summary}")
    print("  PATH       a folder of images (class sub-folders or flat) or an .npz file with images and labels")
    print("text models (--model; with --seq-len L, --vocab-size V):")
    for name, summary in list_text_models():
        print(f"  {name:<10} {summary}")
    print("text data (--data, for a text model):")
    for name, summary in TEXT_SOURCES.items():
        print(f"  {name:<10} {summary}")
    print("  PATH.txt   a UTF-8 text file; or a FOLDER of .txt files (flat: one class; class sub-folders)")
    text_attacks = sorted(name for name in ATTACKS if reconstructs_tokens(ATTACKS[name]))
    print(f"text attacks (on text models): {', '.join(text_attacks) if text_attacks else 'none registered'}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from gradinv.experiments.demo import run_demo

    _check_out(args.out)
    run_demo(out=args.out, progress=not args.quiet)
    return 0


def _cmd_flower_demo(args: argparse.Namespace) -> int:
    try:
        from gradinv.integrations.flower import markdown, run_flower_demo
    except ImportError as exc:
        raise ConfigError(f"flower-demo needs Flower ({exc}): pip install 'gradinv[flower]'") from None

    _check_out(args.out)
    settings = {a: {"iterations": args.iterations} for a in args.attacks} if args.iterations else None
    summary = run_flower_demo(
        out=args.out,
        clients=args.clients,
        rounds=args.rounds,
        model=args.model,
        data=args.data,
        image_size=args.image_size,
        batch_size=args.batch_size,
        local_steps=args.local_steps,
        lr=args.lr,
        defenses=tuple(args.defenses),
        secagg=args.secagg,
        attacks=tuple(args.attacks),
        attack_settings=settings,
        audit_rounds=args.audit_rounds,
        audit_clients=args.audit_clients,
        seed=args.seed,
        server=args.server,
    )
    print(markdown(summary), end="")
    print(f"-> {args.out}/audit.json, report.md")
    return 0


COMMANDS = {
    "attack": _cmd_attack,
    "capture": _cmd_capture,
    "labels": _cmd_labels,
    "audit": _cmd_audit,
    "bench": _cmd_bench,
    "report": _cmd_report,
    "reproduce": _cmd_reproduce,
    "analyze": _cmd_analyze,
    "list": _cmd_list,
    "demo": _cmd_demo,
    "flower-demo": _cmd_flower_demo,
}


def _argv(argv: Sequence[str] | None) -> list[str]:
    """``gradinv bench GRID.yaml ...`` is short for ``gradinv bench grid GRID.yaml ...``."""
    args = list(sys.argv[1:] if argv is None else argv)
    if (
        len(args) >= 2
        and args[0] == "bench"
        and args[1] not in ("grid", "labels", "defenses")
        and not args[1].startswith("-")
    ):
        args.insert(1, "grid")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``gradinv`` console script."""
    parser = build_parser()
    args = parser.parse_args(_argv(argv))
    try:
        return COMMANDS[args.command](args)
    except GradinvError as exc:
        sys.stderr.write(f"gradinv: error: {exc}\n")
        return EXIT_USAGE
    except KeyboardInterrupt:
        sys.stderr.write("gradinv: interrupted (finished cells are kept; rerun with --resume)\n")
        return 130
    except BrokenPipeError:  # output piped into a pager or `head` that closed early
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
