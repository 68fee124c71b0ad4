"""The application layer: cases, the runner, the results store, grids, executors, the audit, reports and the
reproduction of the field's headline results. Everything here builds on the core (models, data, fl, defenses,
attacks) and nothing below imports it.

>>> from gradinv.experiments import Case, Cell, run_cell
>>> record = run_cell(Cell(Case(model="mlp", data="digits"), "analytic")).record
"""

from gradinv.experiments.case import Case, Client, ModelCache, Seeds, build_client
from gradinv.experiments.runner import Cell, CellResult, RunRecord, run_cell
from gradinv.experiments.store import Store, StoreError

__all__ = [
    "Case",
    "Cell",
    "CellResult",
    "Client",
    "ModelCache",
    "RunRecord",
    "Seeds",
    "Store",
    "StoreError",
    "build_client",
    "run_cell",
]
