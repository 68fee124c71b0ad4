"""Name -> class registries, filled by a decorator in each method's file (a new method is a new file), and the one
spec grammar that names an instance in a line of text.

A spec is ``NAME``, ``NAME:VALUE`` (the class's ``primary`` setting) or ``NAME:KEY=VALUE,KEY=VALUE``; values are
typed from the settings dataclass's hints (int, float, str, bool words, or an optional one, ``none``).
:meth:`Registry.parse` reads a spec and :meth:`Registry.spec` writes one back. A registry may name the package
that fills it: it is imported on first lookup, so a lower layer parses specs without importing upward.

The settings of a class are its ``Settings`` dataclass (a :class:`~gradinv._settings.Configurable`) or, for a
plain frozen dataclass such as a protocol or a malicious server, its own fields; fields of other types (tensors,
shapes) are runtime arguments that a spec does not carry.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import types
import typing
from collections.abc import Iterator, Mapping
from typing import Any, TypeVar

from gradinv.errors import ConfigError

T = TypeVar("T", bound=type)

_PLAIN = (int, float, str, bool)
_WORDS = {int: "an integer", float: "a number", bool: "true or false", str: "text"}
_TRUE, _FALSE = ("true", "1", "yes"), ("false", "0", "no")


def suggestion(word: str, choices: typing.Iterable[str]) -> str:
    """``" (did you mean 'x'?)"`` for the choice closest to ``word``, or ``""`` when none is close."""
    close = difflib.get_close_matches(str(word), list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _spec_kind(hint: Any) -> tuple[type | None, bool]:
    """The plain type a field's hint asks for and whether it is optional; ``(None, False)`` when a spec cannot
    carry it."""
    if hint in _PLAIN:
        return hint, False
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        plain = [a for a in args if a is not type(None)]
        if len(args) == 2 and len(plain) == 1 and plain[0] in _PLAIN:
            return plain[0], True
    return None, False


def _format(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    text = repr(value) if isinstance(value, float) else str(value)
    if "," in text or "=" in text:
        raise ConfigError(f"the value {text!r} cannot be written in a spec (it holds ',' or '=')")
    return text


class Registry(Mapping[str, type]):
    """Classes by their ``name`` attribute; ``kind`` ("attack", "defense") words the errors, ``package`` (a module
    name) is imported on first lookup to fill the registry."""

    def __init__(self, kind: str, *, package: str | None = None) -> None:
        self.kind = kind
        self.package = package
        self._classes: dict[str, type] = {}
        self._loaded = package is None

    def _load(self) -> None:
        if not self._loaded:
            self._loaded = True  # before the import: the package's modules register while it runs
            importlib.import_module(self.package)

    def __getitem__(self, name: str) -> type:
        self._load()
        return self._classes[name]

    def __iter__(self) -> Iterator[str]:
        self._load()
        return iter(self._classes)

    def __len__(self) -> int:
        self._load()
        return len(self._classes)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {sorted(self)})"

    def register(self, cls: T) -> T:
        """Class decorator: add ``cls`` under ``cls.name``."""
        if cls.name in self._classes:
            raise ValueError(f"{self.kind} {cls.name!r} registered twice")
        self._classes[cls.name] = cls
        return cls

    def lookup(self, name: str) -> type:
        """The class registered as ``name``, or a :class:`ConfigError` naming the closest known name and all."""
        if name not in self:
            raise ConfigError(
                f"unknown {self.kind} {name!r}{suggestion(name, self)}: choose one of {', '.join(sorted(self))}"
            )
        return self[name]

    def build(self, name: str, **settings: Any) -> Any:
        """An instance of the class registered as ``name``, with ``settings`` overriding its defaults."""
        return self.lookup(name)(**settings)

    @staticmethod
    def spec_fields(cls: type) -> dict[str, tuple[type, bool]]:
        """The settings of ``cls`` a spec can carry: name -> (plain type, optional), in field order."""
        settings = getattr(cls, "Settings", cls)
        hints = typing.get_type_hints(settings)
        found = {}
        for f in dataclasses.fields(settings):
            kind, optional = _spec_kind(hints.get(f.name))
            if kind is not None:
                found[f.name] = (kind, optional)
        return found

    def parse(self, spec: str, **runtime: Any) -> Any:
        """An instance from ``NAME``, ``NAME:VALUE`` (its ``primary`` setting) or ``NAME:KEY=VALUE,...``.

        ``runtime`` keyword arguments go to the constructor as they are (what a spec cannot carry: tensors,
        shapes, a normalisation)."""
        if not isinstance(spec, str):
            raise ConfigError(f"a {self.kind} spec is a string such as 'NAME:KEY=VALUE', got {spec!r}")
        name, _, rest = spec.strip().partition(":")
        name = name.strip().lower()
        cls = self.lookup(name)
        known = self.spec_fields(cls)
        listed = ", ".join(known) or "none"
        primary = getattr(cls, "primary", None)
        values: dict[str, Any] = {}
        for part in [p for p in rest.split(",") if p.strip()]:
            key, eq, raw = part.partition("=")
            if not eq:
                if primary is None or values:
                    raise ConfigError(f"{self.kind} spec {spec!r}: write KEY=VALUE (settings of {name}: {listed})")
                key, raw = primary, part
            key = key.strip()
            if key not in known:
                raise ConfigError(f"{name} has no setting {key!r}{suggestion(key, known)}: its settings are {listed}")
            if key in values:
                raise ConfigError(f"{self.kind} spec {spec!r} sets {key!r} twice")
            values[key] = self._value(cls, key, raw.strip(), name=name)
        twice = sorted(set(values) & set(runtime))
        if twice:
            raise ConfigError(f"{name}: {', '.join(twice)} given both in the spec {spec!r} and as an argument")
        return cls(**values, **runtime)

    def _value(self, cls: type, key: str, raw: str, *, name: str) -> Any:
        """A spec's text value as the setting's type."""
        kind, optional = self.spec_fields(cls)[key]
        if optional and raw.lower() in ("none", ""):
            return None
        field = {f.name: f for f in dataclasses.fields(getattr(cls, "Settings", cls))}[key]
        expects = field.metadata.get("expects", _WORDS[kind] + (" or none" if optional else ""))
        try:
            if kind is bool:
                if raw.lower() not in _TRUE + _FALSE:
                    raise ValueError(raw)
                return raw.lower() in _TRUE
            return kind(raw)
        except ValueError:
            raise ConfigError(f"{name} {key} must be {expects}, got {raw!r}") from None

    def spec(self, obj: Any) -> str:
        """``obj`` as a spec that :meth:`parse` turns back into an equal object: every setting a spec can carry,
        as ``NAME:KEY=VALUE,...`` (``NAME`` alone when there is none)."""
        cls = type(obj)
        name = getattr(cls, "name", None)
        if name is None or self._classes.get(name) is not cls:
            raise ConfigError(f"{obj!r} is not a registered {self.kind}: register its class to write its spec")
        source = obj.settings if hasattr(cls, "Settings") else obj
        omitted = {  # settings added later, left out at their default so that older specs (and keys) stay the same
            f.name
            for f in dataclasses.fields(getattr(cls, "Settings", cls))
            if f.metadata.get(OMIT_DEFAULT) and getattr(source, f.name) == f.default
        }
        parts = [f"{key}={_format(getattr(source, key))}" for key in self.spec_fields(cls) if key not in omitted]
        return f"{name}:{','.join(parts)}" if parts else name


def integration(name: str) -> Any:
    """The module ``gradinv.integrations.NAME`` (an optional extra's adapter: ``he``, ``opacus``), imported by name
    when a lower layer is asked for it (a scenario with ``aggregation="ckks"``, ``dpsgd`` with
    ``backend="opacus"``). The integrations sit above every other layer, so lower ones reach them only this way."""
    return importlib.import_module(f"gradinv.integrations.{name}")


#: dataclass field metadata key: :meth:`Registry.spec` leaves the setting out while it has its default
OMIT_DEFAULT = "spec_omits_default"

#: defenses (:mod:`gradinv.defenses`), for the client's spec strings such as ``"prune:0.9"``
DEFENSES = Registry("defense", package="gradinv.defenses")
#: federated protocols (:mod:`gradinv.protocol`): ``"fedsgd"``, ``"fedavg:local_steps=5,lr=0.1"``
PROTOCOLS = Registry("protocol", package="gradinv.protocol")
#: malicious servers (:mod:`gradinv.fl.malicious`): ``"imprint:128"``, ``"trap:1.05"``
SERVERS = Registry("server", package="gradinv.fl.malicious")
