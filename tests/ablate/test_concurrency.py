"""One runner per output directory; report and --dry-run beside it (read only)."""

from __future__ import annotations

import io
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.ablate.test_faults import assert_complete, clean_run, fault_grid  # noqa: F401  (fixture)
from tinyptq.ablate.grid import Grid
from tinyptq.ablate.runner import LOCK_FILE, OutDirBusy, run_grid, runner_lock
from tinyptq.cli import main

_REPO = Path(__file__).resolve().parents[2]


def test_a_second_runner_on_the_same_directory_refuses_in_one_line(clean_run, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "out"
    shutil.copytree(clean_run[0], out)
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump(fault_grid()))
    with runner_lock(out):  # a runner at work
        assert (out / LOCK_FILE).read_text().strip() == str(os.getpid())
        with pytest.raises(OutDirBusy, match=rf"{out} is in use by another 'tinyptq ablate' \(pid {os.getpid()}\)"):
            run_grid(Grid.from_dict(fault_grid()), out, progress=False, stream=io.StringIO())
        assert main(["ablate", "--grid", str(grid), "--out", str(out), "--workers", "1"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"pid {os.getpid()}" in err and str(out) in err

        # reading needs no lock
        assert main(["ablate", "--grid", str(grid), "--out", str(out), "--dry-run"]) == 0
        assert "4 runs (4 distinct computations, 0 skipped as incompatible, 4 already stored" in capsys.readouterr().out
        assert main(["report", str(out)]) == 0
        assert "html: " in capsys.readouterr().out
    summary = run_grid(Grid.from_dict(fault_grid()), out, progress=False, stream=io.StringIO())
    assert summary.ran == 0 and summary.counts["done"] == 4  # released with the block
    assert_complete(out, clean_run[1])


def _ablate(grid_file: Path, out: Path) -> subprocess.Popen:
    code = (
        "import sys, tests.ablate.conftest; from tinyptq.cli import main; "  # registers the tiny use case
        f"sys.exit(main(['ablate', '--grid', {str(grid_file)!r}, '--out', {str(out)!r}, "
        "'--workers', '1', '--no-report']))"
    )
    env = {**os.environ, "TF_USE_LEGACY_KERAS": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}
    return subprocess.Popen(
        [sys.executable, "-c", code], cwd=_REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


@pytest.mark.slow
def test_two_ablate_processes_on_one_new_directory(clean_run, tmp_path):  # noqa: F811
    grid_file = tmp_path / "grid.yaml"
    grid_file.write_text(yaml.safe_dump(fault_grid()))
    out = tmp_path / "new-out"
    first = _ablate(grid_file, out)
    deadline = time.time() + 300
    lock = out / LOCK_FILE
    while not (lock.is_file() and lock.read_text().strip()) and first.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    assert first.poll() is None, first.communicate()[1][-1000:]
    second = _ablate(grid_file, out)
    _, err2 = second.communicate(timeout=300)
    out1, err1 = first.communicate(timeout=600)
    assert first.returncode == 0, err1[-1000:]
    assert second.returncode == 2
    assert err2 == f"error: {out} is in use by another 'tinyptq ablate' (pid {first.pid}); " \
        "wait until it has finished or choose another --out\n"
    assert "4 runs: 4 done, 0 failed, 0 skipped (4 run now, 0 already stored)" in out1
    con = sqlite3.connect(out / "results.sqlite")
    assert con.execute("SELECT COUNT(*), COUNT(DISTINCT run_id) FROM runs").fetchone() == (4, 4)
    con.close()
    assert_complete(out, clean_run[1])
