"""Settings shared by attacks and defenses: a frozen dataclass of the paper's defaults, overridden by keyword.

A settings dataclass may define ``problems(self) -> list[str]``: every value it cannot work with, each worded
as "KEY must ..., got VALUE" (build the list with :func:`at_least`, :func:`above` and :func:`one_of`).
:class:`Configurable` collects unknown names, values of the wrong type and these problems into one
:class:`ConfigError`, so a user fixes everything in one go (as opacus's validators do).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Iterable
from typing import Any, ClassVar

from gradinv.errors import ConfigError
from gradinv.registry import suggestion

_PLAIN = (int, float, str, bool)


def _plain_kind(hint: Any) -> tuple[type | None, bool]:
    """The plain type (int, float, str, bool) a field's hint asks for and whether ``None`` is also allowed;
    ``(None, _)`` for any other hint (not checked)."""
    if hint in _PLAIN:
        return hint, False
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1 and args[0] in _PLAIN and len(typing.get_args(hint)) == 2:
            return args[0], True
    return None, False


def type_problems(settings: type, values: dict[str, Any]) -> dict[str, str]:
    """By setting name, what is wrong with each value that is not of its field's plain type (int, float, str,
    bool, or an optional one)."""
    hints = typing.get_type_hints(settings)
    found = {}
    for key, value in values.items():
        kind, optional = _plain_kind(hints.get(key))
        if kind is None or (optional and value is None):
            continue
        allowed = (int, float) if kind is float else kind  # an int is a fine float; a bool is only a bool
        if not isinstance(value, allowed) or (isinstance(value, bool) and kind is not bool):
            found[key] = f"{key} must be {kind.__name__}{' or None' if optional else ''}, got {value!r}"
    return found


def at_least(key: str, value: float, low: float) -> list[str]:
    """``["KEY must be >= LOW, got VALUE"]`` unless ``value >= low`` (NaN fails)."""
    return [] if value >= low else [f"{key} must be >= {low}, got {value!r}"]


def above(key: str, value: float, low: float) -> list[str]:
    """``["KEY must be > LOW, got VALUE"]`` unless ``value > low`` (NaN fails)."""
    return [] if value > low else [f"{key} must be > {low}, got {value!r}"]


def in_unit_interval(key: str, value: float) -> list[str]:
    """``["KEY must lie in [0, 1], got VALUE"]`` unless ``0 <= value <= 1`` (NaN fails)."""
    return [] if 0 <= value <= 1 else [f"{key} must lie in [0, 1], got {value!r}"]


def one_of(key: str, value: Any, choices: Iterable[Any]) -> list[str]:
    """``["KEY must be one of A, B, got VALUE (did you mean B?)"]`` unless ``value`` is one of ``choices``."""
    choices = list(choices)
    if value in choices:
        return []
    hint = suggestion(str(value), [str(c) for c in choices])
    return [f"{key} must be one of {', '.join(repr(c) for c in choices)}, got {value!r}{hint}"]


def settings_problems(settings: Any) -> list[str]:
    """What ``settings.problems()`` reports (nothing for a dataclass without that method)."""
    check = getattr(settings, "problems", None)
    return list(check()) if callable(check) else []


class Configurable:
    """A named method whose hyper-parameters live in ``Settings`` (a frozen dataclass of the paper's values).

    ``Cls(settings=None, **overrides)``: unknown names, values of the wrong type and the values the settings'
    own ``problems()`` (or ``__post_init__``) refuse raise one :class:`ConfigError` that names them all.
    """

    name: ClassVar[str]
    Settings: ClassVar[type]

    def __init__(self, settings: Any | None = None, **overrides: Any) -> None:
        if settings is not None and not isinstance(settings, self.Settings):
            raise ConfigError(f"{self.name} takes settings of type {self.Settings.__name__}, got {settings!r}")
        valid = {f.name for f in dataclasses.fields(self.Settings)}
        problems = []
        unknown = sorted(set(overrides) - valid)
        if unknown:
            hint = suggestion(unknown[0], valid) if len(unknown) == 1 else ""
            problems.append(f"no setting(s) {unknown}{hint}, its settings are {', '.join(sorted(valid))}")
        wrong = type_problems(self.Settings, {k: v for k, v in overrides.items() if k in valid})
        problems += wrong.values()
        usable = {k: v for k, v in overrides.items() if k in valid and k not in wrong}
        try:
            built = dataclasses.replace(settings if settings is not None else self.Settings(), **usable)
        except ConfigError as err:  # a dataclass that checks in __post_init__ reports its first problem
            problems.append(str(err))
        else:
            problems += settings_problems(built)
        if problems:
            raise ConfigError(f"{self.name}: {'; '.join(problems)}")
        self.settings = built

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.settings})"

    def __eq__(self, other: object) -> bool:
        """Equal when of the same class with equal settings (a method is its settings)."""
        return type(other) is type(self) and other.settings == self.settings  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash((type(self), self.settings))

    def settings_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self.settings)
