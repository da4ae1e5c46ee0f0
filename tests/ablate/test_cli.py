"""tinyptq ablate / report on the command line (tiny use case, in-process)."""

from __future__ import annotations

import yaml

from tinyptq.cli import main


def _grid_file(tmp_path, grid: dict):
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    return path


def test_dry_run_lists_the_expanded_runs_without_running(tiny_grid, tmp_path, capsys):
    tiny_grid["toggles"]["range_setting"] = ["on", "off"]
    out = tmp_path / "out"
    assert main(["ablate", "--grid", str(_grid_file(tmp_path, tiny_grid)), "--out", str(out), "--dry-run"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 16 + 1
    assert sum(" todo " in line for line in lines) == 8
    assert sum(" skip " in line and "(no range_setting stage" in line for line in lines) == 8
    assert lines[-1].startswith("16 runs (8 distinct computations, 8 skipped as incompatible, 0 already stored")
    assert not out.exists()


def test_ablate_writes_store_and_report(tiny_grid, tmp_path, capsys):
    out = tmp_path / "out"
    grid = _grid_file(tmp_path, tiny_grid)
    assert main(["ablate", "--grid", str(grid), "--out", str(out), "--workers", "1"]) == 0
    captured = capsys.readouterr()
    assert "tiny: 8 runs: 8 done, 0 failed, 0 skipped (8 run now, 0 already stored)" in captured.out
    assert "ablate tiny" in captured.err  # the progress bar
    for name in ("results.sqlite", "results.csv", "report.md", "report.html"):
        assert (out / name).is_file()
    assert main(["report", str(out)]) == 0
    assert f"html: {out / 'report.html'}" in capsys.readouterr().out


def test_user_errors_are_one_line(tiny_grid, tmp_path, capsys):
    tiny_grid["toggles"] = {"no_such_stage": ["off", "on"]}
    cases = [
        (["ablate", "--grid", str(_grid_file(tmp_path, tiny_grid))], "unknown stage 'no_such_stage'"),
        (["ablate", "--grid", str(tmp_path / "none.yaml")], "grid file not found"),
        (["ablate", "--grid", "x.yaml", "--executor", "slurm"], "'slurm' is not one of 'local', 'ray'"),
        (["report", str(tmp_path / "empty")], "no results in"),
    ]
    for argv, message in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
