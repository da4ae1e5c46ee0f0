"""The SQLite results store: one row per run, atomic writes, concurrent writers."""

from __future__ import annotations

import multiprocessing
import sqlite3

import pytest

from tinyptq.ablate.store import ResultStore, open_store
from tinyptq.errors import ConfigError


def _row(i: int, status: str = "done") -> dict:
    return {
        "run_id": f"r{i}",
        "use_case": "ic",
        "weight_bits": 8,
        "act_bits": 8,
        "status": status,
        "value": float(i),
        "toggles": {"cle": "on" if i % 2 else "off"},
        "stage_seconds": {"cle": 0.5},
    }


def test_put_replaces_and_decodes_json(tmp_path):
    store = ResultStore(tmp_path)
    store.put(_row(1, "failed") | {"error": "boom"})
    store.put(_row(1))
    rows = store.rows()
    assert len(rows) == 1
    assert rows[0]["status"] == "done" and rows[0]["toggles"] == {"cle": "on"}
    assert store.counts() == {"done": 1, "failed": 0, "skipped": 0}


def test_rejects_unknown_columns_and_statuses(tmp_path):
    store = ResultStore(tmp_path)
    with pytest.raises(KeyError, match="colour"):
        store.put(_row(1) | {"colour": "red"})
    with pytest.raises(ValueError, match="status"):
        store.put(_row(1, "running"))
    assert store.rows() == []


def test_rows_of_the_current_grid_only(tmp_path):
    store = ResultStore(tmp_path)
    for i in range(3):
        store.put(_row(i))
    store.set_meta("run_ids", ["r0", "r2"])
    assert [r["run_id"] for r in store.rows()] == ["r0", "r2"]
    assert len(store.rows(current_grid=False)) == 3


def _writer(args):
    path, start = args
    store = ResultStore(path)
    for i in range(start, start + 25):
        store.put(_row(i))


def test_parallel_writers_never_lose_or_corrupt_rows(tmp_path):
    ResultStore(tmp_path)
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        pool.map(_writer, [(tmp_path, s) for s in (0, 25, 50, 75)])
    con = sqlite3.connect(tmp_path / "results.sqlite")
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert con.execute("SELECT COUNT(DISTINCT run_id), COUNT(*) FROM runs").fetchone() == (100, 100)


def test_open_store_without_results_is_a_one_line_error(tmp_path):
    with pytest.raises(ConfigError, match="no results in .*run 'tinyptq ablate' first"):
        open_store(tmp_path / "nothing")
