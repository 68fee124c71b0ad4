"""The layering rule, checked on the source: a module imports only its own layer and the layers below it.

Every ``import gradinv.X`` and ``from gradinv.X import ...`` counts, at module level, inside functions and
under ``if TYPE_CHECKING:`` alike (a registry that names its package as a string is the way for a lower layer
to reach a higher one at run time). ``gradinv/__init__.py`` re-exports everything and is exempt.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import gradinv

SRC = Path(gradinv.__file__).parent

#: top-level module or package of gradinv -> layer (lower may never import higher)
RANKS = {
    **dict.fromkeys(["errors", "_settings", "registry", "_atomic", "io", "memory", "types", "protocol"], 0),
    **dict.fromkeys(["models", "data", "metrics"], 1),
    "fl": 2,
    "defenses": 3,
    "attacks": 4,
    **dict.fromkeys(["analysis", "viz"], 5),
    **dict.fromkeys(["experiments", "experiment", "audit", "defense_bench", "label_bench", "demo"], 6),
    **dict.fromkeys(["cli", "integrations"], 7),
}
EXEMPT = {"__init__", "__main__"}  # gradinv/__init__.py (re-exports) and ``python -m gradinv``


def _unit(path: Path) -> str:
    """The top-level unit of a source file: ``fl`` for ``fl/scenario.py``, ``types`` for ``types.py``."""
    parts = path.relative_to(SRC).with_suffix("").parts
    return parts[0]


def _imported_units(source: str, package: list[str]) -> list[tuple[int, str]]:
    """(line, unit) for every gradinv unit that ``source`` (a module of ``package``) imports, wherever the
    import statement is."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name.split(".") for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = [*base, *(node.module.split(".") if node.module else [])]
            names = [module + [alias.name] for alias in node.names] if module == ["gradinv"] else [module]
        else:
            continue
        found += [(node.lineno, name[1]) for name in names if len(name) > 1 and name[0] == "gradinv"]
    return found


def _edges() -> list[tuple[str, str, int, str]]:
    """(importing file, imported unit, line, importing unit) for every gradinv import in the package."""
    edges = []
    for path in sorted(SRC.rglob("*.py")):
        unit = _unit(path)
        if path.parent == SRC and unit in EXEMPT:
            continue
        package = ["gradinv", *path.relative_to(SRC).parent.parts]
        imports = _imported_units(path.read_text(encoding="utf-8"), package)
        edges += [(str(path.relative_to(SRC)), target, line, unit) for line, target in imports]
    return edges


def test_every_module_has_a_layer():
    units = {_unit(p) for p in SRC.rglob("*.py")} - EXEMPT
    missing = sorted(units - set(RANKS))
    assert not missing, f"give these modules a layer in RANKS of tests/test_layers.py: {missing}"


def test_no_module_imports_a_higher_layer():
    upward = [
        f"{file}:{line} imports gradinv.{target} (layer {RANKS[target]}) from layer {RANKS[unit]}"
        for file, target, line, unit in _edges()
        if target in RANKS and unit in RANKS and RANKS[target] > RANKS[unit]
    ]
    assert not upward, "lower layers import higher ones:\n" + "\n".join(upward)


def test_same_layer_packages_do_not_import_each_other():
    edges = {(unit, target): f"{file}:{line}" for file, target, line, unit in _edges() if unit != target}
    mutual = [
        f"{edges[a, b]} (gradinv.{a} -> gradinv.{b}) and {edges[b, a]} (back)"
        for a, b in edges
        if a < b and (b, a) in edges and RANKS.get(a) == RANKS.get(b)
    ]
    assert not mutual, "same-layer packages import each other:\n" + "\n".join(mutual)


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("from gradinv.defenses.base import Defense", ["defenses"]),
        ("def f():\n    import gradinv.attacks.base", ["attacks"]),
        ("from gradinv import analysis, io", ["analysis", "io"]),
        ("from ..defenses import base", ["defenses"]),
        ("import torch\nfrom . import client", ["fl"]),
    ],
)
def test_the_scan_sees_every_form_of_import(source, expected):
    assert [unit for _, unit in _imported_units(source, ["gradinv", "fl"])] == expected


def test_a_registry_imports_the_package_that_fills_it_on_first_lookup(tmp_path, monkeypatch):
    """How a lower layer reaches a higher one: by the package's name, imported when a name is first looked up."""
    import sys

    (tmp_path / "probe_registry.py").write_text(
        "from gradinv.registry import Registry\nWIDGETS = Registry('widget', package='probe_widgets')\n"
    )
    (tmp_path / "probe_widgets.py").write_text(
        "from dataclasses import dataclass\nfrom typing import ClassVar\nfrom probe_registry import WIDGETS\n\n"
        "@WIDGETS.register\n@dataclass(frozen=True)\nclass Gear:\n"
        "    teeth: int = 8\n    ratio: float | None = None\n    name: ClassVar[str] = 'gear'\n"
        "    primary: ClassVar[str] = 'teeth'\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        import probe_registry

        assert "probe_widgets" not in sys.modules
        gear = probe_registry.WIDGETS.parse("gear:12")
        assert "probe_widgets" in sys.modules and gear.teeth == 12 and gear.ratio is None
        assert probe_registry.WIDGETS.spec(gear) == "gear:teeth=12,ratio=none"
        assert probe_registry.WIDGETS.parse("gear:ratio=0.5") == type(gear)(ratio=0.5)
        assert list(probe_registry.WIDGETS) == ["gear"]
    finally:
        for name in ("probe_registry", "probe_widgets"):
            sys.modules.pop(name, None)
