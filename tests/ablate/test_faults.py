"""Faults in OUT/cache and OUT/results.sqlite, between and during runs: nothing lost, nothing wrong.

Every test ends with the grid complete (every run once) and the numbers of a
clean run; a damaged store is kept as it was and reported in one line; a
planted pickle is never loaded.
"""

from __future__ import annotations

import io
import os
import pickle
import shutil
import sqlite3
import threading
from pathlib import Path

import pytest
import yaml

from tests.ablate.conftest import grid_dict
from tinyptq.ablate import disk_cache, executors, worker
from tinyptq.ablate.disk_cache import CACHE_FORMAT, MISSING, DiskCache
from tinyptq.ablate.grid import Grid
from tinyptq.ablate.runner import run_grid
from tinyptq.ablate.store import DB_NAME, ResultStore, StoreError
from tinyptq.cli import main
from tinyptq.signing import dump_signed, load_signed

SQNR = "output SQNR vs FP32 (dB)"


def fault_grid(bits=("W8A8", "W4A8")) -> dict:
    """4 runs (bits x MSE / minmax weights) sharing FP32, the bn_folding + cle prefixes and the statistics."""
    grid = grid_dict()
    grid["bits"] = list(bits)
    grid["toggles"] = {"range_setting.weights": ["minmax", "mse"]}
    return grid


def _run(out: Path, grid: dict | None = None, **kw):
    stream = io.StringIO()
    summary = run_grid(Grid.from_dict(grid or fault_grid()), out, workers=1, progress=False, stream=stream, **kw)
    return summary, stream.getvalue()


def measures(out: Path) -> dict[str, tuple]:
    """run_id -> (status, value, output SQNR, weight bytes, BOPs, FP32) of every stored run."""
    return {
        r["run_id"]: (r["status"], r["value"], r["extras"][SQNR], r["weight_bytes"], r["bops"], r["fp32"])
        for r in ResultStore(out).rows()
    }


def assert_complete(out: Path, clean: dict[str, tuple]) -> None:
    """Every run of the grid stored exactly once, with the clean run's numbers, in a sound file."""
    con = sqlite3.connect(out / DB_NAME)
    try:
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        counts = dict(con.execute("SELECT run_id, COUNT(*) FROM runs GROUP BY run_id").fetchall())
    finally:
        con.close()
    expected = {r.run_id for r in Grid.from_dict(fault_grid()).expand()}
    assert expected <= set(counts) and all(counts[r] == 1 for r in expected)
    assert measures(out) == clean


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory) -> tuple[Path, dict[str, tuple]]:
    """The fault grid run once without faults: its output directory and numbers."""
    out = tmp_path_factory.mktemp("clean") / "out"
    summary, _ = _run(out)
    assert summary.counts == {"done": 4, "failed": 0, "skipped": 0}
    return out, measures(out)


def _copy(clean_run, tmp_path: Path) -> Path:
    out = tmp_path / "out"
    shutil.copytree(clean_run[0], out)
    return out


