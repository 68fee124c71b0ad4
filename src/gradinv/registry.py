"""Name -> class registries, filled by a decorator in each method's file (a new method is a new file)."""

from __future__ import annotations

from typing import Any, TypeVar

from gradinv.errors import ConfigError

T = TypeVar("T", bound=type)


class Registry(dict[str, type]):
    """Classes by their ``name`` attribute; ``kind`` ("attack", "defense") words the errors."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind

    def register(self, cls: T) -> T:
        """Class decorator: add ``cls`` under ``cls.name``."""
        if cls.name in self:
            raise ValueError(f"{self.kind} {cls.name!r} registered twice")
        self[cls.name] = cls
        return cls

    def lookup(self, name: str) -> type:
        """The class registered as ``name``, or a :class:`ConfigError` listing the known names."""
        if name not in self:
            raise ConfigError(f"unknown {self.kind} {name!r}: choose one of {', '.join(sorted(self))}")
        return self[name]

    def build(self, name: str, **settings: Any) -> Any:
        """An instance of the class registered as ``name``, with ``settings`` overriding its defaults."""
        return self.lookup(name)(**settings)
