"""The results store: one SQLite file per output directory, one row per run, and a JSON record per run.

Only the coordinating process writes (workers send results back), each row in
its own transaction, so a grid killed at any moment leaves a consistent file
holding every run that finished. ``run_id`` is the content hash of the run's
configuration: writing a run twice replaces it, so every run is present once.

Every row is first written as ``OUT/records/<run_id>.json`` (atomically), the
durable copy of a computed result: a store that lost rows (deleted, replaced
by an older copy) gets them back from the records, and a damaged store is
rebuilt from them (``rebuild_store``) after it is moved aside. A damaged or
foreign store file is never changed or removed unasked: opening it raises
StoreError, one line that says how to go on.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tinyptq.errors import ConfigError, TinyPTQError, first_line

DB_NAME = "results.sqlite"
RECORDS_DIR = "records"

# column -> SQL type; JSON columns hold objects serialized with sorted keys
COLUMNS: dict[str, str] = {
    "run_id": "TEXT PRIMARY KEY",
    "config_hash": "TEXT",  # runs with the same hash were computed once
    "grid": "TEXT",
    "label": "TEXT",
    "use_case": "TEXT",
    "weight_bits": "INTEGER",
    "act_bits": "INTEGER",
    "granularity": "TEXT",
    "calib_samples": "INTEGER",
    "seed": "INTEGER",
    "toggles": "TEXT",  # JSON {toggle key: value as text}
    "pipeline": "TEXT",  # JSON [{stage: {options}}]
    "metric": "TEXT",
    "metric_unit": "TEXT",
    "value": "REAL",
    "fp32_metric": "TEXT",
    "fp32": "REAL",
    "delta": "REAL",
    "extras": "TEXT",  # JSON of the metric's extras (e.g. output SQNR)
    "weight_bytes": "INTEGER",
    "fp32_weight_bytes": "INTEGER",
    "bops": "REAL",
    "fp32_bops": "REAL",
    # the cost model (tinyptq.cost): totals of the quantized model
    "params": "INTEGER",
    "macs": "INTEGER",
    "peak_activation_bytes": "INTEGER",
    "memory_io_bytes": "INTEGER",
    "stage_seconds": "TEXT",  # JSON {stage: seconds}
    "seconds": "REAL",
    "status": "TEXT",  # done | failed | skipped
    "error": "TEXT",
    "finished_at": "TEXT",
}
JSON_COLUMNS = ("toggles", "pipeline", "extras", "stage_seconds")
STATUSES = ("done", "failed", "skipped")


class StoreError(TinyPTQError):
    """The results store cannot be used: damaged, not a tinyptq store, or unreadable."""


class ResultStore:
    """Rows of an ablation grid in ``OUT_DIR/results.sqlite``.

    ``readonly`` opens an existing store for reading only (report, dry run):
    nothing is created or written, so it works beside a running grid.
    """

    def __init__(self, out_dir: str | Path, readonly: bool = False) -> None:
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / DB_NAME
        self.readonly = readonly
        if readonly and not self.path.is_file():
            raise ConfigError(f"no results in {out_dir} (expected {self.path}); run 'tinyptq ablate' first")
        if not readonly:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        self.tables = self.check() if self.path.is_file() else set()
        if not readonly:
            with self._connect() as con:
                _create_tables(con)

    def check(self) -> set[str]:
        """The store's tables; StoreError when the file is damaged or another program's database."""
        with self._connect(write=False) as con:
            problems = [r[0] for r in con.execute("PRAGMA quick_check").fetchall()]
            tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if problems != ["ok"]:
            raise StoreError(f"{self.path} is damaged ({problems[0][:100]}); {recovery_hint(self.out_dir)}")
        if tables and "runs" not in tables:
            raise StoreError(
                f"{self.path} is not a tinyptq results store (tables: {', '.join(sorted(tables))[:100]}); "
                f"{recovery_hint(self.out_dir)}"
            )
        return tables

    @contextmanager
    def _connect(self, write: bool = True) -> Iterator[sqlite3.Connection]:
        """A connection; with ``write``, one IMMEDIATE transaction. SQLite errors become StoreError."""
        if write and self.readonly:
            raise StoreError(f"{self.path} is open for reading only")
        con = None
        try:
            con = sqlite3.connect(self.path, timeout=60, isolation_level=None)
            if write:
                con.execute("PRAGMA journal_mode=WAL")
                con.execute("PRAGMA synchronous=FULL")
                con.execute("BEGIN IMMEDIATE")
            try:
                yield con
            except BaseException:
                if con.in_transaction:
                    con.execute("ROLLBACK")
                raise
            if write:
                con.execute("COMMIT")
        except sqlite3.Error as exc:
            raise _store_error(self.path, exc) from None
        finally:
            if con is not None:
                con.close()

    # ---------------------------------------------------------------- writes
    def put(self, row: dict[str, Any]) -> None:
        """Write one run: its record file first, then its row (a single atomic transaction).

        When the row cannot be written (StoreError) the record is already
        safe: ``import_records`` or ``rebuild_store`` bring it into a store.
        """
        data = _normalize(row)
        write_record(self.out_dir, data)
        with self._connect() as con:
            _create_tables(con)  # the file may have been deleted since the store was opened
            _insert(con, data)

    def import_records(self) -> int:
        """Store the run records the store lacks (or holds as failed while they are not); how many."""
        stored = self.statuses()
        todo = [
            r
            for r in read_records(self.out_dir)
            if stored.get(r["run_id"]) is None or (stored[r["run_id"]] == "failed" and r["status"] != "failed")
        ]
        if todo:
            with self._connect() as con:
                _create_tables(con)
                for data in todo:
                    _insert(con, data)
        return len(todo)

    def set_meta(self, key: str, value: Any) -> None:
        """Store a JSON value under ``key`` (e.g. the grid file the runs came from)."""
        with self._connect() as con:
            _create_tables(con)
            con.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                (key, json.dumps(value, sort_keys=True, default=str)),
            )

    # ----------------------------------------------------------------- reads
    def meta(self, key: str, default: Any = None) -> Any:
        """The JSON value stored under ``key``."""
        with self._connect(write=False) as con:
            got = con.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return json.loads(got[0]) if got else default

    def statuses(self) -> dict[str, str]:
        """run_id -> status of every stored run."""
        with self._connect(write=False) as con:
            return dict(con.execute("SELECT run_id, status FROM runs").fetchall())

    def rows(self, status: str | None = None, current_grid: bool = True) -> list[dict[str, Any]]:
        """Runs (optionally of one status) as dicts, JSON columns decoded.

        With ``current_grid`` only the runs of the grid last run into this
        directory are returned (rows of an earlier, different grid stay stored).
        """
        sql, args = "SELECT * FROM runs", ()
        if status is not None:
            sql, args = sql + " WHERE status = ?", (status,)
        with self._connect(write=False) as con:
            cur = con.execute(
                sql + " ORDER BY use_case, granularity, weight_bits, act_bits, label", args
            )
            names = [d[0] for d in cur.description]
            out = [dict(zip(names, r, strict=True)) for r in cur.fetchall()]
        current = self.meta("run_ids") if current_grid else None
        if current is not None:
            keep = set(current)
            out = [row for row in out if row["run_id"] in keep]
        for row in out:
            for col in JSON_COLUMNS:
                if row.get(col):
                    row[col] = json.loads(row[col])
        return out

    def counts(self) -> dict[str, int]:
        """Number of runs per status."""
        with self._connect(write=False) as con:
            got = dict(con.execute("SELECT status, COUNT(*) FROM runs GROUP BY status").fetchall())
        return {s: int(got.get(s, 0)) for s in STATUSES}


def open_store(out_dir: str | Path) -> ResultStore:
    """The store of an existing output directory, for reading (one-line error when there is none)."""
    store = ResultStore(out_dir, readonly=True)
    if "runs" not in store.tables:
        raise StoreError(f"{store.path} holds no results; {recovery_hint(store.out_dir)}")
    return store


def stored_statuses(out_dir: str | Path) -> dict[str, str]:
    """run_id -> status of the runs in ``out_dir``'s store, read only ({} while there is none)."""
    if not (Path(out_dir) / DB_NAME).is_file():
        return {}
    store = ResultStore(out_dir, readonly=True)
    return store.statuses() if "runs" in store.tables else {}


