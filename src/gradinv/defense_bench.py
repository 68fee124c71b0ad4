"""Which defenses stop an attack: one attack against the same client batches, once undefended and once under
each defense, scored against the private images, with the defense's cost to the update.

The cost is the cosine between the defended update and the clean one (1: the training signal is intact; the
"utility" the survey asks defenses to keep), for DP-SGD the round's epsilon, and optionally
(:func:`defended_accuracy`) the test accuracy of the model trained with defended updates. Results are written
after every run, and a run already in ``defenses.json`` is not repeated: an interrupted sweep resumes.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import statistics
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from gradinv._atomic import atomic_path
from gradinv.attacks import ATTACKS, build_attack
from gradinv.data import load_dataset, sample_batch
from gradinv.data.dataset import ImageDataset
from gradinv.defenses import as_defense, dp_epsilon
from gradinv.defenses.functional import global_norm
from gradinv.errors import ConfigError, GradinvError
from gradinv.experiment import prepare_model
from gradinv.fl import FedSGD, Scenario
from gradinv.fl.protocols import Protocol
from gradinv.io import write_json_atomic
from gradinv.metrics import label_accuracy, score_images

NONE = "none"
#: the seed recorded for a utility run (training with the defense), which attacks no client batch
UTILITY = -1


@dataclasses.dataclass
class DefenseTrial:
    """One attack on one client batch under one defense (``"none"``: undefended), or with ``seed`` UTILITY the
    held-out ``accuracy`` of the model trained with that defense."""

    defense: str
    seed: int
    psnr: float | None = None
    ssim: float | None = None
    label_accuracy: float | None = None
    update_cosine: float | None = None
    accuracy: float | None = None
    seconds: float | None = None
    declined: str | None = None


def update_cosine(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> float:
    """Cosine similarity of two updates taken as one vector each."""
    dot = sum(float((a[k].double() * b[k].double()).sum()) for k in a)
    return dot / max(float(global_norm(a) * global_norm(b)), 1e-300)


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


def bench_defenses(
    *,
    attack: str,
    defenses: Sequence[str],
    model: str = "convnet",
    model_options: Mapping[str, Any] | None = None,
    data: str | Path = "photos",
    image_size: int = 32,
    batch_size: int = 1,
    samples: int = 2,
    seed: int = 0,
    attack_settings: Mapping[str, Any] | None = None,
    trained_steps: int = 0,
    protocol: Protocol | None = None,
    utility_steps: int = 0,
    out: Path | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Run ``attack`` on ``samples`` client batches (seeds ``seed``...) undefended and under each defense spec.

    Returns (and, with ``out``, writes as it goes to ``out/defenses.json``) the configuration, every trial and
    the per-defense summary. A defense that cannot act on the case (e.g. MixUp on a batch of one) is recorded
    as declined with its reason. ``utility_steps > 0`` also trains the model that many defended FedSGD rounds
    on the bundled digits (batch 32) and reports its held-out accuracy per defense (:func:`defended_accuracy`).
    """
    ATTACKS.lookup(attack)  # a clear error for an unknown name before any work
    specs = [NONE] + [as_defense(d).spec() for d in defenses]  # every spec checked before any work
    attacker = build_attack(attack, **dict(attack_settings or {}))
    protocol = protocol or FedSGD()
    config = {
        "attack": attack,
        "attack_settings": attacker.settings_dict(),
        "model": model,
        "model_options": dict(model_options or {}),
        "data": str(data),
        "image_size": image_size,
        "batch_size": batch_size,
        "seed": seed,
        "trained_steps": trained_steps,
        "protocol": protocol.to_dict(),
        "utility_steps": utility_steps,
    }
    trials = _resume(out, config)
    done = {(t.defense, t.seed) for t in trials}
    dataset = load_dataset(data, image_size=image_size, channels=3)
    train = load_dataset("digits", image_size=image_size, channels=3) if trained_steps else None
    net = prepare_model(
        model,
        num_classes=max(dataset.num_classes, 10),
        image_size=image_size,
        seed=seed,
        trained_steps=trained_steps,
        dataset=train,
        model_options=model_options,
    )
    jobs = [(s, d) for s in range(seed, seed + samples) for d in specs if (d, s) not in done]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(jobs), desc=f"{attack} vs defenses", unit="run")
    clean: dict[int, Mapping[str, torch.Tensor]] = {}
    for s, spec in jobs:
        if bar is not None:
            bar.set_postfix_str(f"seed {s} {spec}")
        images, labels = sample_batch(dataset, batch_size=batch_size, seed=s)

        def scenario(defense: tuple = (), s: int = s, images=images, labels=labels) -> Scenario:
            return Scenario.from_images(
                net, images, labels, normalization=dataset.normalization, protocol=protocol, defenses=defense, seed=s
            )

        if s not in clean:
            clean[s] = scenario().observe().update
        trial = DefenseTrial(defense=spec, seed=s)
        start = time.perf_counter()
        try:
            sc = scenario(() if spec == NONE else (spec,))
            obs = sc.observe()
            rec = attacker.reconstruct(obs, seed=s)
        except GradinvError as exc:
            trial.declined = str(exc)
        else:
            truth = sc.ground_truth()
            scores = score_images(rec.images, truth.images)
            trial.psnr, trial.ssim = scores.mean_psnr, scores.mean_ssim
            if rec.labels is not None:
                trial.label_accuracy = label_accuracy(rec.labels, truth.labels)
            trial.update_cosine = update_cosine(obs.update, clean[s])
            if out is not None and s == seed:
                _save_picture(out, spec, truth.images, rec.images[torch.tensor(scores.order)], scores.psnr)
        trial.seconds = time.perf_counter() - start
        trials.append(trial)
        if out is not None:
            _write(out, config, trials, specs)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    if utility_steps:
        digits = load_dataset("digits", image_size=image_size, channels=3)
        for spec in specs:
            if any(t.defense == spec and t.seed == UTILITY for t in trials):
                continue
            trial = DefenseTrial(defense=spec, seed=UTILITY)
            start = time.perf_counter()
            try:
                trial.accuracy = defended_accuracy(
                    net, digits, () if spec == NONE else (spec,), steps=utility_steps, seed=seed
                )
            except GradinvError as exc:
                trial.declined = str(exc)
            trial.seconds = time.perf_counter() - start
            trials.append(trial)
            if out is not None:
                _write(out, config, trials, specs)
    result = {"config": config, "trials": [dataclasses.asdict(t) for t in trials], "summary": summarize(trials, specs)}
    if out is not None:
        _write(out, config, trials, specs, final=True)
    return result


