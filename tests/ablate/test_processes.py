"""The runner in real processes on the ic use case: SIGKILL and resume, Ray equals local."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.ablate.conftest import grid_dict
from tinyptq.ablate.grid import Grid
from tinyptq.ablate.runner import run_grid
from tinyptq.ablate.store import ResultStore

pytestmark = pytest.mark.slow

GRID = grid_dict("ic", "per_channel", samples=32)


def _ablate(grid_file: Path, out: Path, data_dir: Path, **popen) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "tinyptq.cli",
        "ablate",
        "--grid",
        str(grid_file),
        "--out",
        str(out),
        "--workers",
        "2",
        "--data-dir",
        str(data_dir),
        "--no-report",
    ]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def _done_rows(out: Path) -> int:
    try:
        con = sqlite3.connect(out / "results.sqlite", timeout=1)
        return con.execute("SELECT COUNT(*) FROM runs WHERE status = 'done'").fetchone()[0]
    except sqlite3.Error:
        return 0


def test_killed_grid_resumes_with_every_run_once(tmp_path, data_dir):
    grid_file = tmp_path / "grid.yaml"
    grid_file.write_text(yaml.safe_dump(GRID))
    out = tmp_path / "out"
    proc = _ablate(grid_file, out, data_dir, start_new_session=True)
    deadline = time.time() + 300
    while _done_rows(out) < 2 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert proc.poll() is None, (
        f"the grid ended before it could be killed: {proc.communicate()[1][-500:]}"
    )
    os.killpg(proc.pid, signal.SIGKILL)  # the coordinator and its workers, mid-grid
    proc.wait()
    before = {r["run_id"]: r for r in ResultStore(out).rows()}
    assert 2 <= len(before) < 8

    rerun = _ablate(grid_file, out, data_dir)
    stdout, stderr = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, stderr[-1000:]
    assert (
        f"8 runs: 8 done, 0 failed, 0 skipped ({8 - len(before)} run now, {len(before)} already stored)"
        in stdout
    )

    con = sqlite3.connect(out / "results.sqlite")
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    counts = con.execute("SELECT run_id, COUNT(*) FROM runs GROUP BY run_id").fetchall()
    expected = {r.run_id for r in Grid.from_dict(GRID).expand()}
    assert {rid for rid, _ in counts} == expected and all(n == 1 for _, n in counts)
    after = {r["run_id"]: r for r in ResultStore(out).rows()}
    for run_id, row in before.items():  # nothing finished before the kill was lost or redone
        assert after[run_id] == row


def test_ray_executor_gives_the_local_results(tmp_path, data_dir):
    if not os.environ.get("CI"):
        pytest.importorskip("ray")
    grid = dict(GRID, toggles={"cle": ["off", "on"]})
    local = run_grid(
        Grid.from_dict(grid), tmp_path / "local", workers=2, data_dir=data_dir, progress=False
    )
    ray = run_grid(
        Grid.from_dict(grid),
        tmp_path / "ray",
        workers=2,
        executor="ray",
        data_dir=data_dir,
        progress=False,
    )
    assert local.counts == ray.counts == {"done": 4, "failed": 0, "skipped": 0}

    def measures(out):
        keys = ("value", "fp32", "weight_bytes", "bops", "extras")
        return {r["run_id"]: tuple(str(r[k]) for k in keys) for r in ResultStore(out).rows()}

    assert measures(tmp_path / "local") == measures(tmp_path / "ray")
