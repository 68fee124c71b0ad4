"""One attack run end to end: data -> model -> scenario (or captured files) -> attack -> scores.

The CLI and the benchmarks are thin layers over :func:`run_attack`; results are written by
:func:`save_run` so that ``--out`` never holds a half-written run.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from gradinv.attacks import ATTACKS, build_attack
from gradinv.data import load_dataset, sample_batch
from gradinv.data.dataset import ImageDataset, Normalization
from gradinv.defenses import Defense, as_defense, dp_epsilon
from gradinv.errors import ConfigError, UpdateFileError
from gradinv.fl import FedSGD, Scenario, observation_from_files
from gradinv.fl.protocols import Protocol, protocol_from_dict
from gradinv.io import load_state_into, update_metadata, write_json_atomic
from gradinv.metrics import ImageScores, label_accuracy, score_images
from gradinv.models import MODELS, build_model, train_model
from gradinv.types import GroundTruth, Knowledge, Observation, Reconstruction, ThreatModel

TRAIN_BATCH_SIZE = 8  # --trained-steps: small batches keep a few hundred ResNet-18 steps near a minute on CPU


@dataclass(frozen=True, eq=False)
class RunResult:
    """A finished run: the metrics record, the reconstruction, and the truth when it is known."""

    metrics: dict[str, Any]
    reconstruction: Reconstruction
    truth: GroundTruth | None
    observation: Observation = field(repr=False)
    scores: ImageScores | None = None
    scored_images: Tensor | None = None  # the reconstruction as scored: one image per true sample


def prepare_model(
    model_name: str,
    *,
    num_classes: int,
    image_size: int,
    seed: int,
    weights: str | Path | None = None,
    trained_steps: int = 0,
    dataset: ImageDataset | None = None,
    model_options: Mapping[str, Any] | None = None,
) -> torch.nn.Module:
    """Build a model by name (with its builder's ``model_options``, e.g. ``{"channels": (12, 36, 4, 36, 64,
    128)}`` for CNN6), load saved weights, and train it briefly on ``dataset`` if asked.

    Labels of ``dataset`` beyond the model's classes are an error, not silently wrapped.
    """
    if model_name not in MODELS:
        raise ConfigError(f"unknown model {model_name!r}: choose one of {', '.join(sorted(MODELS))}")
    if trained_steps < 0:
        raise ConfigError(f"--trained-steps must be >= 0, got {trained_steps}")
    model = build_model(
        model_name, num_classes=num_classes, in_channels=3, image_size=image_size, seed=seed, **(model_options or {})
    )
    if weights is not None:
        load_state_into(model, weights)
    if trained_steps:
        if dataset is None:
            raise ConfigError("--trained-steps needs a data set to train on")
        if dataset.num_classes > num_classes:
            raise ConfigError(
                f"the training data '{dataset.name}' has {dataset.num_classes} classes but the model {num_classes}: "
                "raise --num-classes"
            )
        train_model(
            model,
            images=dataset.normalization.normalize(dataset.images),
            labels=dataset.labels,
            steps=trained_steps,
            batch_size=TRAIN_BATCH_SIZE,
            seed=seed,
        )
    return model


@dataclass(frozen=True, eq=False)
class Client:
    """A simulated client: its model (as the server sends it) and, when data is given, its private batch."""

    model: torch.nn.Module
    dataset: ImageDataset | None
    images: Tensor | None
    labels: Tensor | None


def setup_client(
    *,
    model: str,
    data: str | Path | None,
    image_size: int,
    batch_size: int,
    seed: int,
    trained_steps: int = 0,
    train_data: str | Path = "digits",
    weights: str | Path | None = None,
    num_classes: int | None = None,
    model_options: Mapping[str, Any] | None = None,
) -> Client:
    """Load the data, build (and optionally train or load) the model, and sample the client's batch.

    ``trained_steps`` first trains the model on ``train_data`` (default: the bundled digits, 1,797 images), the
    state a server sends mid-training; training on the attacked images themselves would make the model
    memorise them and their gradients vanish. The model has ``num_classes`` classes, by default enough for
    both data sets.
    """
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {batch_size}")
    dataset = load_dataset(data, image_size=image_size, channels=3) if data is not None else None
    train_set = load_dataset(train_data, image_size=image_size, channels=3) if trained_steps else None
    classes = num_classes or max(
        dataset.num_classes if dataset is not None else 10, train_set.num_classes if train_set is not None else 0
    )
    net = prepare_model(
        model,
        num_classes=classes,
        image_size=image_size,
        seed=seed,
        weights=weights,
        trained_steps=trained_steps,
        dataset=train_set,
        model_options=model_options,
    )
    images = labels = None
    if dataset is not None:
        images, labels = sample_batch(dataset, batch_size=batch_size, seed=seed)
        if int(labels.max()) >= classes:
            raise ConfigError(
                f"the data has labels up to {int(labels.max())} but the model has {classes} classes: "
                "raise --num-classes"
            )
    return Client(model=net, dataset=dataset, images=images, labels=labels)


def run_attack(
    attack: str,
    *,
    model: str = "convnet",
    data: str | Path | None = "photos",
    image_size: int = 32,
    batch_size: int = 1,
    seed: int = 0,
    iterations: int | None = None,
    restarts: int | None = None,
    attack_settings: Mapping[str, Any] | None = None,
    trained_steps: int = 0,
    train_data: str | Path = "digits",
    weights: str | Path | None = None,
    update: str | Path | None = None,
    num_classes: int | None = None,
    known_labels: bool = False,
    protocol: Protocol | None = None,
    train_mode: bool = False,
    server: str = "honest",
    model_options: Mapping[str, Any] | None = None,
    defenses: Sequence[Defense | str] = (),
    clients: int = 1,
    progress: bool = False,
    callback=None,
) -> RunResult:
    """Attack one client's batch and score the reconstruction (the ``gradinv attack`` command).

    The client is built by :func:`setup_client`; with ``update`` the observation comes from captured files
    (their protocol from the file's metadata unless ``protocol`` is given).
    ``attack_settings`` overrides the attack's other settings by name (e.g. ``{"tv_weight": 1e-2}``).
    ``server`` is the threat model's server: ``"honest"`` or a malicious modification such as ``"imprint:128"``
    or ``"trap"`` (:func:`gradinv.fl.malicious.parse_server`), fitted to public data of the same source that the
    client's batch does not contain. ``defenses`` (instances or specs such as ``"noise:0.01"``) are the
    client's, applied in order (:mod:`gradinv.defenses`); a captured update already carries its client's.
    ``clients > 1`` shares the batch among that many clients whose mean update alone the server sees.
    """
    ATTACKS.lookup(attack)  # a clear error for an unknown name before any work
    defenses = tuple(as_defense(d) for d in defenses)  # checked before any model is built or trained
    if (defenses or clients > 1) and update is not None:
        raise ConfigError(
            "a captured --update already holds its clients' defenses and aggregation: give --defense and "
            "--clients to capture"
        )
    overrides = dict(attack_settings or {})
    for key, value in (("iterations", iterations), ("restarts", restarts)):
        if value is not None:
            if value < 1:
                raise ConfigError(f"--{key} must be >= 1, got {value}")
            if key in ATTACKS[attack].Settings.__dataclass_fields__:
                overrides[key] = value
    attacker = build_attack(attack, **overrides)
    saved_meta = update_metadata(update) if update is not None else {}
    if protocol is None and isinstance(saved_meta.get("protocol"), dict):
        protocol = protocol_from_dict(saved_meta["protocol"])
    protocol = protocol or FedSGD()

    client = setup_client(
        model=model,
        data=data,
        image_size=image_size,
        batch_size=batch_size,
        seed=seed,
        trained_steps=trained_steps,
        train_data=train_data,
        weights=weights,
        num_classes=num_classes,
        model_options=model_options,
    )
    net, dataset, images, labels = client.model, client.dataset, client.images, client.labels
    truth: GroundTruth | None = None
    if update is None:
        if dataset is None:
            raise ConfigError("without --update the client's batch must come from --data")
        scenario = Scenario.from_images(
            net,
            images,
            labels,
            normalization=dataset.normalization,
            protocol=protocol,
            threat=ThreatModel(known_labels=known_labels, server=_server(server, dataset, images, image_size)),
            train_mode=train_mode,
            defenses=defenses,
            seed=seed,
            clients=clients,
        )
        observation = scenario.observe()
        truth = scenario.ground_truth()
    else:
        norm = dataset.normalization if dataset is not None else Normalization.identity(3)
        if dataset is not None:
            truth = GroundTruth(inputs=norm.normalize(images), labels=labels, normalization=norm)
        knowledge = Knowledge(
            input_shape=(3, image_size, image_size),
            num_samples=batch_size,
            labels=truth.labels.clone() if known_labels and truth is not None else None,
            normalization=norm,
        )
        observation = observation_from_files(
            net,
            update_path=update,
            protocol=protocol,
            knowledge=knowledge,
            train_mode=train_mode,
            defenses=_saved_defenses(saved_meta, update),
            clients=_saved_clients(saved_meta, update),
        )

    rec = attacker.reconstruct(observation, seed=seed, progress=progress, callback=callback)
    metrics: dict[str, Any] = {
        "attack": attack,
        "model": model,
        "model_options": dict(model_options or {}),
        "data": str(data) if data is not None else None,
        "batch_size": batch_size,
        "image_size": image_size,
        "iterations": getattr(attacker.settings, "iterations", None),
        "restarts": getattr(attacker.settings, "restarts", None),
        "seed": seed,
        "trained_steps": trained_steps,
        "train_data": str(train_data) if trained_steps else None,
        "protocol": protocol.to_dict(),
        "known_labels": known_labels,
        "train_mode": train_mode,
        "server": server,
        "defenses": list(observation.defenses),
        "clients": observation.clients,
        "dp_epsilon": dp_epsilon(
            [as_defense(d) for d in observation.defenses],
            protocol=protocol,
            num_samples=batch_size // observation.clients,  # the smallest share: its samples take the most steps
        ),
        "label_source": rec.settings.get("label_source"),
        "attack_settings": {k: v for k, v in rec.settings.items() if k != "label_source"},
        "psnr": None,
        "psnr_per_sample": None,
        "ssim": None,
        "ssim_per_sample": None,
        "mse": None,
        "label_accuracy": None,
        "labels_true": None,
        "labels_recovered": rec.labels.tolist() if rec.labels is not None else None,
        "seconds": round(rec.seconds, 3),
        "final_cost": rec.trace[-1].cost if rec.trace else None,
        "details": {k: v for k, v in rec.extras.items() if isinstance(v, int | float | list)},
    }
    scores = None
    if truth is not None:
        rec_images = rec.images
        if rec_images.shape[0] != truth.images.shape[0] and rec_images.shape[1:] == truth.images.shape[1:]:
            # an attack that recovers some samples only (malicious servers): each true image is paired with its
            # best recovery, and the fraction recovered above 40 dB is reported
            from gradinv.attacks.imprint import score_recovered

            found = score_recovered(rec_images, truth.images)
            metrics["recovered_fraction_40db"] = found.fraction
            metrics["recovered_count"] = int(rec_images.shape[0])
            paired = torch.zeros_like(truth.images)
            hit = found.best >= 0
            paired[hit] = rec_images[found.best[hit]]
            rec_images = paired
        if tuple(rec_images.shape) != tuple(truth.images.shape):
            raise ConfigError(
                f"the reconstruction has shape {tuple(rec_images.shape)} but the truth {tuple(truth.images.shape)}: "
                "check --image-size and --batch-size match the captured update"
            )
        scores = score_images(rec_images, truth.images)
        metrics.update(
            psnr=scores.mean_psnr,
            psnr_per_sample=scores.psnr,
            ssim=scores.mean_ssim,
            ssim_per_sample=scores.ssim,
            mse=scores.mean_mse,
            labels_true=truth.labels.tolist(),
        )
        if not known_labels and rec.labels is not None:
            metrics["label_accuracy"] = label_accuracy(rec.labels, truth.labels)
    return RunResult(
        metrics=metrics,
        reconstruction=rec,
        truth=truth,
        observation=observation,
        scores=scores,
        scored_images=rec_images if truth is not None else None,
    )


PUBLIC_SAMPLES = 512  # a malicious server's public data: images of the same source outside the client's batch


def _saved_defenses(meta: Mapping[str, Any], path: str | Path) -> tuple[str, ...]:
    """The defense specs an update file's metadata names (each checked by parsing it)."""
    specs = meta.get("defenses", [])
    if not isinstance(specs, list) or not all(isinstance(d, str) for d in specs):
        raise UpdateFileError(f"{path}: its 'defenses' metadata must be a list of defense specs, got {specs!r}")
    return tuple(as_defense(d).spec() for d in specs)


def _saved_clients(meta: Mapping[str, Any], path: str | Path) -> int:
    """The client count an update file's metadata names (1 when it names none)."""
    clients = meta.get("clients", 1)
    if isinstance(clients, bool) or not isinstance(clients, int) or clients < 1:
        raise UpdateFileError(f"{path}: its 'clients' metadata must be a positive integer, got {clients!r}")
    return clients


def _server(spec: str, dataset: ImageDataset, batch: Tensor, image_size: int):
    from gradinv.fl.malicious import parse_server

    if spec.strip().lower() in ("honest", "none", ""):
        return None
    probe = torch.randn(batch[0].numel(), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    keys = dataset.images.flatten(1).double() @ probe  # one number per image: the batch's own are excluded
    taken = torch.isin(keys, batch.flatten(1).double() @ probe)
    public = dataset.images[~taken][:PUBLIC_SAMPLES]
    return parse_server(
        spec,
        input_shape=(3, image_size, image_size),
        normalization=dataset.normalization,
        auxiliary=dataset.normalization.normalize(public) if len(public) else None,
    )


def save_run(result: RunResult, out: str | Path) -> Path:
    """Write ``metrics.json`` and ``reconstruction.png`` (truth row above reconstruction row) atomically."""
    from gradinv.viz import save_reconstruction_grid

    out = Path(out)
    rec_images = result.reconstruction.images
    truth_images = None
    psnr = None
    if result.truth is not None and result.scores is not None:
        rec_images = result.scored_images[result.scores.order]
        truth_images = result.truth.images
        psnr = result.metrics["psnr_per_sample"]
    m = result.metrics
    title = f"{m['attack']} on {m['model']}"
    if m["psnr"] is not None:
        title += f" - mean PSNR {m['psnr']:.1f} dB"
    save_reconstruction_grid(
        out / "reconstruction.png", truth=truth_images, reconstruction=rec_images, psnr=psnr, title=title
    )
    write_json_atomic(m, out / "metrics.json")
    return out
