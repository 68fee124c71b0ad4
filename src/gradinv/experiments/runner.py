"""One cell, one runner: a case attacked by one attack (or label method), scored, as a typed record.

A :class:`Cell` is the unit every command, grid and benchmark runs: a :class:`~gradinv.experiments.case.Case`,
an attack name and its settings. :func:`run_cell` builds the client, asks the attack whether it applies
(its reasons are recorded as *declined*, not as errors), runs it, scores it against the private batch and
returns a :class:`RunRecord`; ``metrics.json`` is that record's serialisation.

Text cases (a text model, token ids) run the same way: only attacks that rebuild token ids apply
(:func:`reconstructs_tokens`; the others are declined), and the reconstruction is scored with ROUGE-1/2/L, token
accuracy and the exact-sequence rate after the optimal matching of sequences (:func:`gradinv.metrics.score_text`);
:func:`reconstruction_markdown` shows each private sequence, decoded, above its reconstruction.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import platform
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from gradinv.attacks import build_attack
from gradinv.attacks.labels import check_methods, recover_labels
from gradinv.defenses import dp_epsilon
from gradinv.errors import ConfigError, GradinvError
from gradinv.experiments.case import Case, Client, ModelCache, build_client, spec_of
from gradinv.metrics import label_accuracy, label_existence_accuracy, match_sequences, score_images, score_text
from gradinv.types import Reconstruction

#: the prefix of a cell whose "attack" is a label-recovery method (``labels:ilrg``)
LABELS = "labels:"
RECOVERED_DB = 40.0  # a sample counts as recovered above this PSNR
#: attacks that rebuild token ids, for text cases; an attack class may also say so itself with ``modality = "text"``
TEXT_ATTACKS = frozenset({"dager", "tag", "lamp"})
#: the record's text scores (:func:`gradinv.metrics.score_text`), written to ``metrics.json`` for text cases only
TEXT_SCORES = ("rouge1", "rouge2", "rougeL", "token_accuracy", "exact")


def reconstructs_tokens(attack: Any) -> bool:
    """Whether ``attack`` (an attack or its class) rebuilds token ids, i.e. applies to text cases."""
    return getattr(attack, "modality", None) == "text" or getattr(attack, "name", None) in TEXT_ATTACKS


def _freeze(settings: Mapping[str, Any] | None) -> tuple[tuple[str, Any], ...]:
    return tuple(sorted((str(k), tuple(v) if isinstance(v, list) else v) for k, v in (settings or {}).items()))


def library_versions() -> dict[str, str]:
    """The versions a record was made with."""
    from gradinv import __version__

    return {"gradinv": __version__, "torch": torch.__version__, "python": platform.python_version()}


@dataclass(frozen=True)
class Cell:
    """A case, an attack (or ``labels:METHOD``) and the attack's settings that differ from its defaults."""

    case: Case
    attack: str
    attack_settings: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "attack_settings", _freeze(dict(self.attack_settings)))
        if self.attack.startswith(LABELS):
            check_methods([self.label_method])
            if self.attack_settings:
                raise ConfigError(
                    f"label method {self.label_method} takes no settings, got {dict(self.attack_settings)}"
                )
        else:
            build_attack(self.attack, **dict(self.attack_settings))  # every setting checked before any work

    @property
    def label_method(self) -> str:
        return self.attack.removeprefix(LABELS)

    @property
    def is_labels(self) -> bool:
        return self.attack.startswith(LABELS)

    def to_dict(self) -> dict[str, Any]:
        return {
            "case": self.case.to_dict(),
            "attack": self.attack,
            "attack_settings": {k: list(v) if isinstance(v, tuple) else v for k, v in self.attack_settings},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Cell:
        return cls(Case.from_dict(data["case"]), data["attack"], tuple(data.get("attack_settings", {}).items()))

    def key(self) -> str:
        """A hash of the cell's full settings and the library version: equal keys, equal runs."""
        from gradinv import __version__

        text = json.dumps({"cell": self.to_dict(), "version": __version__}, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:20]


@dataclass
class RunRecord:
    """A finished cell: what ran, how it scored, how long it took and where.

    ``status`` is ``"ok"``, ``"declined"`` (the attack does not apply to this case; ``reason`` says why) or
    ``"failed"`` (an error; ``reason`` holds it). :meth:`to_dict` is ``metrics.json``.
    """

    key: str
    case: Case
    attack: str
    attack_settings: dict[str, Any]
    status: str = "ok"
    reason: str | None = None
    psnr: float | None = None
    psnr_per_sample: list[float] | None = None
    ssim: float | None = None
    ssim_per_sample: list[float] | None = None
    mse: float | None = None
    recovered_fraction_40db: float | None = None
    recovered_count: int | None = None
    label_accuracy: float | None = None
    label_existence: float | None = None
    label_count: float | None = None
    labels_true: list[int] | None = None
    labels_recovered: list[int] | None = None
    label_source: str | None = None
    rouge1: float | None = None
    rouge2: float | None = None
    rougeL: float | None = None  # noqa: N815 - the metric's usual name
    token_accuracy: float | None = None
    exact: float | None = None
    dp_epsilon: float | None = None
    update_cosine: float | None = None
    final_cost: float | None = None
    details: dict[str, Any] = field(default_factory=dict)
    seconds: float | None = None
    seconds_total: float | None = None
    threads: int = field(default_factory=torch.get_num_threads)
    device: str = "cpu"
    versions: dict[str, str] = field(default_factory=library_versions)
    image: str | None = None
    #: what the server saw when it differs from the case (a captured update carries its own defenses and clients)
    observed_defenses: list[str] | None = None
    observed_clients: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """The flat record (``metrics.json``): the case's fields at the top level, as every table reads them."""
        c = self.case.to_dict()
        out: dict[str, Any] = {
            "key": self.key,
            "attack": self.attack,
            "status": self.status,
            "reason": self.reason,
            "model": c["model"],
            "model_options": c["model_options"],
            "data": c["data"],
            "batch_size": c["batch_size"],
            "image_size": c.get("image_size"),  # None for a text case
            **({"seq_len": c["seq_len"], "vocab_size": c["vocab_size"]} if self.case.is_text else {}),
            "iterations": self.attack_settings.get("iterations"),
            "restarts": self.attack_settings.get("restarts"),
            "seed": self.case.seeds.data,
            "seeds": c["seeds"],
            "trained_steps": c["trained_steps"],
            "train_data": c["train_data"],
            "weights": c["weights"],
            "num_classes": c["num_classes"],
            "update": c["update"],
            "aggregation": c.get("aggregation", "mean"),
            "protocol": c["protocol"],
            "known_labels": c["known_labels"],
            **({"known_bn_statistics": True} if c.get("known_bn_statistics") else {}),
            "train_mode": c["train_mode"],
            "server": c["server"],
            "defenses": c["defenses"] if self.observed_defenses is None else self.observed_defenses,
            "clients": c["clients"] if self.observed_clients is None else self.observed_clients,
            "attack_settings": self.attack_settings,
        }
        skip = ("key", "case", "attack", "attack_settings", "status", "reason", "observed_defenses", "observed_clients")
        skip += () if self.case.is_text else TEXT_SCORES
        for f in dataclasses.fields(self):
            if f.name not in skip:
                out[f.name] = getattr(self, f.name)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RunRecord:
        """The record :meth:`to_dict` wrote (the case rebuilt from its fields)."""
        observed: dict[str, Any] = {}
        if data.get("update") is not None:  # the defenses and clients are the captured file's, not the case's
            observed = {"observed_defenses": data.get("defenses"), "observed_clients": data.get("clients")}
            data = {**data, "defenses": [], "clients": 1}
        fields = {f.name: data[f.name] for f in dataclasses.fields(Case) if f.name in data}
        if fields.get("image_size", 0) is None:  # a text case's record: the case has no image size
            del fields["image_size"]
        case = Case.from_dict(fields)
        names = {f.name for f in dataclasses.fields(cls)} - {"case"}
        return cls(case=case, **{k: v for k, v in data.items() if k in names}, **observed)


@dataclass(frozen=True, eq=False)
class CellResult:
    """A record with what it was computed from: the reconstruction, and the truth it was scored against.

    Text cases fill ``truth_tokens``, ``scored_tokens`` (one reconstructed sequence per true one, in the
    truth's order) and ``texts`` (the pairs decoded: private text, reconstructed text) instead of the images.
    """

    record: RunRecord
    reconstruction: Reconstruction | None = None
    truth_images: Tensor | None = None
    scored_images: Tensor | None = None  # one reconstruction per true image, in the truth's order
    client: Client | None = None
    truth_tokens: Tensor | None = None
    scored_tokens: Tensor | None = None
    texts: tuple[tuple[str, str], ...] | None = None


def run_cell(
    cell: Cell,
    *,
    cache: ModelCache | None = None,
    progress: bool = False,
    callback=None,
    compare_clean: bool = False,
    raise_errors: bool = False,
) -> CellResult:
    """Run one cell. An attack that does not apply is recorded as declined; any other :class:`GradinvError` is
    raised when ``raise_errors`` (a single command: the user's mistake) and otherwise recorded as failed (a grid
    goes on). ``compare_clean`` also records the cosine between the defended and the undefended update."""
    start = time.perf_counter()
    record = RunRecord(key=cell.key(), case=cell.case, attack=cell.attack, attack_settings=dict(cell.attack_settings))
    try:
        client = build_client(cell.case, cache=cache)
        if not all(bool(torch.isfinite(v).all()) for v in client.observation.update.values()):
            raise ConfigError(
                "the client's update is not finite: its local training diverged (e.g. FedAvg's learning rate is too "
                "large for this model); lower the local learning rate or the number of local steps"
            )
        record.device = str(client.observation.device)
        if cell.case.update is not None:
            record.observed_defenses = [spec_of(d) for d in client.observation.defenses]
            record.observed_clients = client.observation.clients
        record.dp_epsilon = _epsilon(client)
        if compare_clean and client.observation.defenses:
            from gradinv.defenses.functional import global_norm

            clean, seen = client.clean_update(), client.observation.update
            dot = sum(float((seen[k].double() * clean[k].double()).sum()) for k in seen)
            record.update_cosine = dot / max(float(global_norm(seen) * global_norm(clean)), 1e-300)
        if cell.is_labels:
            result = _run_labels(cell, client, record)
        else:
            result = _run_attack(cell, client, record, progress=progress, callback=callback)
    except GradinvError as exc:
        if _is_decline(exc):  # an assumption that only showed while running (e.g. every bias gradient zero)
            record.status, record.reason = "declined", str(exc)
        elif raise_errors:
            raise
        else:
            record.status, record.reason = "failed", str(exc)
        result = CellResult(record)
    record.seconds_total = round(time.perf_counter() - start, 3)
    return result


def _epsilon(client: Client) -> float | None:
    obs = client.observation
    return dp_epsilon(
        obs.defenses,
        protocol=obs.protocol,
        num_samples=client.case.batch_size // obs.clients,  # the smallest share: its samples take the most steps
    )


def _run_attack(cell: Cell, client: Client, record: RunRecord, *, progress: bool, callback) -> CellResult:
    attacker = build_attack(cell.attack, **dict(cell.attack_settings))
    if cell.case.is_text and not reconstructs_tokens(attacker):
        reasons = [
            f"{cell.attack} rebuilds images, but {cell.case.model} reads token ids: use a text attack "
            f"({', '.join(sorted(TEXT_ATTACKS))})"
        ]
    else:
        reasons = attacker.applicable(client.observation)
    settings = attacker.settings_dict()
    record.attack_settings = settings
    if reasons:
        record.status, record.reason = "declined", "; ".join(reasons)
        return CellResult(record, client=client)
    rec = attacker.reconstruct(client.observation, seed=cell.case.seeds.attack, progress=progress, callback=callback)
    record.label_source = rec.settings.get("label_source")
    record.attack_settings = {k: v for k, v in rec.settings.items() if k != "label_source"}
    record.labels_recovered = rec.labels.tolist() if rec.labels is not None else None
    record.seconds = round(rec.seconds, 3)
    record.final_cost = rec.trace[-1].cost if rec.trace else None
    record.details = {k: v for k, v in rec.extras.items() if isinstance(v, int | float | str | list)}
    truth = client.truth
    if truth is None:
        return CellResult(record, reconstruction=rec, client=client)
    if cell.case.is_text:
        return _score_tokens(cell, client, record, rec)
    rec_images = rec.images
    if rec_images.shape[0] != truth.images.shape[0] and rec_images.shape[1:] == truth.images.shape[1:]:
        # an attack that recovers some samples only (malicious servers): each true image is paired with its
        # best recovery
        from gradinv.attacks.imprint import score_recovered

        found = score_recovered(rec_images, truth.images, threshold_db=RECOVERED_DB)
        record.recovered_count = int(rec_images.shape[0])
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
    record.psnr = scores.mean_psnr
    record.psnr_per_sample = scores.psnr
    record.ssim = scores.mean_ssim
    record.ssim_per_sample = scores.ssim
    record.mse = scores.mean_mse
    record.recovered_fraction_40db = sum(p > RECOVERED_DB for p in scores.psnr) / len(scores.psnr)
    record.labels_true = truth.labels.tolist()
    if not cell.case.known_labels and rec.labels is not None:
        record.label_accuracy = label_accuracy(rec.labels, truth.labels)
    return CellResult(
        record,
        reconstruction=rec,
        truth_images=truth.images,
        scored_images=rec_images[scores.order],
        client=client,
    )


def _score_tokens(cell: Cell, client: Client, record: RunRecord, rec: Reconstruction) -> CellResult:
    """Score a text reconstruction: ROUGE and token accuracy after the optimal matching of sequences."""
    truth = client.truth
    tokens = rec.inputs.detach()
    if tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
        raise ConfigError(
            f"{cell.attack} returned {tokens.dtype} inputs, not token ids: a text case needs an attack that rebuilds "
            "tokens"
        )
    truth_tokens = truth.inputs.detach().cpu()
    tokens = tokens.cpu().long()
    if tokens.ndim != 2 or tokens.shape[1] != truth_tokens.shape[1] or tokens.shape[0] < truth_tokens.shape[0]:
        raise ConfigError(
            f"the reconstruction has shape {tuple(tokens.shape)} but the truth {tuple(truth_tokens.shape)}: "
            "check --batch-size and --seq-len match the captured update"
        )
    scores = score_text(tokens, truth_tokens)
    for name in TEXT_SCORES:
        setattr(record, name, scores[name])
    scored = tokens[match_sequences(tokens, truth_tokens)]
    if truth.labels is not None:
        record.labels_true = truth.labels.tolist()
        if not cell.case.known_labels and rec.labels is not None:
            record.label_accuracy = label_accuracy(rec.labels, truth.labels)
    texts = None
    decode = getattr(client.dataset, "decode", None)
    if callable(decode):
        texts = tuple(zip(decode(truth_tokens), decode(scored), strict=True))
    return CellResult(
        record, reconstruction=rec, client=client, truth_tokens=truth_tokens, scored_tokens=scored, texts=texts
    )


def reconstruction_markdown(result: CellResult) -> str:
    """``reconstruction.md`` of a text run: the scores, then each private sequence (decoded) above the
    reconstruction matched to it, with the tokens it got right at their position."""
    r = result.record
    lines = [f"# {r.attack} on {r.case.model}", ""]
    if r.status != "ok":
        return "\n".join([*lines, f"{r.status}: {r.reason}", ""])
    if r.rouge1 is not None:
        lines += [
            f"ROUGE-1 {r.rouge1:.3f} · ROUGE-2 {r.rouge2:.3f} · ROUGE-L {r.rougeL:.3f} · token accuracy "
            f"{r.token_accuracy:.3f} · exact {r.exact:.3f} · {r.seconds:.1f} s",
            "",
        ]
    if result.texts is None or result.truth_tokens is None or result.scored_tokens is None:
        return "\n".join([*lines, "(no private text to compare with: the run attacked a captured update)", ""])
    right = (result.truth_tokens == result.scored_tokens).sum(dim=1).tolist()
    length = int(result.truth_tokens.shape[1])
    for i, ((private, rebuilt), hits) in enumerate(zip(result.texts, right, strict=True), start=1):
        fence = "````" if "```" in private + rebuilt else "```"
        lines += [
            f"## Sequence {i}: {hits}/{length} tokens right",
            "",
            f"{fence}text",
            f"private:       {private}",
            f"reconstructed: {rebuilt}",
            fence,
            "",
        ]
    return "\n".join(lines)


AUXILIARY_SIZE = 32  # auxiliary samples given to llg-plus, disjoint from the client's batch


def _run_labels(cell: Cell, client: Client, record: RunRecord) -> CellResult:
    """A label method on the observation alone; scored by existence (set overlap) and count (multiset)."""
    method = cell.label_method
    options: dict[str, Any] = {}
    truth = client.truth
    if truth is not None and truth.labels is None:
        record.status, record.reason = "declined", f"{cell.case.model} is a language model: it has no class labels"
        return CellResult(record, client=client)
    if method == "llg-plus" and client.dataset is not None and not cell.case.is_text:
        from gradinv.data import sample_batch

        ds = client.dataset
        extra = max(0, min(AUXILIARY_SIZE, len(ds) - cell.case.batch_size))
        # the client's batch is the first batch_size of this sample (sample_batch is prefix-stable), so the
        # auxiliary samples are disjoint from it
        images, _ = sample_batch(ds, batch_size=cell.case.batch_size + extra, seed=cell.case.seeds.data)
        options["auxiliary"] = ds.normalization.normalize(images[cell.case.batch_size :])
    record.labels_true = sorted(truth.labels.tolist()) if truth is not None else None
    start = time.perf_counter()
    try:
        estimate = recover_labels(client.observation, method=method, **options)
    except GradinvError as exc:
        if not _is_decline(exc):
            raise
        record.status, record.reason = "declined", str(exc)
        return CellResult(record, client=client)
    record.seconds = round(time.perf_counter() - start, 6)
    record.labels_recovered = estimate.labels.tolist()
    record.details = {"counts_given": estimate.gives_counts}
    if truth is not None:
        record.label_existence = label_existence_accuracy(estimate.classes, truth.labels)
        record.label_count = label_accuracy(estimate.labels, truth.labels)
        record.label_accuracy = record.label_count
    return CellResult(record, client=client)


def _is_decline(exc: GradinvError) -> bool:
    from gradinv.errors import AttackError, MissingKnowledgeError

    return isinstance(exc, AttackError | MissingKnowledgeError)


__all__ = [
    "LABELS",
    "TEXT_ATTACKS",
    "TEXT_SCORES",
    "Cell",
    "CellResult",
    "RunRecord",
    "reconstruction_markdown",
    "reconstructs_tokens",
    "run_cell",
]
