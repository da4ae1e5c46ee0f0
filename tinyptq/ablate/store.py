"""The results store: one SQLite file per output directory, one row per run.

Only the coordinating process writes (workers send results back), each row in
its own transaction, so a grid killed at any moment leaves a consistent file
holding every run that finished. ``run_id`` is the content hash of the run's
configuration: writing a run twice replaces it, so every run is present once.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

DB_NAME = "results.sqlite"

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
    "stage_seconds": "TEXT",  # JSON {stage: seconds}
    "seconds": "REAL",
    "status": "TEXT",  # done | failed | skipped
    "error": "TEXT",
    "finished_at": "TEXT",
}
JSON_COLUMNS = ("toggles", "pipeline", "extras", "stage_seconds")
STATUSES = ("done", "failed", "skipped")


class ResultStore:
    """Rows of an ablation grid in ``OUT_DIR/results.sqlite``."""

    def __init__(self, out_dir: str | Path) -> None:
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / DB_NAME
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with self._connect() as con:
            cols = ", ".join(f"{c} {t}" for c, t in COLUMNS.items())
            con.execute(f"CREATE TABLE IF NOT EXISTS runs ({cols})")
            con.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)")

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        con = sqlite3.connect(self.path, timeout=60, isolation_level=None)
        try:
            con.execute("PRAGMA journal_mode=WAL")
            con.execute("PRAGMA synchronous=FULL")
            con.execute("BEGIN IMMEDIATE")
            try:
                yield con
            except BaseException:
                con.execute("ROLLBACK")
                raise
            con.execute("COMMIT")
        finally:
            con.close()

    # ---------------------------------------------------------------- writes
    def put(self, row: dict[str, Any]) -> None:
        """Insert or replace one run (a single atomic transaction)."""
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
        names = list(data)
        sql = (
            f"INSERT OR REPLACE INTO runs ({', '.join(names)}) "
            f"VALUES ({', '.join('?' for _ in names)})"
        )
        with self._connect() as con:
            con.execute(sql, [data[n] for n in names])

    def set_meta(self, key: str, value: Any) -> None:
        """Store a JSON value under ``key`` (e.g. the grid file the runs came from)."""
        with self._connect() as con:
            con.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                (key, json.dumps(value, sort_keys=True, default=str)),
            )

    # ----------------------------------------------------------------- reads
    def meta(self, key: str, default: Any = None) -> Any:
        """The JSON value stored under ``key``."""
        with self._connect() as con:
            got = con.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return json.loads(got[0]) if got else default

    def statuses(self) -> dict[str, str]:
        """run_id -> status of every stored run."""
        with self._connect() as con:
            return dict(con.execute("SELECT run_id, status FROM runs").fetchall())

    def rows(self, status: str | None = None, current_grid: bool = True) -> list[dict[str, Any]]:
        """Runs (optionally of one status) as dicts, JSON columns decoded.

        With ``current_grid`` only the runs of the grid last run into this
        directory are returned (rows of an earlier, different grid stay stored).
        """
        sql, args = "SELECT * FROM runs", ()
        if status is not None:
            sql, args = sql + " WHERE status = ?", (status,)
        with self._connect() as con:
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
        with self._connect() as con:
            got = dict(con.execute("SELECT status, COUNT(*) FROM runs GROUP BY status").fetchall())
        return {s: int(got.get(s, 0)) for s in STATUSES}


def open_store(out_dir: str | Path) -> ResultStore:
    """The store of an existing output directory (ConfigError when there is none)."""
    from tinyptq.errors import ConfigError

    path = Path(out_dir) / DB_NAME
    if not path.is_file():
        raise ConfigError(f"no results in {out_dir} (expected {path}); run 'tinyptq ablate' first")
    return ResultStore(out_dir)
