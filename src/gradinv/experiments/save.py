"""Writing a single run's files: ``metrics.json`` and ``reconstruction.png`` (``gradinv attack``), and a captured
client (``gradinv capture``). Files are written into a temporary folder beside ``--out`` and moved in only when
all of them are complete, so ``--out`` never holds a half-written run."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from gradinv.errors import ConfigError
from gradinv.experiments.case import Case, Client
from gradinv.experiments.runner import CellResult
from gradinv.io import save_model, save_update, write_json_atomic


@contextmanager
def staged(out: str | Path) -> Iterator[Path]:
    """A temporary folder beside ``out``; on success its files replace those of ``out`` (created if missing)."""
    out = Path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.parent / f".{out.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
        tmp.mkdir()
    except OSError as exc:
        raise ConfigError(f"--out '{out}' cannot be written ({exc.strerror or exc}): choose another folder") from None
    try:
        yield tmp
        if not out.exists():
            os.rename(tmp, out)
        else:
            for item in tmp.iterdir():
                os.replace(item, out / item.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def save_run(result: CellResult, out: str | Path) -> Path:
    """``metrics.json`` (the run's record) and ``reconstruction.png`` (truth row above reconstruction row), or
    for a text run ``reconstruction.md`` (each private sequence, decoded, above its reconstruction)."""
    from gradinv._atomic import atomic_path
    from gradinv.experiments.executors import save_picture
    from gradinv.experiments.runner import reconstruction_markdown

    with staged(out) as tmp:
        if result.texts is not None:
            with atomic_path(tmp / "reconstruction.md") as md:
                md.write_text(reconstruction_markdown(result) + "\n", encoding="utf-8")
            result.record.image = None
        elif save_picture(result, tmp / "reconstruction.png"):
            result.record.image = "reconstruction.png"
        write_json_atomic(result.record.to_dict(), tmp / "metrics.json")
    return Path(out)


def save_capture(out: str | Path, case: Case, client: Client, *, metadata: Mapping[str, Any]) -> Path:
    """What a server would hold, as files: the model it sent (``weights.safetensors``), the client's update with
    the metadata that replays it (``update.safetensors``), and ``capture.json`` (the case and the true labels)."""
    with staged(out) as tmp:
        save_model(client.model, tmp / "weights.safetensors")
        save_update(client.observation.update, tmp / "update.safetensors", metadata=metadata)
        truth = client.truth
        labels = truth.labels.tolist() if truth is not None and truth.labels is not None else None
        write_json_atomic({**case.to_dict(), "labels": labels, **metadata}, tmp / "capture.json")
    return Path(out)
