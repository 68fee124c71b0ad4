"""Memory estimates: the limit, its override and the one-line refusal (gradinv.memory)."""

from __future__ import annotations

import pytest

from gradinv import memory
from gradinv.errors import ConfigError


def test_parse_and_format_bytes():
    assert memory.parse_bytes("2GB") == 2 * 10**9
    assert memory.parse_bytes("512MB") == 512 * 10**6
    assert memory.parse_bytes(" 1.5 GiB ") == int(1.5 * 2**30)
    assert memory.parse_bytes("1000") == 1000
    assert memory.format_bytes(22.5e9) == "22.5 GB"
    assert memory.format_bytes(980) == "980 B"
    for bad in ("", "lots", "2XB", "-1GB", "1e9"):
        with pytest.raises(ConfigError, match="GRADINV_MEMORY_LIMIT"):
            memory.parse_bytes(bad)


def test_limit_comes_from_the_environment(monkeypatch):
    monkeypatch.delenv(memory.ENV_VAR, raising=False)
    physical = memory.available_bytes()
    assert physical is None or physical > 10**8
    monkeypatch.setenv(memory.ENV_VAR, "512MB")
    assert memory.available_bytes() == 512 * 10**6
    monkeypatch.setenv(memory.ENV_VAR, "many")
    with pytest.raises(ConfigError, match="many"):
        memory.available_bytes()


def test_check_allocation_refuses_in_one_line(monkeypatch):
    monkeypatch.setenv(memory.ENV_VAR, "1GB")
    memory.check_allocation(0.5e9, what="a small thing", fix="nothing")  # under 80% of the limit
    with pytest.raises(ConfigError) as info:
        memory.check_allocation(22.5e9, what="loading photos at 1024x1024", fix="lower --image-size")
    message = str(info.value)
    assert "\n" not in message
    assert message == (
        "loading photos at 1024x1024 needs about 22.5 GB but this machine has 1.0 GB available "
        "(GRADINV_MEMORY_LIMIT): lower --image-size"
    )
    with pytest.raises(ConfigError):  # the safety fraction: 90% of the limit is refused
        memory.check_allocation(0.9e9, what="x", fix="y")
