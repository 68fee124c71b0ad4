"""The README's Python snippets run as written (with Inverting Gradients' iterations cut to a few)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _blocks() -> list[str]:
    text = README.read_text()
    return [b.replace("iterations=1000", "iterations=5") for b in re.findall(r"```python\n(.*?)```", text, re.S)]


def _run(blocks: list[str]) -> dict:
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)  # noqa: S102  (the README's own code)
    return namespace


def test_readme_snippets_without_the_closed_form_block(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    blocks = [b for b in _blocks() if "copa" not in b]
    assert len(blocks) >= 3
    ns = _run(blocks)
    assert ns["scores"].mean_psnr > 0 and ns["estimate"].labels is not None


@pytest.mark.slow
def test_every_readme_snippet(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ns = _run(_blocks())
    assert "copa" in ns
