"""The ``gradinv`` command line.

A user's mistake (unknown name, missing file, bad size...) is reported on one line with exit code 2,
never as a traceback, and nothing is written to ``--out`` unless the run succeeded.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

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


def _add_run_options(p: argparse.ArgumentParser, *, model: str, data: str) -> None:
    p.add_argument("--model", default=model, help=f"model name (default {model}; see `gradinv list`)")
    _add_model_options(p)
    p.add_argument("--data", default=data, help="digits, photos, a folder of images or an .npz file; 'none' to skip")
    p.add_argument("--image-size", type=_positive, default=32, help="image side in pixels (default 32)")
    p.add_argument("--batch-size", type=_positive, default=1, help="client batch size (default 1)")
    p.add_argument("--seed", type=int, default=0, help="seed for data, model and attack (default 0)")
    p.add_argument("--trained-steps", type=_nonneg, default=0, help="train the model this many SGD steps first")
    p.add_argument("--train-data", default="digits", help="data for --trained-steps (default digits)")
    p.add_argument("--weights", type=Path, help="safetensors file with the model's parameters")
    p.add_argument("--num-classes", type=_positive, help="classes of the model (default: from the data)")
    p.add_argument(
        "--local-steps", type=_positive, help="FedAvg: local SGD steps (default: FedSGD, or an update file's protocol)"
    )
    p.add_argument("--local-lr", type=float, default=0.1, help="FedAvg: local learning rate (default 0.1)")
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
        "--defense",
        dest="defenses",
        action="append",
        default=[],
        metavar="SPEC",
        help="a client defense, repeatable, in the order they act: NAME, NAME:VALUE or NAME:KEY=VALUE,... "
        "(e.g. noise:0.01, dpsgd:noise_multiplier=1,clip=1, prune:0.9, soteria:0.6, mixup:2; see `gradinv list`)",
    )
    p.add_argument("--out", type=Path, help="output folder")


def build_parser() -> argparse.ArgumentParser:
    from gradinv.attacks import ATTACKS

    parser = _Parser(prog="gradinv", description="Gradient inversion attacks on federated-learning updates.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    a = sub.add_parser("attack", help="attack one client's update and score the reconstruction")
    a.add_argument("name", choices=sorted(ATTACKS), metavar="NAME", help=f"one of {', '.join(sorted(ATTACKS))}")
    _add_run_options(a, model="convnet", data="photos")
    a.add_argument("--iterations", type=_positive, help="attack iterations (default: the paper's)")
    a.add_argument("--restarts", type=_positive, help="random restarts (default 1)")
    a.add_argument("--update", type=Path, help="captured update (safetensors) to attack instead of a simulation")
    a.add_argument("--known-labels", action="store_true", help="the threat model gives the attacker the labels")
    a.add_argument(
        "--server",
        default="honest",
        help="honest (default) or a malicious server's modification: imprint[:BINS] (Robbing the Fed), trap[:SCALE]",
    )
    _add_key_values(
        a, "--attack-option", "one of the attack's settings, repeatable (e.g. smooth=0.1 for copa, tv_weight=0.01)"
    )
    a.add_argument("--quiet", action="store_true", help="no progress bar")

    c = sub.add_parser("capture", help="simulate a client and save its model and update (safetensors)")
    _add_run_options(c, model="convnet", data="photos")

    lab = sub.add_parser("labels", help="recover the labels of simulated client batches and score them")
    lab.add_argument("method", metavar="METHOD", help="a label method (see `gradinv list`) or 'auto'")
    _add_run_options(lab, model="mlp", data="digits")
    lab.add_argument("--trials", type=_positive, default=10, help="batches to try, seeds seed.. (default 10)")
    lab.add_argument("--quiet", action="store_true", help="no per-trial lines")

    au = sub.add_parser("audit", help="does this client configuration leak? every applicable attack, strongest named")
    _add_run_options(au, model="convnet", data="photos")
    au.add_argument(
        "--attacks", type=_names, default=["analytic", "rgap", "invgrad"], help="default analytic,rgap,invgrad"
    )
    au.add_argument("--samples", type=_positive, default=2, help="client batches, seeds seed.. (default 2)")
    au.add_argument("--iterations", type=_positive, help="iterations of the iterative attacks (default: the paper's)")
    au.add_argument("--quiet", action="store_true", help="no progress bar")

    bench = sub.add_parser("bench", help="benchmarks")
    bench_sub = bench.add_subparsers(dest="bench", required=True, parser_class=_Parser)
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
    bl.add_argument("--quiet", action="store_true", help="no progress bar")

    bd = bench_sub.add_parser("defenses", help="one attack undefended and under each --defense: table and picture")
    bd.add_argument("--attack", default="invgrad", help="the attack (default invgrad; see `gradinv list`)")
    bd.add_argument("--model", default="convnet", help="model name (default convnet)")
    _add_model_options(bd)
    bd.add_argument("--data", default="photos", help="the clients' data (default photos)")
    bd.add_argument("--image-size", type=_positive, default=32, help="image side in pixels (default 32)")
    bd.add_argument("--batch-size", type=_positive, default=1, help="client batch size (default 1)")
    bd.add_argument("--samples", type=_positive, default=2, help="client batches, seeds seed.. (default 2)")
    bd.add_argument("--seed", type=int, default=0, help="seed of the model and the first batch (default 0)")
    bd.add_argument("--iterations", type=_positive, help="attack iterations (default: the paper's)")
    bd.add_argument("--trained-steps", type=_nonneg, default=0, help="train the model on digits first")
    bd.add_argument(
        "--defense",
        dest="defenses",
        action="append",
        default=[],
        metavar="SPEC",
        help="a defense to test, repeatable (e.g. noise:0.01, prune:0.9, soteria:0.6); the undefended case is added",
    )
    bd.add_argument(
        "--utility-steps",
        type=_nonneg,
        default=0,
        help="also train the model this many defended FedSGD rounds on digits and report its accuracy (default 0)",
    )
    _add_key_values(bd, "--attack-option", "one of the attack's settings, repeatable")
    bd.add_argument(
        "--out", type=Path, default=Path("runs/bench-defenses"), help="output folder (default runs/bench-defenses)"
    )
    bd.add_argument("--quiet", action="store_true", help="no progress bar")

    an = sub.add_parser("analyze", help="rank analysis: which layers' updates determine their inputs (R-GAP)")
    an.add_argument("--model", default="cnn6", help="model name (default cnn6; see `gradinv list`)")
    _add_model_options(an)
    an.add_argument("--image-size", type=_positive, default=32, help="image side in pixels (default 32)")
    an.add_argument("--channels", type=_positive, default=3, help="input channels (default 3)")
    an.add_argument("--num-classes", type=_positive, default=10, help="classes of the model (default 10)")
    an.add_argument("--numeric", action="store_true", help="also measure each layer's rank at a random probe")
    an.add_argument("--out", type=Path, help="write analysis.md and analysis.json here")

    sub.add_parser("list", help="list attacks, label methods, models and data sources")

    d = sub.add_parser("demo", help="Inverting Gradients on a bundled photo against a ResNet")
    d.add_argument("--out", type=Path, default=Path("runs/demo"), help="output folder (default runs/demo)")
    d.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def _protocol(args: argparse.Namespace):
    from gradinv.fl import FedAvg, FedSGD

    if args.local_steps is None:
        return None if getattr(args, "update", None) else FedSGD()
    return FedAvg(local_steps=args.local_steps, lr=args.local_lr, local_batch_size=args.local_batch_size)


def _data(args: argparse.Namespace) -> str | None:
    return None if str(args.data).lower() == "none" else args.data


def _client_data(args: argparse.Namespace, command: str) -> str:
    """The data a simulated client holds (checks ``--out`` first, so a bad path fails before any work)."""
    _check_out(args.out)
    data = _data(args)
    if data is None:
        raise ConfigError(f"{command} simulates clients, so it needs --data")
    return data


def _check_out(out: Path | None) -> None:
    if out is not None and out.exists() and not out.is_dir():
        raise ConfigError(f"--out '{out}' exists and is not a folder: choose a folder path")


def _cmd_attack(args: argparse.Namespace) -> int:
    from gradinv.experiment import run_attack, save_run

    _check_out(args.out)
    result = run_attack(
        args.name,
        data=_data(args),
        seed=args.seed,
        restarts=args.restarts,
        update=args.update,
        known_labels=args.known_labels,
        server=args.server,
        attack_settings=dict(args.attack_options),
        progress=not args.quiet,
        **_client_options(args),
    )
    m = result.metrics
    line = f"{m['attack']} on {m['model']}: {m['seconds']:.1f} s"
    if m["defenses"]:
        line = f"{m['attack']} on {m['model']} defended by {', '.join(d.split(':')[0] for d in m['defenses'])}"
        line += f" (epsilon {m['dp_epsilon']:.2f})" if m["dp_epsilon"] is not None else ""
        line += f": {m['seconds']:.1f} s"
    if m["psnr"] is not None:
        line += f", PSNR {m['psnr']:.2f} dB, SSIM {m['ssim']:.3f}"
    if m["label_accuracy"] is not None:
        line += f", label accuracy {m['label_accuracy']:.2f}"
    if args.out is not None:
        save_run(result, args.out)
        line += f" -> {args.out}/"
    print(line)
    return 0


def _cmd_capture(args: argparse.Namespace) -> int:
    from gradinv.defenses import parse_defense
    from gradinv.experiment import setup_client
    from gradinv.fl import Scenario
    from gradinv.io import save_model, save_update, write_json_atomic

    if args.out is None:
        raise ConfigError("capture needs --out FOLDER to write the model and update into")
    defenses = [parse_defense(d) for d in args.defenses]
    data = _client_data(args, "capture")
    client = setup_client(
        model=args.model,
        data=data,
        image_size=args.image_size,
        batch_size=args.batch_size,
        seed=args.seed,
        trained_steps=args.trained_steps,
        train_data=args.train_data,
        weights=args.weights,
        num_classes=args.num_classes,
        model_options=dict(args.model_options),
    )
    model, ds, images, labels = client.model, client.dataset, client.images, client.labels
    protocol = _protocol(args)
    obs = Scenario.from_images(
        model,
        images,
        labels,
        normalization=ds.normalization,
        protocol=protocol,
        train_mode=args.train_mode,
        defenses=defenses,
        seed=args.seed,
        clients=args.clients,
    ).observe()
    save_model(model, args.out / "weights.safetensors")
    save_update(
        obs.update,
        args.out / "update.safetensors",
        metadata={"protocol": protocol.to_dict(), "defenses": list(obs.defenses), "clients": obs.clients},
    )
    write_json_atomic(
        {
            "model": args.model,
            "model_options": dict(args.model_options),
            "data": str(data),
            "image_size": args.image_size,
            "batch_size": args.batch_size,
            "seed": args.seed,
            "labels": labels.tolist(),
            "protocol": protocol.to_dict(),
            "train_mode": args.train_mode,
            "defenses": list(obs.defenses),
            "clients": obs.clients,
        },
        args.out / "capture.json",
    )
    print(f"wrote {args.out}/weights.safetensors, update.safetensors and capture.json")
    return 0


def _cmd_labels(args: argparse.Namespace) -> int:
    from gradinv.attacks.labels import check_methods
    from gradinv.label_bench import plot_counts, prepare_case, run_trials, save_trials, summarize

    check_methods([args.method])  # before any model is built or trained
    data = _client_data(args, "labels")
    case = prepare_case(
        model=args.model,
        data=data,
        image_size=args.image_size,
        seed=args.seed,
        trained_steps=args.trained_steps,
        num_classes=args.num_classes,
        protocol=_protocol(args),
        train_mode=args.train_mode,
        model_options=dict(args.model_options),
        defenses=args.defenses,
        clients=args.clients,
    )
    records = run_trials(case, [args.method], batch_size=args.batch_size, trials=args.trials, seed=args.seed)
    if not args.quiet:
        for r in records:
            got = f"recovered {r.labels_recovered}" if r.declined is None else f"declined: {r.declined}"
            print(f"  seed {r.seed}: true {r.labels_true} {got}")
    (row,) = summarize(records)
    line = f"{args.method} on {args.model}, {case.dataset.name}, batch {args.batch_size}: "
    if row["answered"]:
        line += (
            f"existence {row['existence']:.3f}, count {row['count']:.3f} over {row['answered']}/{row['trials']} "
            f"trials, {row['seconds_median'] * 1000:.1f} ms per recovery"
        )
    else:
        line += f"declined on every trial: {row['declined_reason']}"
    if args.out is not None:
        save_trials(records, [row], args.out, name="labels")
        plot_counts(records[:1], case.dataset.num_classes, args.out / "labels.png")
        line += f" -> {args.out}/"
    print(line)
    return 0


def _cmd_audit(args: argparse.Namespace) -> int:
    from gradinv.audit import audit, markdown

    data = _client_data(args, "audit")
    result = audit(
        attacks=args.attacks,
        samples=args.samples,
        seed=args.seed,
        out=args.out,
        progress=not args.quiet,
        data=data,
        **_client_options(args),
    )
    print(markdown(result), end="")
    if args.out is not None:
        print(f"-> {args.out}/audit.md, audit.json, strongest/")
    return 0


def _client_options(args: argparse.Namespace) -> dict:
    """The run options that describe the client (``_add_run_options``) and the attack's budget, as
    :func:`gradinv.experiment.run_attack` takes them."""
    return {
        "model": args.model,
        "model_options": dict(args.model_options),
        "image_size": args.image_size,
        "batch_size": args.batch_size,
        "iterations": args.iterations,
        "trained_steps": args.trained_steps,
        "train_data": args.train_data,
        "weights": args.weights,
        "num_classes": args.num_classes,
        "protocol": _protocol(args),
        "train_mode": args.train_mode,
        "defenses": args.defenses,
        "clients": args.clients,
    }


def _cmd_bench(args: argparse.Namespace) -> int:
    return _bench_defenses(args) if args.bench == "defenses" else _bench_labels(args)


def _bench_defenses(args: argparse.Namespace) -> int:
    from gradinv.defense_bench import bench_defenses, markdown_table

    _check_out(args.out)
    if not args.defenses:
        raise ConfigError("bench defenses needs at least one --defense SPEC (e.g. --defense noise:0.01)")
    settings = dict(args.attack_options)
    if args.iterations is not None:
        settings["iterations"] = args.iterations
    result = bench_defenses(
        attack=args.attack,
        defenses=args.defenses,
        model=args.model,
        model_options=dict(args.model_options),
        data=args.data,
        image_size=args.image_size,
        batch_size=args.batch_size,
        samples=args.samples,
        seed=args.seed,
        attack_settings=settings,
        trained_steps=args.trained_steps,
        utility_steps=args.utility_steps,
        out=args.out,
        progress=not args.quiet,
    )
    print(markdown_table(result["config"], result["summary"]), end="")
    print(f"-> {args.out}/defenses.md, defenses.json, defenses.png")
    return 0


def _bench_labels(args: argparse.Namespace) -> int:
    from gradinv.attacks.labels import LABEL_METHODS, check_methods
    from gradinv.label_bench import bench_labels, plot_accuracy, save_trials

    _check_out(args.out)
    methods = args.methods or sorted(LABEL_METHODS)
    check_methods(methods, allow_auto=False)
    if any(b < 1 for b in args.batch_sizes):
        raise ConfigError("--batch-sizes must all be >= 1")
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
        progress=not args.quiet,
    )
    save_trials(records, rows, args.out, name="labels")
    plot_accuracy(rows, args.out / "labels.png")
    print(f"{len(records)} recoveries over {len(rows)} points -> {args.out}/labels.csv, labels.md, labels.png")
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


def _cmd_list(args: argparse.Namespace) -> int:
    from gradinv.attacks import ATTACKS
    from gradinv.attacks.labels import LABEL_METHODS
    from gradinv.data import list_data_sources
    from gradinv.defenses import DEFENSES
    from gradinv.models import list_models

    print("attacks:")
    for name in sorted(ATTACKS):
        print(f"  {name:<10} {ATTACKS[name].summary}")
    print("label methods (gradinv labels METHOD):")
    for name in sorted(LABEL_METHODS):
        m = LABEL_METHODS[name]
        kind = "counts" if m.gives_counts else "set"
        print(f"  {name:<13} [{kind}] {m.summary}")
    print("defenses (--defense NAME[:VALUE]):")
    for name in sorted(DEFENSES):
        d = DEFENSES[name]
        print(f"  {name:<10} [{d.stage}] {d.summary}")
    print("models:")
    for name, summary in list_models():
        print(f"  {name:<10} {summary}")
    print("data:")
    for name, summary in list_data_sources():
        print(f"  {name:<10} {summary}")
    print("  PATH       a folder of images (class sub-folders or flat) or an .npz with images and labels")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from gradinv.demo import run_demo

    _check_out(args.out)
    run_demo(out=args.out, progress=not args.quiet)
    return 0


COMMANDS = {
    "attack": _cmd_attack,
    "capture": _cmd_capture,
    "labels": _cmd_labels,
    "audit": _cmd_audit,
    "bench": _cmd_bench,
    "analyze": _cmd_analyze,
    "list": _cmd_list,
    "demo": _cmd_demo,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``gradinv`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except GradinvError as exc:
        sys.stderr.write(f"gradinv: error: {exc}\n")
        return EXIT_USAGE
    except KeyboardInterrupt:
        sys.stderr.write("gradinv: interrupted\n")
        return 130
    except BrokenPipeError:  # output piped into a pager or `head` that closed early
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
