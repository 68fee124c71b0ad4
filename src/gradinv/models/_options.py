"""Checking a model builder's options against the types its signature declares, before it is called.

``--model-option width=abc`` must say "option 'width' must be an integer, got 'abc'", not leak the comparison
that fails inside the model's constructor.
"""

from __future__ import annotations

import inspect
import types
import typing
from collections.abc import Callable, Sequence
from typing import Any

from gradinv.errors import ConfigError

_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")


class _Mismatch(Exception):
    """The value does not fit the hint; carries what was expected, in words."""


def _describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is bool:
        return "true or false"
    if hint is int:
        return "an integer"
    if hint is float:
        return "a number"
    if hint is str:
        return "a string"
    if hint is type(None):
        return "None"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin in (tuple, list, Sequence):
        inner = args[0] if args else Any
        return f"a comma-separated list of {_describe(inner).removeprefix('an ').removeprefix('a ')}s"
    return getattr(hint, "__name__", str(hint))


def _coerce(value: Any, hint: Any) -> Any:
    """``value`` converted to ``hint`` where that is lossless (``"true"`` -> True, 3 -> 3.0, 5 -> (5,)), or
    :class:`_Mismatch`. Hints this does not know are passed through unchecked."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, (str, int)) and str(value).strip().lower() in _TRUE + _FALSE:
            return str(value).strip().lower() in _TRUE
        raise _Mismatch
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _Mismatch
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise _Mismatch
    if hint is str:
        if isinstance(value, str):
            return value
        raise _Mismatch
    if hint is type(None):
        if value is None or (isinstance(value, str) and value.strip().lower() == "none"):
            return None
        raise _Mismatch
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            try:
                return _coerce(value, arg)
            except _Mismatch:
                continue
        raise _Mismatch
    if origin in (tuple, list, Sequence):
        items = list(value) if isinstance(value, (tuple, list)) else [value]  # one value: a list of one
        if origin is tuple and args and args[-1] is not Ellipsis:  # fixed length, e.g. tuple[int, int]
            if len(items) != len(args):
                raise _Mismatch
            return tuple(_coerce(v, a) for v, a in zip(items, args, strict=True))
        inner = args[0] if args else Any
        return tuple(_coerce(v, inner) for v in items)
    return value


def check_options(model: str, builder: Callable[..., Any], options: dict[str, Any]) -> dict[str, Any]:
    """``options`` converted to the types ``builder`` declares, or one-line ConfigError naming the option, the
    expected type and the bad value (with the default as an example)."""
    try:
        hints = typing.get_type_hints(builder)
    except Exception:  # annotations that cannot be resolved: nothing to check against
        return dict(options)
    params = inspect.signature(builder).parameters
    out = {}
    for key, value in options.items():
        hint = hints.get(key)
        if hint is None:
            out[key] = value
            continue
        try:
            out[key] = _coerce(value, hint)
        except _Mismatch:
            default = params[key].default if key in params else inspect.Parameter.empty
            if default is inspect.Parameter.empty or default is None:
                example = f"<{_describe(hint)}>"
            elif isinstance(default, (tuple, list)):
                example = ",".join(map(str, default))
            else:
                example = str(default).lower() if isinstance(default, bool) else str(default)
            raise ConfigError(
                f"model {model!r} option {key!r} must be {_describe(hint)}, got {value!r}: pass e.g. "
                f"--model-option {key}={example}"
            ) from None
    return out
