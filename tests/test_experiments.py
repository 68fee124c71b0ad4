"""The experiments layer: cases, cells, the results store, grids that resume after a kill, executors."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gradinv.cli import main
from gradinv.errors import ConfigError
from gradinv.experiments import Case, Cell, Seeds, Store, StoreError, run_cell
from gradinv.experiments.grid import load_grid, make_grid, run_grid

TIMINGS = ("seconds", "seconds_total", "threads")

#: 4 attacks x 4 defenses x 2 seeds, each cell well under a second
SMALL_GRID = """
name: kill-and-resume
attacks: [analytic, invgrad, dlg, labels:ilrg]
models: [mlp]
data: [digits]
image_sizes: [16]
batch_sizes: [2]
defenses: [[], [noise:1e-2], [prune:0.9], [sign]]
seeds: [0, 1]
attack_options:
  invgrad: {iterations: 3}
  dlg: {iterations: 1}
"""


def _metrics(record: dict) -> dict:
    return {k: v for k, v in record.items() if k not in (*TIMINGS, "image")}


def _store_state(root: Path) -> tuple[dict[str, dict], dict[str, float]]:
    with Store(root) as store:
        return {r["key"]: r for r in store.records()}, store.finished()


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "gradinv.cli", *args]


def test_case_reports_every_problem_at_once():
    with pytest.raises(ConfigError) as err:
        Case(model="convnett", data="photoz", batch_size=0, clients=3, defenses=("nope",))
    text = str(err.value)
    assert "convnett" in text and "did you mean 'convnet'" in text
    assert "photoz" in text and "batch_size" in text and "nope" in text


def test_case_seeds_are_separate_and_one_seed_sets_all():
    assert Seeds.all(3) == Seeds(3, 3, 3, 3)
    assert Seeds.all(3).vary(5) == Seeds(model=3, data=5, defense=5, attack=5)
    a = Case(model="mlp", data="digits", batch_size=2, defenses=("noise:1e-2",))
    base = run_cell(Cell(a, "analytic")).record
    other_noise = run_cell(Cell(a.replace(seeds=Seeds(0, 0, 1, 0)), "analytic")).record
    other_batch = run_cell(Cell(a.replace(seeds=Seeds(0, 1, 0, 0)), "analytic")).record
    assert base.labels_true == other_noise.labels_true and base.psnr != other_noise.psnr
    assert base.labels_true != other_batch.labels_true
    assert Case.from_dict(a.to_dict()) == a
    assert Cell(a, "analytic").key() == Cell(Case.from_dict(a.to_dict()), "analytic").key()


def test_record_round_trips_and_keeps_the_metrics_keys():
    record = run_cell(Cell(Case(model="mlp", data="digits"), "analytic")).record
    d = record.to_dict()
    for key in ("attack", "model", "model_options", "data", "batch_size", "image_size", "iterations", "restarts",
                "seed", "trained_steps", "train_data", "protocol", "known_labels", "train_mode", "server",
                "defenses", "clients", "dp_epsilon", "label_source", "attack_settings", "psnr", "psnr_per_sample",
                "ssim", "ssim_per_sample", "mse", "label_accuracy", "labels_true", "labels_recovered", "seconds",
                "final_cost", "details", "versions", "threads", "device", "status"):  # fmt: skip
        assert key in d, key
    assert json.loads(json.dumps(d)) == d
    again = type(record).from_dict(d)
    assert again.to_dict() == d


def test_a_declined_attack_is_data_not_an_error():
    r = run_cell(Cell(Case(model="mlp", data="digits", batch_size=2), "rgap")).record
    assert r.status == "declined" and "batch" in r.reason
    with pytest.raises(ConfigError, match="rgapp"):
        Cell(Case(model="cnn6"), "copa", (("init", "rgapp"),))


def test_grid_file_parses_products_and_reports_all_problems(tmp_path):
    path = tmp_path / "g.yaml"
    path.write_text(SMALL_GRID)
    grid = load_grid(path)
    assert len(grid) == 4 * 4 * 2 and grid.name == "kill-and-resume"
    assert {c.case.seeds.model for c in grid.cells} == {0}  # one model for every client batch
    with pytest.raises(ConfigError) as err:
        make_grid(
            {"attacks": ["invgrad", "nope"], "models": ["convnet:width=16", "lenett"], "protocols": ["fedavg:lr=x"]}
        )
    text = str(err.value)
    assert "nope" in text and "lenett" in text and "lr" in text
    with pytest.raises(ConfigError, match="unknown grid key"):
        make_grid({"attack": ["invgrad"], "modells": ["mlp"]})
    explicit = make_grid({"cells": [{"attack": "analytic", "model": "mlp", "data": "digits", "seed": 4}]})
    assert explicit.cells[0].case.seeds.data == 4


def test_grid_killed_with_sigkill_resumes_without_losing_or_repeating_cells(tmp_path):
    grid_file = tmp_path / "grid.yaml"
    grid_file.write_text(SMALL_GRID)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    full = tmp_path / "full"
    subprocess.run(_cli("bench", str(grid_file), "--out", str(full), "--quiet"), check=True, env=env)
    reference, _ = _store_state(full)
    assert len(reference) == 32

    out = tmp_path / "killed"
    proc = subprocess.Popen(_cli("bench", str(grid_file), "--out", str(out), "--quiet"), env=env)
    deadline = time.time() + 120
    done = 0
    while time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
        try:
            with sqlite3.connect(out / "results.sqlite", timeout=1) as db:
                done = db.execute("SELECT count(*) FROM cells").fetchone()[0]
        except sqlite3.Error:
            continue
        if done >= 8:
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the grid finished before it could be killed"
    before, finished_before = _store_state(out)
    assert 8 <= len(before) < 32

    assert main(["bench", str(grid_file), "--out", str(out)]) == 2  # no --resume: refused, nothing mixed
    assert main(["bench", str(grid_file), "--out", str(out), "--resume", "--quiet"]) == 0
    after, finished_after = _store_state(out)
    assert set(after) == set(reference)
    for key, record in before.items():  # no finished cell lost or repeated
        assert finished_after[key] == finished_before[key] and after[key] == record
    for key, record in reference.items():  # every metric equal to the uninterrupted run's
        assert _metrics(after[key]) == _metrics(record), key
    assert (out / "report.html").stat().st_size > 0
    rows = (out / "results.csv").read_text().splitlines()
    assert len(rows) == 33 and all(c in rows[0] for c in ("attack", "defenses", "seed", "status", "psnr"))


def test_resume_refuses_other_settings_and_a_damaged_store(tmp_path, capsys):
    small = make_grid({"attacks": ["analytic"], "models": ["mlp"], "data": ["digits"], "seeds": [0, 1]})
    run_grid(small, tmp_path / "a", report=False)
    fewer = make_grid({"attacks": ["analytic"], "models": ["mlp"], "data": ["digits"], "seeds": [0]})
    with pytest.raises(StoreError, match="other settings"):
        run_grid(fewer, tmp_path / "a", resume=True, report=False)
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "results.sqlite").write_bytes(b"not a database, just bytes" * 100)
    with pytest.raises(StoreError, match="damaged") as err:
        Store(damaged)
    assert str(damaged / "results.sqlite") in str(err.value)
    assert (damaged / "results.sqlite").read_bytes().startswith(b"not a database")  # never discarded
    assert main(["report", str(damaged)]) == 2
    assert "damaged" in capsys.readouterr().err


def test_failed_cell_is_recorded_and_the_grid_goes_on(tmp_path):
    grid = make_grid(
        {"attacks": ["analytic"], "models": ["mlp"], "data": ["digits"], "image_sizes": [16, 2], "seeds": [0]}
    )
    records = run_grid(grid, tmp_path / "g", report=False)
    status = {r["image_size"]: r["status"] for r in records}
    assert status == {16: "ok", 2: "failed"}
    assert next(r for r in records if r["status"] == "failed")["reason"]


@pytest.mark.parametrize("executor", ["process", "ray"])
def test_executors_give_the_same_metrics_as_local(tmp_path, executor):
    if executor == "ray":
        pytest.importorskip("ray")
    spec = {
        "attacks": ["analytic", "invgrad"],
        "models": ["mlp"],
        "data": ["digits"],
        "image_sizes": [16],
        "trained_steps": [3],
        "seeds": [0, 1],
        "defenses": [[], ["noise:1e-2"]],
        "attack_options": {"invgrad": {"iterations": 3}},
    }
    local = run_grid(make_grid(spec), tmp_path / "local", threads=1, report=False)
    other = run_grid(make_grid(spec), tmp_path / executor, executor=executor, workers=2, threads=1, report=False)
    assert [_metrics(r) for r in local] == [_metrics(r) for r in other]
    assert all(r["threads"] == 1 for r in other)


def test_a_diverging_client_fails_its_cell_with_the_reason():
    """A client whose local training blows up shares a non-finite update: the cell fails saying so, instead of
    an attack or label method choking on NaNs further down."""
    from gradinv.protocol import FedAvg

    case = Case(model="mlp", data="digits", batch_size=2, protocol=FedAvg(local_steps=5, lr=1e30))
    record = run_cell(Cell(case, "invgrad", (("iterations", 2),))).record
    assert record.status == "failed" and "diverged" in record.reason
