"""Settings shared by attacks and defenses: a frozen dataclass of the paper's defaults, overridden by keyword."""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, ClassVar

from gradinv.errors import ConfigError


def _check_types(owner: str, settings: type, values: dict[str, Any]) -> None:
    """Refuse a setting whose value is not of the field's plain type (int, float, str, bool)."""
    hints = typing.get_type_hints(settings)
    for key, value in values.items():
        kind = hints.get(key)
        if kind not in (int, float, str, bool):
            continue
        allowed = (int, float) if kind is float else kind  # an int is a fine float; a bool is only a bool
        if not isinstance(value, allowed) or (isinstance(value, bool) and kind is not bool):
            raise ConfigError(f"{owner} setting {key!r} must be {kind.__name__}, got {value!r}")


class Configurable:
    """A named method whose hyper-parameters live in ``Settings`` (a frozen dataclass of the paper's values).

    ``Cls(settings=None, **overrides)``: unknown names and values of the wrong kind raise :class:`ConfigError`.
    """

    name: ClassVar[str]
    Settings: ClassVar[type]

    def __init__(self, settings: Any | None = None, **overrides: Any) -> None:
        base = settings if settings is not None else self.Settings()
        valid = {f.name for f in dataclasses.fields(self.Settings)}
        unknown = sorted(set(overrides) - valid)
        if unknown:
            raise ConfigError(f"{self.name} has no setting(s) {unknown}; its settings are {sorted(valid)}")
        _check_types(self.name, self.Settings, overrides)
        self.settings = dataclasses.replace(base, **overrides)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.settings})"

    def settings_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self.settings)
