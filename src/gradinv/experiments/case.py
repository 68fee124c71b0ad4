"""One case: everything that defines a client and its observer, as one frozen value.

A :class:`Case` is checked when it is built (every problem reported at once, with the fix) and turned into a
simulated client by :func:`build_client`. Every command, benchmark and grid builds its clients here, so a flag
means the same thing everywhere. Seeds are separate (:class:`Seeds`): the model, the client's batch, the
defenses' randomness and the attack each have their own, and one ``--seed`` sets all four.

Text: a case whose ``model`` is a text model (:data:`gradinv.models.TEXT_MODELS`: gpt2-tiny, bert-tiny...) is a
text case. Its ``data`` is a text source (``"text"``, ``"synthetic"``, a ``.txt`` file or a folder of them,
:func:`gradinv.data.load_text`), ``seq_len`` is the tokens per sequence and ``vocab_size`` the tokenizer's
largest vocabulary; the model's vocabulary is the tokenizer's (a ``vocab_size`` model option may widen it, never
narrow it). The client's batch is token ids, the scenario :meth:`~gradinv.fl.Scenario.from_tokens`, and the
same cells, grids and ``gradinv attack`` run it; ``image_size`` is unused.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from gradinv.data import BUILTIN_SOURCES, load_dataset, sample_batch
from gradinv.data.dataset import ImageDataset, Normalization
from gradinv.data.text import MAX_SEQ_LEN, MIN_SEQ_LEN, MIN_VOCAB_SIZE, TEXT_SOURCES, TextDataset, load_text
from gradinv.defenses import Defense, as_defense
from gradinv.errors import ConfigError, GradinvError, UpdateFileError
from gradinv.fl import FedSGD, Scenario, observation_from_files
from gradinv.fl.protocols import Protocol, protocol_from_dict
from gradinv.io import load_state_into, update_metadata
from gradinv.models import LANGUAGE_MODELS, MODELS, TEXT_MODELS, build_model, build_text_model, train_model
from gradinv.types import GroundTruth, Knowledge, Observation, ThreatModel

TRAIN_BATCH_SIZE = 8  # trained_steps: small batches keep a few hundred ResNet-18 steps near a minute on CPU
PUBLIC_SAMPLES = 512  # a malicious server's public data: images of the same source outside the client's batch
DEFAULT_SEQ_LEN = 16  # tokens per sequence of a text case
DEFAULT_VOCAB_SIZE = 5000  # the tokenizer's largest vocabulary (the bundled text has about 3,100 distinct tokens)


@dataclass(frozen=True)
class Seeds:
    """The four independent seeds of a run: the model's weights (and its training), the client's batch, the
    defenses' randomness (noise, masks, mixing partners) and the attack's random choices."""

    model: int = 0
    data: int = 0
    defense: int = 0
    attack: int = 0

    @classmethod
    def all(cls, seed: int) -> Seeds:
        """All four seeds equal: what one ``--seed`` means."""
        return cls(seed, seed, seed, seed)

    def vary(self, seed: int) -> Seeds:
        """Another client batch of the same deployment: the data, defense and attack seeds move, the model
        stays (so a model is built and trained once for all samples)."""
        return Seeds(self.model, seed, seed, seed)


def _freeze_options(options: Mapping[str, Any] | Sequence[tuple[str, Any]] | None) -> tuple[tuple[str, Any], ...]:
    items = options.items() if isinstance(options, Mapping) else (options or ())
    return tuple(sorted((str(k), tuple(v) if isinstance(v, list) else v) for k, v in items))


def _suggest(name: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


@dataclass(frozen=True)
class Case:
    """A client and its observer: model, data, batch, protocol, clients, defenses and threat model.

    ``model_options`` go to the model's builder (e.g. ``{"width": 16}``); ``weights`` loads a safetensors
    file; ``trained_steps`` first trains the model that many SGD steps on ``train_data`` (the state a server
    sends mid-training). ``update`` attacks a captured update file instead of simulating the client (the file's
    protocol, defenses and clients hold). ``server`` is ``"honest"`` or a malicious modification
    (``"imprint:128"``, ``"trap"``). ``seq_len`` and ``vocab_size`` belong to text cases (module docstring;
    None: 16 tokens and 5,000 words); an image case leaves them None.
    """

    model: str = "convnet"
    model_options: tuple[tuple[str, Any], ...] = ()
    weights: str | None = None
    num_classes: int | None = None
    trained_steps: int = 0
    train_data: str = "digits"
    data: str | None = "photos"
    image_size: int = 32
    seq_len: int | None = None
    vocab_size: int | None = None
    batch_size: int = 1
    protocol: Protocol = field(default_factory=FedSGD)
    clients: int = 1
    #: how the server gets the clients' mean: "mean" in the clear, or "ckks" (encrypted, only the sum decrypted)
    aggregation: str = "mean"
    defenses: tuple[Defense, ...] = ()
    train_mode: bool = False
    known_labels: bool = False
    #: the threat model hands the attacker every BatchNorm layer's mean and variance on the client's batch
    #: (GradAttack's "BN exact", the statistics GradInversion's prior is evaluated with; Huang et al. 2021)
    known_bn_statistics: bool = False
    server: str = "honest"
    update: str | None = None
    seeds: Seeds = field(default_factory=Seeds)

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "model_options", _freeze_options(self.model_options))
        for name in ("weights", "update", "data"):
            value = getattr(self, name)
            if isinstance(value, Path):
                set_(self, name, str(value))
        if isinstance(self.seeds, int) and not isinstance(self.seeds, bool):
            set_(self, "seeds", Seeds.all(self.seeds))
        if self.is_text:
            if self.seq_len is None:
                set_(self, "seq_len", DEFAULT_SEQ_LEN)
            if self.vocab_size is None:
                set_(self, "vocab_size", DEFAULT_VOCAB_SIZE)
        problems = self.problems()
        if problems:
            raise ConfigError("; ".join(problems))

    def problems(self) -> list[str]:
        """Every problem of this case, each with its fix (empty: the case is valid). Also normalises the
        defenses to :class:`Defense` objects (spec strings are parsed here, once)."""
        problems: list[str] = []
        if self.model not in MODELS and self.model not in TEXT_MODELS:
            names = sorted([*MODELS, *TEXT_MODELS])
            problems.append(
                f"unknown model {self.model!r}{_suggest(self.model, names)}: choose one of {', '.join(names)}"
            )
        for name, lowest in (("image_size", 1), ("batch_size", 1), ("clients", 1), ("trained_steps", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < lowest:
                problems.append(f"{name} must be an integer >= {lowest}, got {value!r}")
        if self.num_classes is not None and (not isinstance(self.num_classes, int) or self.num_classes < 1):
            problems.append(f"num_classes must be a positive integer or None, got {self.num_classes!r}")
        if isinstance(self.clients, int) and isinstance(self.batch_size, int) and self.clients > self.batch_size:
            problems.append(
                f"{self.clients} clients cannot share a batch of {self.batch_size}: raise --batch-size to at least "
                f"{self.clients} or lower --clients"
            )
        if not (hasattr(self.protocol, "update_kind") and hasattr(self.protocol, "to_dict")):
            problems.append(f"protocol must be FedSGD() or FedAvg(...), got {self.protocol!r}")
        if isinstance(self.defenses, str):
            problems.append(
                f"defenses is a sequence of specs, got the string {self.defenses!r}: write ({self.defenses!r},)"
            )
        else:
            parsed = []
            for item in self.defenses:
                try:
                    defense = as_defense(item)
                    if self.is_text:
                        _check_text_defense(defense, self.seq_len)
                    else:
                        check = getattr(defense, "check_input_shape", None)
                        if check is not None and isinstance(self.image_size, int) and self.image_size > 0:
                            check((3, self.image_size, self.image_size))
                    parsed.append(defense)
                except GradinvError as exc:
                    problems.append(str(exc))
            object.__setattr__(self, "defenses", tuple(parsed))
        text_models = ", ".join(sorted(TEXT_MODELS))
        if self.is_text:
            problems += self._text_problems()
        elif self.seq_len is not None or self.vocab_size is not None:
            problems.append(
                f"seq_len and vocab_size (--seq-len, --vocab-size) belong to text models ({text_models}), not to "
                f"{self.model}: drop them"
            )
        if not self.is_text and self.data is not None and _is_text_only(self.data):
            problems.append(
                f"data {self.data!r} is text, but {self.model} takes images: use a text model ({text_models}) or "
                f"image data ({', '.join(BUILTIN_SOURCES)}, a folder of images, an .npz file)"
            )
        elif not self.is_text and self.data is not None and not _known_data(self.data):
            problems.append(
                f"unknown data {self.data!r}{_suggest(self.data, sorted(BUILTIN_SOURCES))}: use "
                f"{', '.join(n for n in BUILTIN_SOURCES)}, a folder of images or an .npz file"
            )
        if self.trained_steps and not self.is_text and not _known_data(self.train_data):
            problems.append(
                f"unknown training data {self.train_data!r}: use digits, photos, photo-crops, a folder or an .npz file"
            )
        if self.known_bn_statistics and (self.is_text or self.update is not None):
            problems.append(
                "known_bn_statistics needs a simulated image client (the statistics are measured on its batch): "
                "drop it for text models and captured updates"
            )
        for name in ("weights", "update"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                problems.append(f"--{name} file '{path}' does not exist: give the path of a .safetensors file")
        if self.update is not None and (self.defenses or self.clients > 1):
            problems.append(
                "a captured --update already holds its clients' defenses and aggregation: give --defense and "
                "--clients to capture"
            )
        if self.aggregation not in ("mean", "ckks"):
            problems.append(f"aggregation must be 'mean' or 'ckks', got {self.aggregation!r}")
        elif self.update is not None and self.aggregation != "mean":
            problems.append("a captured --update is already aggregated: give --aggregation to capture")
        if self.update is None and self.data is None:
            problems.append("a simulated client needs --data (its private batch)")
        try:
            _parse_server_spec(self.server)
        except GradinvError as exc:
            problems.append(str(exc))
        return problems

    @property
    def is_text(self) -> bool:
        """Whether this is a text case (its model takes token ids)."""
        return self.model in TEXT_MODELS

    @property
    def is_language_model(self) -> bool:
        """Whether the model is a causal language model (next-token loss, no class labels)."""
        return self.model in LANGUAGE_MODELS

    def _text_problems(self) -> list[str]:
        """What a text case gets wrong: its sizes, its data, and the settings only image cases have."""
        problems: list[str] = []
        for name, lowest, highest in (("seq_len", MIN_SEQ_LEN, MAX_SEQ_LEN), ("vocab_size", MIN_VOCAB_SIZE, None)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < lowest:
                problems.append(f"{name} must be an integer >= {lowest}, got {value!r}")
            elif highest is not None and value > highest:
                problems.append(f"{name} must be at most {highest}, got {value}")
        positions = _text_positions(self.model, dict(self.model_options))
        if isinstance(positions, int) and isinstance(self.seq_len, int) and self.seq_len > positions:
            problems.append(
                f"--seq-len {self.seq_len} is longer than {self.model}'s {positions} positions: use --seq-len "
                f"{positions} or less, or --model-option n_positions={self.seq_len}"
            )
        if self.data is not None and not _is_text_source(self.data):  # an existing path: load_text says what is wrong
            shown = f"{', '.join(TEXT_SOURCES)}, a .txt file or a folder of .txt files"
            if str(self.data).strip().lower() in BUILTIN_SOURCES:
                problems.append(f"data {self.data!r} is images, but {self.model} is a text model: use {shown}")
            else:
                suggestion = _suggest(self.data, list(TEXT_SOURCES))
                problems.append(f"unknown text data {self.data!r}{suggestion}: use {shown}")
        if self.trained_steps:
            problems.append(
                f"training a text model first (--trained-steps) is not supported: drop it, or pass trained weights "
                f"of {self.model} with --weights"
            )
        if isinstance(self.server, str) and self.server.strip().lower() not in ("honest", "none", ""):
            problems.append(
                f"malicious servers (--server {self.server}) modify image models: text cases take --server honest"
            )
        return problems

    @property
    def seed(self) -> int:
        """The data seed: which client batch this is (the ``seed`` column of tables)."""
        return self.seeds.data

    def replace(self, **changes: Any) -> Case:
        """A copy with ``changes`` (checked again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """The case as plain JSON values (defenses as spec strings, the protocol as its dict)."""
        return {
            "model": self.model,
            "model_options": {k: list(v) if isinstance(v, tuple) else v for k, v in self.model_options},
            "weights": self.weights,
            "num_classes": self.num_classes,
            "trained_steps": self.trained_steps,
            "train_data": self.train_data if self.trained_steps else None,
            "data": self.data,
            **(
                {"seq_len": self.seq_len, "vocab_size": self.vocab_size}
                if self.is_text
                else {"image_size": self.image_size}
            ),
            "batch_size": self.batch_size,
            "protocol": self.protocol.to_dict(),
            "clients": self.clients,
            **({"aggregation": self.aggregation} if self.aggregation != "mean" else {}),  # keeps older keys
            "defenses": [d.spec() for d in self.defenses],
            "train_mode": self.train_mode,
            "known_labels": self.known_labels,
            **({"known_bn_statistics": True} if self.known_bn_statistics else {}),  # keeps older keys
            "server": self.server,
            "update": self.update,
            "seeds": dataclasses.asdict(self.seeds),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Case:
        """The case :meth:`to_dict` wrote."""
        values = dict(data)
        values["protocol"] = protocol_from_dict(values.get("protocol") or {"name": "fedsgd"})
        values["seeds"] = Seeds(**values.get("seeds", {}))
        values["defenses"] = tuple(values.get("defenses", ()))
        if values.get("train_data") is None:
            values.pop("train_data", None)
        return cls(**values)

    def model_key(self) -> tuple:
        """What decides the model's weights: built and trained once per distinct key."""
        return (
            self.model,
            self.model_options,
            self.weights,
            self.num_classes,
            self.trained_steps,
            self.train_data if self.trained_steps else None,
            self.data,
            self.image_size,
            self.seeds.model,
            *((self.vocab_size,) if self.is_text else ()),  # the tokenizer's vocabulary is the model's
        )


def _is_text_source(data: str) -> bool:
    """A named text source or an existing path (a ``.txt`` file or a folder of them; :func:`load_text` names
    what is wrong with any other)."""
    return str(data).strip().lower() in TEXT_SOURCES or Path(data).expanduser().exists()


def _is_text_only(data: str) -> bool:
    """Data only a text model reads: the bundled ``"text"`` or a ``.txt`` file (``"synthetic"`` and folders
    serve both kinds of models)."""
    path = Path(data).expanduser()
    if str(data).strip().lower() == "text" and not path.exists():
        return True
    return path.is_file() and path.suffix.lower() == ".txt"


def _text_positions(model: str, options: Mapping[str, Any]) -> int | None:
    """The positions text model ``model`` is built with: its ``n_positions`` option, else the builder's default."""
    import inspect

    if "n_positions" in options:
        value = options["n_positions"]
        return value if isinstance(value, int) and not isinstance(value, bool) else None
    default = inspect.signature(TEXT_MODELS[model]).parameters.get("n_positions")
    return None if default is None or default.default is inspect.Parameter.empty else default.default


def _check_text_defense(defense: Defense, seq_len: int | None) -> None:
    """Refuse, in one line, a defense that cannot act on token ids: those on pixels say so themselves
    (``check_inputs``); Soteria differentiates the representation with respect to the inputs, which token ids
    do not allow."""
    check = getattr(defense, "check_inputs", None)
    if callable(check):
        check(torch.zeros(1, seq_len if isinstance(seq_len, int) and seq_len > 0 else 1, dtype=torch.int64))
    if defense.name == "soteria":  # until Soteria refuses token ids itself (check_inputs)
        raise ConfigError(
            "soteria scores features by their gradient with respect to the inputs, which token ids do not have: "
            "use an update defense such as noise, dpsgd, prune or sign for a text model"
        )
    if defense.stage == "data" and not callable(check):
        raise ConfigError(f"{defense.name} acts on the client's data and says nothing of token ids: use it on images")


def _known_data(data: str) -> bool:
    name = str(data).strip().lower()
    return name in BUILTIN_SOURCES or name == "synthetic" or name.startswith("synthetic:") or Path(data).exists()


def _parse_server_spec(spec: str) -> None:
    from gradinv.fl.malicious import parse_server

    if not isinstance(spec, str):
        raise ConfigError(f"server must be a spec such as 'honest' or 'imprint:128', got {spec!r}")
    parse_server(spec)


# -- building the client -------------------------------------------------------------------------------------


class ModelCache:
    """Models by :meth:`Case.model_key`, so a grid builds (and trains) each distinct model once.

    ``builds`` counts the models built here; a cached model is returned as a deep copy, so a run can never
    change the model the next run gets.
    """

    def __init__(self) -> None:
        self._models: dict[tuple, nn.Module] = {}
        self._data: dict[tuple[str, int], ImageDataset] = {}
        self._text: dict[tuple, TextDataset] = {}
        self.builds = 0

    def dataset(self, source: str, image_size: int) -> ImageDataset:
        key = (str(source), image_size)
        if key not in self._data:
            self._data[key] = load_dataset(source, image_size=image_size, channels=3)
        return self._data[key]

    def text_dataset(self, case: Case) -> TextDataset:
        """The text case's sequences (its source cut to ``seq_len`` tokens, with the tokenizer), loaded once."""
        key = (str(case.data), case.seq_len, case.vocab_size, case.num_classes)
        if key not in self._text:
            self._text[key] = load_text(
                case.data, seq_len=case.seq_len, vocab_size=case.vocab_size, num_classes=case.num_classes
            )
        return self._text[key]

    def model(self, case: Case, *, num_classes: int) -> nn.Module:
        import copy

        key = case.model_key()
        if key not in self._models:
            self._models[key] = self._build(case, num_classes=num_classes)
            self.builds += 1
        return copy.deepcopy(self._models[key])

    def __contains__(self, case: Case) -> bool:
        return case.model_key() in self._models

    def put(self, case: Case, model: nn.Module) -> None:
        """Seed the cache with a model built elsewhere (e.g. by the parent of a worker process)."""
        self._models[case.model_key()] = model

    def _build(self, case: Case, *, num_classes: int) -> nn.Module:
        if case.is_text:
            return self._build_text(case, num_classes=num_classes)
        model = build_model(
            case.model,
            num_classes=num_classes,
            in_channels=3,
            image_size=case.image_size,
            seed=case.seeds.model,
            **dict(case.model_options),
        )
        if case.weights is not None:
            load_state_into(model, case.weights)
        if case.trained_steps:
            train = self.dataset(case.train_data, case.image_size)
            if train.num_classes > num_classes:
                raise ConfigError(
                    f"the training data '{train.name}' has {train.num_classes} classes but the model {num_classes}: "
                    "raise --num-classes"
                )
            train_model(
                model,
                images=train.normalization.normalize(train.images),
                labels=train.labels,
                steps=case.trained_steps,
                batch_size=TRAIN_BATCH_SIZE,
                seed=case.seeds.model,
            )
        return model

    def _build_text(self, case: Case, *, num_classes: int) -> nn.Module:
        """A text model whose vocabulary is the tokenizer's (a ``vocab_size`` option may only widen it)."""
        options = dict(case.model_options)
        tokenizer_vocab = self.text_dataset(case).vocab_size if case.data is not None else case.vocab_size
        vocab = options.pop("vocab_size", tokenizer_vocab)
        if isinstance(vocab, bool) or not isinstance(vocab, int):
            raise ConfigError(f"model {case.model!r} option 'vocab_size' must be an integer, got {vocab!r}")
        if vocab < tokenizer_vocab:
            raise ConfigError(
                f"--model-option vocab_size={vocab} is smaller than the tokenizer's vocabulary of {tokenizer_vocab} "
                f"tokens (data {case.data!r}, --vocab-size {case.vocab_size}): token ids would fall outside the "
                f"model; drop the option or pass --vocab-size {vocab}"
            )
        model = build_text_model(
            case.model, vocab_size=vocab, num_classes=num_classes, seed=case.seeds.model, **options
        )
        if case.weights is not None:
            load_state_into(model, case.weights)
        return model


@dataclass(frozen=True, eq=False)
class Client:
    """A built case: the model as the server sends it, the data, what the server observes and, when the batch
    is known, the truth to score against."""

    case: Case
    model: nn.Module
    dataset: ImageDataset | TextDataset | None
    observation: Observation
    truth: GroundTruth | None
    scenario: Scenario | None = None

    def clean_update(self) -> dict[str, Tensor]:
        """The update the same client would share without its defenses (the defenses' price in cosine)."""
        if self.scenario is None:
            raise ConfigError("the clean update needs a simulated client, not a captured --update")
        return dict(dataclasses.replace(self.scenario, defenses=()).observe().update)


def num_classes(case: Case, cache: ModelCache) -> int:
    """The one rule for the model's classes: ``case.num_classes``, else enough for the client's data and, when
    the model is trained first, its training data (10 without data)."""
    if case.num_classes is not None:
        return case.num_classes
    if case.is_text:
        return max(2, cache.text_dataset(case).num_classes) if case.data is not None else 2
    classes = cache.dataset(case.data, case.image_size).num_classes if case.data is not None else 10
    if case.trained_steps:
        classes = max(classes, cache.dataset(case.train_data, case.image_size).num_classes)
    return classes


def build_client(case: Case, *, cache: ModelCache | None = None) -> Client:
    """Simulate the client of ``case`` (or load its captured update) and return what the server observes."""
    cache = cache or ModelCache()
    classes = num_classes(case, cache)
    model = cache.model(case, num_classes=classes)
    if case.is_text:
        return _text_client(case, cache, model, classes)
    dataset = cache.dataset(case.data, case.image_size) if case.data is not None else None
    images = labels = None
    if dataset is not None:
        images, labels = sample_batch(dataset, batch_size=case.batch_size, seed=case.seeds.data)
        _check_label_range(labels, classes)
    if case.update is not None:
        return _from_file(case, model, dataset, images, labels)
    scenario = Scenario.from_images(
        model,
        images,
        labels,
        normalization=dataset.normalization,
        threat=ThreatModel(
            known_labels=case.known_labels,
            known_bn_statistics=case.known_bn_statistics,
            server=_server(case.server, dataset, images, case.image_size),
        ),
        **_client_options(case),
    )
    return _simulated(case, model, dataset, scenario)


def _client_options(case: Case) -> dict[str, Any]:
    """The scenario settings an image and a text client share: protocol, mode, defenses, seed, clients, aggregation."""
    return {
        "protocol": case.protocol,
        "train_mode": case.train_mode,
        "defenses": case.defenses,
        "seed": case.seeds.defense,
        "clients": case.clients,
        "aggregation": case.aggregation,
    }


def _simulated(case: Case, model: nn.Module, dataset: Any, scenario: Scenario) -> Client:
    """The client of a simulated ``scenario``: what its server observes and the truth to score against."""
    return Client(
        case=case,
        model=model,
        dataset=dataset,
        observation=scenario.observe(),
        truth=scenario.ground_truth(),
        scenario=scenario,
    )


def _check_label_range(labels: Tensor, classes: int) -> None:
    """Refuse a batch whose labels the model's classifier cannot output."""
    if int(labels.max()) >= classes:
        raise ConfigError(
            f"the data has labels up to {int(labels.max())} but the model has {classes} classes: raise --num-classes"
        )


def _text_client(case: Case, cache: ModelCache, model: nn.Module, classes: int) -> Client:
    """A text case's client: a batch of token sequences, trained on with next-token loss (language models) or
    cross-entropy against the sequences' classes (classifiers)."""
    dataset = cache.text_dataset(case) if case.data is not None else None
    tokens = labels = None
    if dataset is not None:
        tokens, labels = dataset.sample(case.batch_size, seed=case.seeds.data)
        if case.is_language_model:
            labels = None
        else:
            _check_label_range(labels, classes)
    if case.update is not None:
        return _from_file(case, model, dataset, tokens, labels)
    scenario = Scenario.from_tokens(
        model,
        tokens,
        labels,
        threat=ThreatModel(known_labels=case.known_labels),
        **_client_options(case),
    )
    return _simulated(case, model, dataset, scenario)


def spec_of(defense: Defense | str) -> str:
    """A defense as its spec string (the form files and tables hold)."""
    return defense if isinstance(defense, str) else defense.spec()


def weights_fingerprint(model: nn.Module) -> str:
    """A short hash of a model's parameters and buffers: an update file records the weights it was computed on."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def capture_metadata(case: Case, client: Client) -> dict[str, Any]:
    """What an update file records beside the update, so attacking it later replays the right client."""
    return {
        "protocol": case.protocol.to_dict(),
        "defenses": [spec_of(d) for d in client.observation.defenses],
        "clients": client.observation.clients,
        "batch_size": case.batch_size,
        **(
            {"seq_len": case.seq_len, "vocab_size": case.vocab_size}
            if case.is_text
            else {"image_size": case.image_size}
        ),
        "seeds": dataclasses.asdict(case.seeds),
        "train_mode": case.train_mode,
        "weights_sha": weights_fingerprint(client.model),
    }


def _from_file(
    case: Case,
    model: nn.Module,
    dataset: ImageDataset | TextDataset | None,
    images: Tensor | None,
    labels: Tensor | None,
) -> Client:
    """A captured update's client; in a text case ``images`` are token ids (``labels`` None for a language
    model)."""
    meta = update_metadata(case.update)
    truth = None
    if case.is_text:
        norm = None
        if images is not None:
            truth = GroundTruth(inputs=images, labels=labels, normalization=None)
        input_shape: tuple[int, ...] = (case.seq_len,)
    else:
        norm = dataset.normalization if dataset is not None else Normalization.identity(3)
        if images is not None:
            truth = GroundTruth(inputs=norm.normalize(images), labels=labels, normalization=norm)
        input_shape = (3, case.image_size, case.image_size)
    known = case.known_labels and truth is not None and truth.labels is not None
    knowledge = Knowledge(
        input_shape=input_shape,
        num_samples=case.batch_size,
        labels=truth.labels.clone() if known else None,
        normalization=norm,
    )
    observation = observation_from_files(
        model,
        update_path=case.update,
        protocol=case.protocol,
        knowledge=knowledge,
        train_mode=case.train_mode,
        defenses=_saved_defenses(meta, case.update),
        clients=_saved_clients(meta, case.update),
    )
    _check_file_matches(case, meta, model)  # after the names and shapes: a wrong model is named as such first
    return Client(case=case, model=model, dataset=dataset, observation=observation, truth=truth)


def file_case(case: Case, *, explicit: Sequence[str] = ()) -> Case:
    """``case`` with the fields an update file records (protocol, batch size, image size, seeds, train mode)
    taken from the file. A field named in ``explicit`` (given by the user) that contradicts the file is an error:
    the file's recorded client wins, never silently a different one."""
    if case.update is None:
        return case
    meta = update_metadata(case.update)
    changes: dict[str, Any] = {}
    recorded: dict[str, Any] = {}
    if "protocol" in meta:
        if not isinstance(meta["protocol"], dict):
            raise UpdateFileError(f"{case.update}: its 'protocol' metadata must be a dict, got {meta['protocol']!r}")
        try:
            recorded["protocol"] = protocol_from_dict(meta["protocol"])
        except (GradinvError, TypeError, KeyError) as exc:
            raise UpdateFileError(f"{case.update}: its 'protocol' metadata is not a protocol ({exc})") from None
    for name in ("batch_size", "image_size", "train_mode", "seq_len", "vocab_size"):
        if name in meta:
            recorded[name] = meta[name]
    if isinstance(meta.get("seeds"), dict):
        try:
            recorded["seeds"] = Seeds(**meta["seeds"])
        except TypeError:
            raise UpdateFileError(f"{case.update}: its 'seeds' metadata is malformed: {meta['seeds']!r}") from None
    for name, value in recorded.items():
        if name in explicit and getattr(case, name) != value:
            shown = value.to_dict() if hasattr(value, "to_dict") else value
            raise ConfigError(
                f"the update file {case.update} was captured with {name} {shown!r}, but this run asks for "
                f"{getattr(case, name)!r}: drop the flag (the file's value holds) or capture again"
            )
        changes[name] = value
    return case.replace(**changes) if changes else case


def _check_file_matches(case: Case, meta: Mapping[str, Any], model: nn.Module) -> None:
    sha = meta.get("weights_sha")
    if isinstance(sha, str) and sha != weights_fingerprint(model):
        raise ConfigError(
            f"the update file {case.update} was computed on other model weights than this run builds: pass the "
            "captured --weights file (weights.safetensors beside it) and the same --model and --model-option"
        )


def _saved_defenses(meta: Mapping[str, Any], path: str | Path) -> tuple[Defense, ...]:
    """The defenses an update file's metadata names (each checked by parsing it)."""
    specs = meta.get("defenses", [])
    if not isinstance(specs, list) or not all(isinstance(d, str) for d in specs):
        raise UpdateFileError(f"{path}: its 'defenses' metadata must be a list of defense specs, got {specs!r}")
    return tuple(as_defense(d) for d in specs)


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
