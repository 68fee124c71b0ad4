"""Memory estimates checked before large allocations (core layer: stdlib and :mod:`gradinv.errors` only).

A command that would need more memory than the machine has is refused with one line naming the limit and the
flag that lowers the need, instead of being killed by the operating system half-way through.

The limit is the machine's physical memory (``os.sysconf``), or the environment variable
``GRADINV_MEMORY_LIMIT`` when set (``"2GB"``, ``"512MB"``, ``"1.5GiB"``, or a plain number of bytes) — tests set a
small one. An allocation is refused above :data:`SAFETY_FRACTION` of that limit.
"""

from __future__ import annotations

import os
import re

from gradinv.errors import ConfigError

ENV_VAR = "GRADINV_MEMORY_LIMIT"
SAFETY_FRACTION = 0.8
"""Refuse an allocation estimated above this share of the available memory (the rest is the interpreter, torch,
the model and the intermediate tensors an estimate leaves out)."""

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "k": 2**10,
    "m": 2**20,
    "g": 2**30,
    "t": 2**40,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def parse_bytes(text: str) -> int:
    """``"2GB"`` -> 2_000_000_000; ``"512MiB"``, ``"1.5 gb"``, ``"1000"`` (bytes) alike. Raises ConfigError."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([A-Za-z]*)\s*", text)
    unit = m.group(2).lower() if m else ""
    if m is None or unit not in _UNITS:
        raise ConfigError(f"{ENV_VAR}={text!r} is not a size: write it like '2GB', '512MB' or a number of bytes")
    return int(float(m.group(1)) * _UNITS[unit])


def format_bytes(nbytes: float) -> str:
    """A short human size in decimal units: 22.5 GB, 512.0 MB, 980 B."""
    n = float(nbytes)
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def _physical_bytes() -> int | None:
    try:
        pages, page_size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):  # not POSIX, or the names are unknown
        return None
    if pages <= 0 or page_size <= 0:
        return None
    return int(pages) * int(page_size)


def available_bytes() -> int | None:
    """The memory gradinv may plan with: ``GRADINV_MEMORY_LIMIT`` if set, else the physical memory; None when
    neither is known (then nothing is refused)."""
    text = os.environ.get(ENV_VAR, "").strip()
    if text:
        return parse_bytes(text)
    return _physical_bytes()


def limit_source() -> str:
    """Where :func:`available_bytes` comes from, for messages."""
    return ENV_VAR if os.environ.get(ENV_VAR, "").strip() else f"physical memory; set {ENV_VAR} to change"


def check_allocation(nbytes: float, *, what: str, fix: str) -> None:
    """Raise a one-line ConfigError if ``nbytes`` exceeds :data:`SAFETY_FRACTION` of :func:`available_bytes`.

    ``what`` names the work ("loading photos at 1024x1024"), ``fix`` the remedy ("lower --image-size"):
    ``loading photos at 1024x1024 needs about 22.5 GB but this machine has 23.4 GB available
    (GRADINV_MEMORY_LIMIT): lower --image-size``.
    """
    available = available_bytes()
    if available is None or nbytes <= SAFETY_FRACTION * available:
        return
    raise ConfigError(
        f"{what} needs about {format_bytes(nbytes)} but this machine has {format_bytes(available)} available "
        f"({limit_source()}): {fix}"
    )
