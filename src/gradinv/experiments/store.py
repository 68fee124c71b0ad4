"""The results store: one record per finished cell, written atomically the moment the cell finishes.

A folder holds ``results.sqlite`` (SQLite in WAL mode: a record is one committed row, so a run killed at any
point loses at most the cell in flight and never corrupts the rest) and ``images/KEY.png`` (truth row above the
reconstruction row), referenced from the records. Cells are keyed by a hash of their full settings and the
library version (:meth:`~gradinv.experiments.runner.Cell.key`), so resuming skips exactly the finished cells,
and a store that holds cells of other settings is refused instead of being mixed into new tables.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from gradinv.errors import GradinvError

DB = "results.sqlite"
IMAGES = "images"


class StoreError(GradinvError, RuntimeError):
    """A results store cannot be used as asked: damaged, or holding other settings."""


class Store:
    """The records of one folder. ``Store(path)`` opens (creating) ``path/results.sqlite``."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.path = self.root / DB
        if self.root.exists() and not self.root.is_dir():
            raise StoreError(f"--out '{self.root}' exists and is not a folder: choose a folder path")
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create the results folder '{self.root}': {exc.strerror or exc}") from None
        try:
            self._db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS cells (key TEXT PRIMARY KEY, record TEXT NOT NULL, finished REAL NOT NULL)"
            )
            self._db.execute("CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL)")
            self._db.execute("SELECT count(*) FROM cells").fetchone()
        except sqlite3.DatabaseError as exc:
            raise self._damaged(exc) from None

    def _damaged(self, exc: Exception) -> StoreError:
        return StoreError(
            f"the results store {self.path} is damaged ({exc}): move it away or delete it, then run again"
        )

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- meta -----------------------------------------------------------------------------------------------

    def meta(self) -> dict[str, Any]:
        """What the run that wrote this store said about itself (its grid, its name)."""
        try:
            rows = self._db.execute("SELECT name, value FROM meta").fetchall()
            return {name: json.loads(value) for name, value in rows}
        except (sqlite3.DatabaseError, ValueError) as exc:
            raise self._damaged(exc) from None

    def set_meta(self, **values: Any) -> None:
        try:
            with self._db:
                self._db.execute("BEGIN IMMEDIATE")
                for name, value in values.items():
                    self._db.execute(
                        "INSERT OR REPLACE INTO meta (name, value) VALUES (?, ?)",
                        (name, json.dumps(value, default=str)),
                    )
        except sqlite3.DatabaseError as exc:
            raise self._damaged(exc) from None

    # -- records --------------------------------------------------------------------------------------------

    def keys(self) -> set[str]:
        try:
            return {k for (k,) in self._db.execute("SELECT key FROM cells")}
        except sqlite3.DatabaseError as exc:
            raise self._damaged(exc) from None

    def records(self) -> list[dict[str, Any]]:
        """Every record, in the order the cells finished."""
        try:
            rows = self._db.execute("SELECT key, record FROM cells ORDER BY finished, key").fetchall()
        except sqlite3.DatabaseError as exc:
            raise self._damaged(exc) from None
        out = []
        for key, text in rows:
            try:
                out.append(json.loads(text))
            except ValueError:
                raise StoreError(
                    f"the results store {self.path} holds an unreadable record for cell {key}: delete the store "
                    "(or that row) and run again"
                ) from None
        return out

    def finished(self) -> dict[str, float]:
        """When each cell finished (seconds since the epoch), by key."""
        try:
            return dict(self._db.execute("SELECT key, finished FROM cells").fetchall())
        except sqlite3.DatabaseError as exc:
            raise self._damaged(exc) from None

    def add(self, record: Mapping[str, Any]) -> None:
        """Commit one finished cell's record (replacing an older record of the same key)."""
        text = json.dumps(record, default=_json_default, allow_nan=True)
        try:
            with self._db:
                self._db.execute("BEGIN IMMEDIATE")
                self._db.execute(
                    "INSERT OR REPLACE INTO cells (key, record, finished) VALUES (?, ?, ?)",
                    (record["key"], text, time.time()),
                )
        except sqlite3.DatabaseError as exc:
            raise self._damaged(exc) from None

    def image_path(self, key: str) -> Path:
        return self.root / IMAGES / f"{key}.png"

    def check_resume(self, keys: Iterable[str], *, resume: bool) -> set[str]:
        """The finished keys among ``keys``. Without ``resume`` a store that already holds cells is refused; with
        it, a store holding any cell that is not among ``keys`` (other settings, another version, other seeds)
        is refused instead of mixed in."""
        wanted = set(keys)
        have = self.keys()
        if have and not resume:
            raise StoreError(
                f"{self.root} already holds {len(have)} finished cells: pass --resume to continue that run, or "
                "choose another --out"
            )
        foreign = have - wanted
        if foreign:
            raise StoreError(
                f"{self.root} holds {len(foreign)} cells of other settings (another grid, seed range or gradinv "
                "version): choose another --out, or delete the folder to start over"
            )
        return have & wanted


def _json_default(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, tuple | set):
        return list(value)
    return str(value)