def summarize(trials: Sequence[DefenseTrial], specs: Sequence[str]) -> list[dict[str, Any]]:
    """Per defense (in ``specs`` order): medians of PSNR, SSIM and update cosine, mean label accuracy."""

    def med(values: list[float | None]) -> float | None:
        kept = [v for v in values if v is not None]
        return statistics.median(kept) if kept else None

    rows = []
    for spec in specs:
        utility = next((t for t in trials if t.defense == spec and t.seed == UTILITY), None)
        group = [t for t in trials if t.defense == spec and t.seed != UTILITY]
        ok = [t for t in group if t.declined is None]
        labels = [t.label_accuracy for t in ok if t.label_accuracy is not None]
        rows.append(
            {
                "defense": spec,
                "runs": len(group),
                "answered": len(ok),
                "psnr": med([t.psnr for t in ok]),
                "ssim": med([t.ssim for t in ok]),
                "label_accuracy": statistics.fmean(labels) if labels else None,
                "update_cosine": med([t.update_cosine for t in ok]),
                "dp_epsilon": None if spec == NONE else dp_epsilon([as_defense(spec)]),
                "accuracy": None if utility is None else utility.accuracy,
                "seconds": med([t.seconds for t in ok]),
                "declined": next((t.declined for t in group if t.declined), None),
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


def _resume(out: Path | None, config: Mapping[str, Any]) -> list[DefenseTrial]:
    """The trials already in ``out/defenses.json`` when it holds the same case, else none."""
    import json

    path = out / "defenses.json" if out is not None else None
    if path is None or not path.exists():
        return []
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    if saved.get("config") != json.loads(json.dumps(config)):
        raise ConfigError(
            f"{path} holds a different sweep ({saved.get('config', {}).get('attack')}...): "
            "choose another --out or delete it"
        )
    fields = {f.name for f in dataclasses.fields(DefenseTrial)}
    return [DefenseTrial(**{k: v for k, v in t.items() if k in fields}) for t in saved.get("trials", [])]


def _write(out: Path, config, trials, specs, *, final: bool = False) -> None:
    out.mkdir(parents=True, exist_ok=True)
    rows = summarize(trials, specs)
    write_json_atomic(
        {"config": config, "trials": [dataclasses.asdict(t) for t in trials], "summary": rows}, out / "defenses.json"
    )
    if final:
        with atomic_path(out / "defenses.md") as tmp:
            Path(tmp).write_text(markdown_table(config, rows))
        _combine_pictures(out, specs)


def _save_picture(out: Path, spec: str, truth: torch.Tensor, rec: torch.Tensor, psnr: Sequence[float]) -> None:
    """Keep the first client batch's first image and its reconstruction under ``spec`` for the overview."""
    cache = out / ".pictures"
    cache.mkdir(parents=True, exist_ok=True)
    torch.save(
        {"truth": truth[:1].cpu(), "rec": rec[:1].cpu(), "psnr": float(psnr[0])},
        cache / _picture_name(spec),
    )


def _combine_pictures(out: Path, specs: Sequence[str]) -> None:
    """``defenses.png``: the private image, then what the attack rebuilt under each defense."""
    from gradinv.viz import save_reconstruction_grid

    cache = out / ".pictures"
    images, captions = [], []
    for spec in specs:
        path = cache / _picture_name(spec)
        if not path.exists():
            continue
        saved = torch.load(path, weights_only=True)
        if not images:
            images.append(saved["truth"])
            captions.append("private image")
        images.append(saved["rec"])
        captions.append(f"{spec.split(':')[0]}{_short(spec)}\n{saved['psnr']:.1f} dB")
    if images:
        save_reconstruction_grid(out / "defenses.png", truth=None, reconstruction=torch.cat(images), captions=captions)


def _picture_name(spec: str) -> str:
    return hashlib.sha1(spec.encode()).hexdigest()[:16] + ".pt"


def _short(spec: str) -> str:
    """The first setting's value of a spec, for a caption (``prune:fraction=0.9,...`` -> ``:0.9``)."""
    _, _, rest = spec.partition(":")
    first = rest.split(",")[0]
    return f":{first.partition('=')[2]}" if first else ""
