"""Grids: many cells from one YAML file (a product of lists, or an explicit list), run by one runner.

```yaml
attacks: [invgrad, dlg]
models: [convnet:width=16, mlp]          # a model spec: NAME or NAME:OPTION=VALUE,...
data: [photos]
image_sizes: [32]
batch_sizes: [1, 4]
protocols: [fedsgd, "fedavg:local_steps=5,lr=0.1"]
clients: [1]
defenses: [[], [noise:1e-2], [prune:0.9]]   # each entry a list of specs, [] for none
seeds: [0, 1]                             # client batches (data, defense and attack seeds; the model's is fixed)
attack_options: {invgrad: {iterations: 200}}
```

Keys are the plural of the case fields (a singular key or a scalar sets one value); a missing key takes the CLI's
default. ``cells: [{attack: ..., model: ..., ...}, ...]`` lists cells explicitly instead. Every cell is checked
before any runs.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gradinv.errors import ConfigError, GradinvError
from gradinv.experiments.case import Case, Seeds
from gradinv.experiments.runner import LABELS, Cell

#: YAML key -> Case field, for the keys that vary (plural) and the ones that are fixed (singular)
AXES = {
    "attacks": "attack",
    "models": "model",
    "trained_steps": "trained_steps",
    "data": "data",
    "image_sizes": "image_size",
    "batch_sizes": "batch_size",
    "seq_lens": "seq_len",
    "vocab_sizes": "vocab_size",
    "protocols": "protocol",
    "clients": "clients",
    "defenses": "defenses",
    "seeds": "seed",
}
FIXED = (
    "num_classes",
    "train_data",
    "weights",
    "known_labels",
    "known_bn_statistics",
    "train_mode",
    "server",
    "model_seed",
    "name",
)
KNOWN = set(AXES) | set(AXES.values()) | set(FIXED) | {"attack_options", "cells", "samples"}


def parse_value(text: str) -> Any:
    """A spec's value: int, float, a comma list in a tuple, or the text."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    return text