def _create_tables(con: sqlite3.Connection) -> None:
    cols = ", ".join(f"{c} {t}" for c, t in COLUMNS.items())
    con.execute(f"CREATE TABLE IF NOT EXISTS runs ({cols})")
    # a store written by an earlier version lacks the newer columns: add them (empty for old rows)
    have = {r[1] for r in con.execute("PRAGMA table_info(runs)").fetchall()}
    for column, kind in COLUMNS.items():
        if column not in have:
            con.execute(f"ALTER TABLE runs ADD COLUMN {column} {kind}")
    con.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)")


def _normalize(row: dict[str, Any]) -> dict[str, Any]:
    """The row as stored: known columns, a valid status, JSON columns as text, a finishing time."""
    unknown = set(row) - set(COLUMNS)
    if unknown:
        raise KeyError(f"unknown result columns: {sorted(unknown)}")
    if row.get("status") not in STATUSES:
        raise ValueError(f"status must be one of {STATUSES}, got {row.get('status')!r}")
    data = dict(row)
    data.setdefault("finished_at", time.strftime("%Y-%m-%dT%H:%M:%S"))
    for col in JSON_COLUMNS:
        if col in data and not isinstance(data[col], str):
            data[col] = json.dumps(data[col], sort_keys=True, default=str)
    return data