# ----------------------------------------------------------------- cache damage
class _Plant:
    """A pickle that creates ``marker`` when it is loaded: code planted in the cache."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _entries(out: Path) -> list[Path]:
    return sorted((out / "cache").glob("*/*.pkl"))


def _damage(path: Path, how: str, marker: Path, other: Path | None = None) -> None:
    """Damage one cache entry in one of the ways a disk, an old version or another user can."""
    context = f"tinyptq-cache/{path.parent.name}/{path.stem}"
    if how == "garbage":
        path.write_bytes(os.urandom(300))
    elif how == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "deleted":
        path.unlink()
    elif how == "planted":  # an unsigned pickle that runs code when loaded
        path.write_bytes(pickle.dumps(_Plant(marker)))
    elif how == "swapped":  # a valid entry of another key copied over this one
        path.write_bytes(other.read_bytes())
    elif how == "stale":  # written by another tinyptq version
        dump_signed({"format": CACHE_FORMAT, "tinyptq": "0.0.1", "value": None}, path, context)
    elif how == "none":  # the entry the old worker wrote after a failed read
        dump_signed({"format": CACHE_FORMAT, "tinyptq": disk_cache.__version__, "value": None}, path, context)
    else:
        raise ValueError(how)


DAMAGES = ["garbage", "truncated", "empty", "deleted", "planted", "swapped", "stale", "none"]


def _damage_all(out: Path, marker: Path, shift: int = 0) -> None:
    entries = _entries(out)
    assert {p.parent.name for p in entries} == {"fp32", "prefix", "act_statistics"}
    for i, path in enumerate(entries):
        _damage(path, DAMAGES[(i + shift) % len(DAMAGES)], marker, other=entries[i - 1])


@pytest.mark.parametrize("shift", [0, 3])
def test_damaged_cache_entries_are_recomputed_not_fatal(clean_run, tmp_path, monkeypatch, shift):
    """Issue 11.1: the grid is extended after its cache was damaged; the new runs need those entries."""
    out, marker = tmp_path / "out", tmp_path / "planted-code-ran"
    _run(out, fault_grid(bits=["W8A8"]))  # fills the cache; W4A8 runs come later
    _damage_all(out, marker, shift)
    worker._MEMO.clear()  # as in a new process: the FP32 entry is read again
    load, read = DiskCache.load, set()

    def spy(self, kind, key, valid=None):
        read.add(self.path(kind, key))
        return load(self, kind, key, valid)

    monkeypatch.setattr(DiskCache, "load", spy)
    summary, log = _run(out)
    assert summary.counts == {"done": 4, "failed": 0, "skipped": 0} and summary.ran == 2, log
    assert not marker.exists()
    assert_complete(out, clean_run[1])
    assert {p.parent.name for p in read} == {"fp32", "prefix", "act_statistics"}
    for path in read:  # every entry a run needed is now a good one, none a pickled None
        stored = load_signed(path, f"tinyptq-cache/{path.parent.name}/{path.stem}")
        assert stored["value"] is not None


def test_entries_damaged_while_in_use_are_recomputed(clean_run, tmp_path, monkeypatch):
    """Every cache read meets an entry damaged just before it (the race of 'entry vanished while in use')."""
    out, marker = tmp_path / "out", tmp_path / "planted-code-ran"
    shutil.copytree(clean_run[0] / "cache", out / "cache")
    load, calls = DiskCache.load, []

    def damaged_load(self, kind, key, valid=None):
        path = self.path(kind, key)
        if path.is_file():
            _damage(path, DAMAGES[len(calls) % len(DAMAGES)], marker, other=path)
            calls.append(kind)
        return load(self, kind, key, valid)

    monkeypatch.setattr(DiskCache, "load", damaged_load)
    summary, log = _run(out)
    assert summary.counts["done"] == 4 and summary.ran == 4, log
    assert {"fp32", "prefix", "act_statistics"} <= set(calls)
    assert not marker.exists()
    assert_complete(out, clean_run[1])


def test_a_thread_writing_garbage_into_the_cache_changes_nothing(clean_run, tmp_path):
    out, stop = tmp_path / "out", threading.Event()
    shutil.copytree(clean_run[0] / "cache", out / "cache")

    def vandal() -> None:
        n = 0
        while not stop.is_set():
            for path in _entries(out):
                how = ("garbage", "truncated", "deleted")[n % 3]
                n += 1
                try:
                    _damage(path, how, tmp_path / "unused")
                except OSError:
                    pass  # replaced or removed meanwhile
            stop.wait(0.05)

    thread = threading.Thread(target=vandal, daemon=True)
    thread.start()
    try:
        summary, log = _run(out)
    finally:
        stop.set()
        thread.join()
    assert summary.counts["done"] == 4, log
    assert_complete(out, clean_run[1])


def test_worker_results_between_tasks_survive_a_damaged_cache(clean_run, tmp_path, monkeypatch):
    """The whole cache is damaged after every task (local executor hook)."""
    out, marker = tmp_path / "out", tmp_path / "planted-code-ran"
    execute, shifts = executors.execute, iter(range(100))

    def execute_then_damage(task):
        result = execute(task)
        entries = _entries(out)
        for i, path in enumerate(entries):
            _damage(path, DAMAGES[(i + next(shifts)) % len(DAMAGES)], marker, other=entries[i - 1])
        return result

    monkeypatch.setattr(executors, "execute", execute_then_damage)
    summary, _ = _run(out)
    assert summary.counts["done"] == 4 and not marker.exists()
    assert_complete(out, clean_run[1])


def test_cache_directories_are_private(clean_run):
    cache = clean_run[0] / "cache"
    for d in [cache, *(p for p in cache.iterdir() if p.is_dir())]:
        assert d.stat().st_mode & 0o077 == 0, d
    for path in _entries(clean_run[0]):
        assert path.stat().st_mode & 0o077 == 0, path
    assert DiskCache(cache, scope="x").load("fp32", "nothing") is MISSING


# ----------------------------------------------------------------- store damage
def _grid_file(tmp_path: Path) -> Path:
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(fault_grid()))
    return path


def _damage_store(out: Path, how: str) -> None:
    path = out / DB_NAME
    if how == "garbage":
        path.write_bytes(os.urandom(8192))
    elif how == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif how == "foreign":  # another program's SQLite database
        path.unlink()
        con = sqlite3.connect(path)
        con.execute("CREATE TABLE notes (text TEXT)")
        con.commit()
        con.close()
    else:
        raise ValueError(how)


def _one_line_error(capsys, argv: list[str], *parts: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    for part in parts:
        assert part in err, err


@pytest.mark.parametrize("how", ["garbage", "truncated", "foreign"])
def test_a_damaged_store_is_kept_reported_in_one_line_and_rebuilt_on_request(clean_run, tmp_path, capsys, how):
    out, grid = _copy(clean_run, tmp_path), str(_grid_file(tmp_path))
    _damage_store(out, how)
    damaged = (out / DB_NAME).read_bytes()
    what = "is not a tinyptq results store" if how == "foreign" else "is damaged"
    for argv in (
        ["ablate", "--grid", grid, "--out", str(out), "--workers", "1", "--no-report"],
        ["ablate", "--grid", grid, "--out", str(out), "--dry-run"],
        ["report", str(out)],
    ):
        _one_line_error(capsys, argv, f"{out / DB_NAME} {what}", "--rebuild-store", "4 run records")
    assert (out / DB_NAME).read_bytes() == damaged  # left as it was

    argv = ["ablate", "--grid", grid, "--out", str(out), "--workers", "1", "--no-report", "--rebuild-store"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "4 runs: 4 done, 0 failed, 0 skipped (0 run now, 4 already stored)" in captured.out
    assert "restored 4 runs" in captured.err
    (aside,) = out.glob(f"{DB_NAME}.corrupt-*")
    assert aside.read_bytes() == damaged  # kept, only moved
    assert_complete(out, clean_run[1])


@pytest.mark.parametrize("how", ["deleted", "emptied", "older copy"])
def test_a_lost_or_older_store_gets_its_rows_back_from_the_records(clean_run, tmp_path, how):
    out = _copy(clean_run, tmp_path)
    path = out / DB_NAME
    if how == "deleted":
        path.unlink()
    elif how == "emptied":
        path.write_bytes(b"")
    else:
        con = sqlite3.connect(path)
        con.execute("DELETE FROM runs WHERE weight_bits = 4")
        con.commit()
        con.close()
    summary, log = _run(out)
    assert summary.ran == 0 and summary.counts["done"] == 4, log
    assert "restored" in log
    assert_complete(out, clean_run[1])


@pytest.mark.parametrize("how", ["garbage", "deleted"])
def test_a_store_damaged_during_a_run_loses_no_result(clean_run, tmp_path, monkeypatch, how):
    out = tmp_path / "out"
    execute, finished = executors.execute, []

    def execute_and_damage(task):
        if len(finished) == 2:  # two runs are stored; the store goes bad
            if how == "garbage":
                _damage_store(out, "garbage")
            else:
                (out / DB_NAME).unlink()
        finished.append(task)
        return execute(task)

    monkeypatch.setattr(executors, "execute", execute_and_damage)
    if how == "garbage":
        with pytest.raises(StoreError, match="is damaged .*--rebuild-store.* 4 run records"):
            _run(out)
        assert len(list((out / "records").glob("*.json"))) == 4  # every computed result kept
        monkeypatch.setattr(executors, "execute", execute)
        summary, _ = _run(out, rebuild=True)
    else:  # a deleted store is made anew and refilled from the records
        summary, _ = _run(out)
    assert len(finished) == 4 and summary.counts["done"] == 4
    assert_complete(out, clean_run[1])


def test_damaged_run_records_are_left_out(clean_run, tmp_path):
    out = _copy(clean_run, tmp_path)
    records = sorted((out / "records").glob("*.json"))
    records[0].write_text("{not json")
    records[1].write_text('{"run_id": "x", "status": "done", "colour": "red"}')
    (out / DB_NAME).unlink()
    summary, _ = _run(out)
    assert summary.ran == 2 and summary.counts["done"] == 4  # the two unreadable ones computed again
    assert_complete(out, clean_run[1])