def parse_model(spec: str | Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """``"convnet:width=16"`` -> ``("convnet", {"width": 16})``; ``channels=12;36;4`` gives a tuple; a mapping
    ``{name: cnn6, activation: sigmoid}`` works too."""
    if isinstance(spec, Mapping):
        options = dict(spec)
        return str(options.pop("name")), options
    name, _, rest = str(spec).partition(":")
    options: dict[str, Any] = {}
    for part in [p for p in rest.split(",") if p.strip()]:
        key, eq, raw = part.partition("=")
        if not eq:
            raise ConfigError(f"model spec {spec!r}: write NAME:OPTION=VALUE,... (e.g. convnet:width=16)")
        values = [parse_value(v.strip()) for v in raw.split(";")]
        options[key.strip()] = tuple(values) if len(values) > 1 else values[0]
    return name.strip(), options


def parse_protocol(spec: Any):
    """``fedsgd``, ``fedavg``, ``fedavg:5`` (local steps) or ``fedavg:local_steps=5,lr=0.1,local_batch_size=4``:
    the one protocol grammar (:data:`gradinv.registry.PROTOCOLS`)."""
    from gradinv.registry import PROTOCOLS

    return spec if hasattr(spec, "update_kind") else PROTOCOLS.parse(str(spec).strip())


@dataclass(frozen=True)
class Grid:
    """The cells of a grid, in the order they run, and the settings they came from."""

    cells: tuple[Cell, ...]
    spec: Mapping[str, Any]
    name: str = "grid"

    def __len__(self) -> int:
        return len(self.cells)


def load_grid(path: str | Path) -> Grid:
    """A grid from a YAML file (see the module's docstring)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"grid file '{path}' does not exist: give the path of a .yaml grid")
    try:
        spec = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"grid file '{path}' is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(spec, Mapping):
        raise ConfigError(
            f"grid file '{path}' must hold a mapping of keys (attacks, models, ...), got {type(spec).__name__}"
        )
    return make_grid(spec, name=str(spec.get("name", path.stem)))


def _as_list(key: str, value: Any) -> list[Any]:
    if key == "defenses":
        if value is None or value == []:
            return [[]]
        if isinstance(value, str):
            return [[value]]
        # a list of lists; a flat list of strings means one defense per entry
        return [v if isinstance(v, list) else ([] if v in (None, "none") else [v]) for v in value]
    if isinstance(value, list):
        if not value:
            raise ConfigError(f"grid key {key!r} is an empty list: give at least one value or drop the key")
        return value
    return [value]


def make_grid(spec: Mapping[str, Any], *, name: str = "grid", defaults: Mapping[str, Any] | None = None) -> Grid:
    """The cells of a grid mapping. Every problem with a key is reported before any cell runs."""
    unknown = sorted(set(spec) - KNOWN)
    if unknown:
        raise ConfigError(f"unknown grid key(s) {unknown}: use {', '.join(sorted(AXES))}, attack_options or cells")
    options = spec.get("attack_options") or {}
    if not isinstance(options, Mapping) or not all(isinstance(v, Mapping) for v in options.values()):
        raise ConfigError("attack_options maps an attack's name to its settings, e.g. {invgrad: {iterations: 200}}")
    base = {**(defaults or {}), **{k: v for k, v in spec.items() if k not in ("cells", "attack_options", "name")}}
    if "samples" in base:  # shorthand: seeds 0..samples-1 from `seed`
        first = base.pop("seed", 0) if not isinstance(base.get("seed"), list) else 0
        base["seeds"] = list(range(int(first), int(first) + int(base.pop("samples"))))
    rows: list[dict[str, Any]] = []
    if "cells" in spec:
        if not isinstance(spec["cells"], list):
            raise ConfigError("grid key 'cells' must be a list of mappings")
        for item in spec["cells"]:
            rows.append({**{AXES.get(k, k): v for k, v in base.items()}, **dict(item)})
    else:
        axes = [(AXES.get(k, k), _as_list(k, v)) for k, v in base.items() if k in AXES]
        fixed = {k: v for k, v in base.items() if k not in AXES}
        for combo in itertools.product(*[values for _, values in axes]):
            rows.append({**fixed, **dict(zip([field for field, _ in axes], combo, strict=True))})
    problems = _axis_problems(base, options) if "cells" not in spec else []
    cells = []
    for row in [] if problems else rows:
        try:
            cells.append(cell_from_row(row, options))
        except GradinvError as exc:
            problems.append(str(exc))
    if problems:
        unique = list(dict.fromkeys(problems))
        raise ConfigError(f"the grid has {len(unique)} problem(s): " + "; ".join(unique))
    seen, ordered = set(), []
    for c in cells:
        if c.key() not in seen:
            seen.add(c.key())
            ordered.append(c)
    return Grid(cells=tuple(ordered), spec=dict(spec), name=name)


def _axis_problems(base: Mapping[str, Any], options: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Every bad value of every axis, each checked once on its own (a product would repeat or hide them)."""
    from gradinv.attacks import ATTACKS
    from gradinv.attacks.labels import check_methods
    from gradinv.defenses import as_defense
    from gradinv.models import MODELS

    problems: list[str] = []

    def check(fn, *args) -> None:
        try:
            fn(*args)
        except GradinvError as exc:
            problems.append(str(exc))

    for attack in _as_list("attacks", base.get("attacks", [])) if "attacks" in base else []:
        if str(attack).startswith(LABELS):
            check(check_methods, [str(attack).removeprefix(LABELS)])
        else:
            check(ATTACKS.lookup, str(attack))
    for model in _as_list("models", base["models"]) if "models" in base else []:
        name, _ = parse_model(model)
        if name not in MODELS:
            check(Case, name)
    for protocol in _as_list("protocols", base["protocols"]) if "protocols" in base else []:
        check(parse_protocol, protocol)
    for specs in _as_list("defenses", base["defenses"]) if "defenses" in base else []:
        for d in specs:
            check(as_defense, d)
    for name, settings in options.items():
        check(lambda n=name, kw=settings: ATTACKS.lookup(n)(**dict(kw)))
    return list(dict.fromkeys(problems))


def cell_from_row(row: Mapping[str, Any], attack_options: Mapping[str, Mapping[str, Any]] | None = None) -> Cell:
    """One cell from a flat mapping of case fields plus ``attack`` (and ``seed``: the client batch)."""
    row = dict(row)
    if "attack" not in row:
        raise ConfigError("every cell needs an attack: add 'attacks: [invgrad]' (see `gradinv list`)")
    attack = str(row.pop("attack"))
    model, model_options = parse_model(row.pop("model", "convnet"))
    model_options = {**model_options, **dict(row.pop("model_options", {}) or {})}
    seed = int(row.pop("seed", 0))
    model_seed = int(row.pop("model_seed", 0))  # one model for every client batch of the grid
    seeds = Seeds(model=model_seed, data=seed, defense=seed, attack=seed)
    if isinstance(row.get("seeds"), Mapping):  # a cell may name its four seeds: {model: 0, data: 22, attack: 0}
        try:
            seeds = Seeds(**{**dataclasses.asdict(seeds), **row.pop("seeds")})
        except TypeError:
            raise ConfigError("a cell's seeds name model, data, defense and attack, e.g. {model: 0, data: 3}") from None
    row.pop("name", None)
    defenses = row.pop("defenses", ())
    if isinstance(defenses, str):
        defenses = [defenses]
    values: dict[str, Any] = {
        "model": model,
        "model_options": model_options,
        "protocol": parse_protocol(row.pop("protocol", "fedsgd")),
        "defenses": tuple(defenses or ()),
        "seeds": seeds,
    }
    for key, value in row.items():
        if key in ("data", "weights", "update") and value is not None:
            value = str(value)
        values[key] = value
    try:
        case = Case(**values)
    except TypeError as exc:
        raise ConfigError(f"a cell has an unknown field: {exc}") from None
    settings = dict((attack_options or {}).get(attack, {}))
    return Cell(case, attack, tuple(settings.items()))


def run_grid(
    grid: Grid,
    out: str | Path,
    *,
    executor: str = "local",
    workers: int = 1,
    address: str | None = None,
    threads: int | None = None,
    resume: bool = False,
    progress: bool = False,
    report: bool = True,
) -> list[dict[str, Any]]:
    """Run ``grid`` into the store at ``out`` (``--resume`` continues it), then write ``report.html`` and
    ``results.csv``. Returns every cell's record."""
    from gradinv.experiments.executors import run_cells
    from gradinv.experiments.store import Store

    with Store(out) as store:
        records = run_cells(
            grid.cells,
            store,
            compare_clean=True,
            executor=executor,
            workers=workers,
            address=address,
            threads=threads,
            resume=resume,
            progress=progress,
        )
        store.set_meta(name=grid.name, grid=grid.spec)
    if report:
        write_report_for(out)
    return records


def write_report_for(out: str | Path) -> tuple[Path, Path]:
    """``report.html`` and ``results.csv`` of the store at ``out`` (what ``gradinv report DIR`` runs)."""
    from gradinv.experiments.report import write_report
    from gradinv.experiments.store import DB, Store, StoreError

    root = Path(out)
    if not (root / DB).is_file():
        raise StoreError(f"'{root}' holds no results store ({DB}): give the --out folder of a grid run")
    with Store(root) as store:
        records, meta = store.records(), store.meta()
    return write_report(root, records, title=f"gradinv: {meta.get('name', root.name)}", meta=meta)