def _insert(con: sqlite3.Connection, data: dict[str, Any]) -> None:
    names = list(data)
    con.execute(
        f"INSERT OR REPLACE INTO runs ({', '.join(names)}) VALUES ({', '.join('?' for _ in names)})",
        [data[n] for n in names],
    )


def _store_error(path: Path, exc: sqlite3.Error) -> StoreError:
    name, reason = getattr(exc, "sqlite_errorname", ""), first_line(exc, 100)
    if name in ("SQLITE_NOTADB", "SQLITE_CORRUPT"):
        return StoreError(f"{path} is damaged ({reason}); {recovery_hint(path.parent)}")
    if name in ("SQLITE_BUSY", "SQLITE_LOCKED"):
        return StoreError(f"{path} is locked by another process ({reason}); try again when it has finished")
    return StoreError(f"cannot use {path}: {reason}")


def recovery_hint(out_dir: str | Path) -> str:
    """How to go on from a store that cannot be used (the file itself is left as it is)."""
    out_dir = Path(out_dir)
    n = len(_record_files(out_dir))
    if n:
        return (
            f"the file is left as it is; 'tinyptq ablate --grid GRID --out {out_dir} --rebuild-store' "
            f"moves it aside and rebuilds the store from the {n} run record{'s' * (n != 1)} in {out_dir / RECORDS_DIR}"
        )
    return (
        f"the file is left as it is; move it aside and run 'tinyptq ablate' again to compute the runs anew "
        f"(no run records in {out_dir / RECORDS_DIR} to rebuild from)"
    )


def rebuild_store(out_dir: str | Path) -> tuple[Path | None, int]:
    """Move ``results.sqlite`` aside and build a new store from the run records: (where it went, rows restored).

    The old file (with its -wal / -shm companions) becomes
    ``results.sqlite.corrupt-<time>`` when it cannot be used, else
    ``results.sqlite.old-<time>``; nothing is deleted.
    """
    out_dir = Path(out_dir)
    path = out_dir / DB_NAME
    moved = None
    if path.exists():
        try:
            tag = "old" if "runs" in ResultStore(out_dir, readonly=True).check() else "corrupt"
        except TinyPTQError:
            tag = "corrupt"
        moved = path.with_name(f"{DB_NAME}.{tag}-{time.strftime('%Y%m%d-%H%M%S')}")
        n = 1
        while moved.exists():
            n += 1
            moved = moved.with_name(f"{DB_NAME}.{tag}-{time.strftime('%Y%m%d-%H%M%S')}-{n}")
        for suffix in ("-wal", "-shm", ""):  # the database file last: never a new file beside an old WAL
            if Path(f"{path}{suffix}").exists():
                os.replace(f"{path}{suffix}", f"{moved}{suffix}")
    return moved, ResultStore(out_dir).import_records()


# ------------------------------------------------------------------ records
_SAFE_ID = re.compile(r"[A-Za-z0-9_.-]{1,100}")


def _record_files(out_dir: Path) -> list[Path]:
    folder = out_dir / RECORDS_DIR
    return sorted(folder.glob("*.json")) if folder.is_dir() else []


def write_record(out_dir: str | Path, data: dict[str, Any]) -> Path:
    """Write one stored row as ``OUT/records/<run_id>.json`` (atomically); ConfigError when it cannot."""
    from tinyptq.cache import content_hash

    run_id = str(data["run_id"])
    name = run_id if _SAFE_ID.fullmatch(run_id) and not run_id.startswith(".") else content_hash(run_id)
    path = Path(out_dir) / RECORDS_DIR / f"{name}.json"
    tmp = path.with_name(f".{name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(data, sort_keys=True, default=str))
        os.replace(tmp, path)
    except OSError as exc:
        raise ConfigError(f"cannot write {path}: {exc.strerror or first_line(exc)}") from None
    return path


def read_records(out_dir: str | Path) -> list[dict[str, Any]]:
    """The run records of ``out_dir`` that can be read (a damaged record is left out)."""
    out = []
    for path in _record_files(Path(out_dir)):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if (
            isinstance(data, dict)
            and set(data) <= set(COLUMNS)
            and isinstance(data.get("run_id"), str)
            and data.get("status") in STATUSES
            and all(v is None or isinstance(v, str | int | float) for v in data.values())
        ):
            out.append(data)
    return out
