"""``tinyptq pareto``: one row per budget point and uniform reference, resume from pareto.jsonl,
infeasible budgets as rows, one-line errors for malformed budgets.

Runs in-process on the in-memory ``mem-reliability`` use case (conv-BN-ReLU,
conv, pooling, dense: 4 classes) with a small pipeline file, so one sweep takes
seconds. The sweep is computed once per module and shared.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import shutil

import pytest
import yaml

import tinyptq.pareto as pareto
from tests.cli.test_cli import assert_one_line_error, run_cli
from tests.core import memory_usecase as mem  # registers the use case
from tinyptq.allocation import BUDGETS
from tinyptq.cli import main
from tinyptq.pipeline import Pipeline, create_stage

PIPELINE = {
    "name": "tiny_mixed",
    "quant": {"weight_bits": 8, "act_bits": 8, "weight_per_channel": True},
    "calibration": {"samples": 32, "seed": 0},
    "stages": [
        "bn_folding",
        {
            "mixed_precision": {
                "weight_kb": 48,  # replaced by each budget of the sweep
                "weight_candidates": [2, 4, 8],
                "act_candidates": [8],
                "sensitivity": "myqasr",
                "samples": 32,
            }
        },
        {"range_setting": {"weights": "minmax", "activations": "minmax"}},
    ],
}
# the model's weights: 474 bytes at 8 bits, 293 at 4, at least 203 (0.198 KiB) with 2-bit kernels
FEASIBLE = (0.3, 0.45)
INFEASIBLE = 0.05
POINTS = [f"weight_kb={v:g}" for v in (*FEASIBLE, INFEASIBLE)] + ["W8A8"]


def pareto_args(out, pipeline, budget=f"weight_kb={FEASIBLE[0]},{FEASIBLE[1]},{INFEASIBLE}", uniform="W8A8"):
    return ["pareto", "--use-case", mem.NAME, "--pipeline", pipeline, "--budget", budget, "--uniform", uniform,
            "--out", out]


def run_captured(args) -> tuple[int, str, str]:
    """The CLI in-process, outside a test (module fixtures cannot use capsys)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def pipeline_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("pipeline") / "tiny_mixed.yaml"
    path.write_text(yaml.safe_dump(PIPELINE, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, pipeline_file):
    """One sweep: two feasible budgets, one infeasible, uniform W8A8."""
    out = tmp_path_factory.mktemp("sweep") / "pareto"
    code, stdout, stderr = run_captured(pareto_args(out, pipeline_file))
    assert code == 0, stderr
    return out, stdout


def read_csv(path):
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def test_one_row_per_budget_point_and_uniform_reference(sweep):
    out, stdout = sweep
    assert sorted(p.name for p in out.iterdir()) == ["pareto.csv", "pareto.json", "pareto.jsonl", "pareto.png"]
    rows = json.loads((out / "pareto.json").read_text())
    assert [r["point"] for r in rows] == POINTS
    assert [r["kind"] for r in rows] == ["mixed", "mixed", "mixed", "uniform"]
    table = read_csv(out / "pareto.csv")
    assert [r["point"] for r in table] == POINTS
    assert {"point", "kind", "value", "metric", "fp32", "weight_bytes", "bops", "error"} <= set(table[0])
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    by_point = {r["point"]: r for r in rows}
    for budget in FEASIBLE:
        row = by_point[f"weight_kb={budget:g}"]
        assert row["budgets"] == {"weight_kb": budget} and row.get("error") is None
        assert 0 <= row["value"] <= 100 and row["metric"] == "accuracy"
        assert row["weight_bytes"] <= budget * 1024  # the cost of the encodings range_setting set
        assert row["total_bytes"] == row["weight_bytes"] + row["peak_activation_bytes"]
        bits = row["allocation"]["weight_bits"]
        assert set(bits) == {"c1", "c2", "fc"} and set(bits.values()) <= {2, 4, 8}
        assert row["allocation"]["costs"]["weight_kb"] * 1024 == row["weight_bytes"]
    tight, loose = (by_point[f"weight_kb={b:g}"] for b in FEASIBLE)
    assert tight["weight_bytes"] < loose["weight_bytes"]
    uniform = by_point["W8A8"]
    assert uniform["allocation"] is None and uniform["budgets"] is None
    assert uniform["weight_bytes"] > loose["weight_bytes"] > tight["weight_bytes"]
    assert len(stdout.strip().splitlines()) == len(POINTS) + 3  # a line per point, then the three files


def test_an_infeasible_budget_is_a_row_with_its_error(sweep):
    out, stdout = sweep
    rows = {r["point"]: r for r in json.loads((out / "pareto.json").read_text())}
    row = rows[f"weight_kb={INFEASIBLE:g}"]
    assert row["value"] is None and row.get("weight_bytes") is None
    assert row["error"].startswith(f"budget weight_kb={INFEASIBLE:g} cannot be met; the smallest feasible weight_kb is")
    smallest = float(row["error"].rsplit(" ", 1)[1])
    assert INFEASIBLE < smallest < FEASIBLE[0]
    (csv_row,) = [r for r in read_csv(out / "pareto.csv") if r["point"] == row["point"]]
    assert csv_row["value"] == "" and csv_row["error"] == row["error"]
    assert f"weight_kb={INFEASIBLE:g}: infeasible: budget" in stdout


def test_a_rerun_reads_the_finished_points(sweep, pipeline_file, monkeypatch, capsys):
    out, stdout = sweep
    log = (out / "pareto.jsonl").read_bytes()
    table = (out / "pareto.csv").read_text()

    def boom(*args, **kwargs):
        raise AssertionError("a pipeline ran again")

    monkeypatch.setattr(Pipeline, "run", boom)
    code, again, err = run_cli(capsys, *pareto_args(out, pipeline_file))
    assert code == 0, err
    assert (out / "pareto.jsonl").read_bytes() == log
    assert (out / "pareto.csv").read_text() == table
    assert again == stdout


def test_a_line_cut_short_by_an_interrupted_write_runs_again(sweep, pipeline_file, tmp_path, capsys):
    """The resume claim with a crash mid-write: that point reruns; nothing else; no traceback."""
    out = tmp_path / "pareto"
    shutil.copytree(sweep[0], out)
    lines = (out / "pareto.jsonl").read_text().splitlines(keepends=True)
    assert [json.loads(line)["point"] for line in lines] == POINTS
    cut = POINTS.index(f"weight_kb={INFEASIBLE:g}")  # its rerun is quick: no simulation
    kept = lines[:cut] + lines[cut + 1 :]
    (out / "pareto.jsonl").write_text("".join(kept) + lines[cut][:25])
    code, _, err = run_cli(capsys, *pareto_args(out, pipeline_file))
    assert code == 0, err
    text = (out / "pareto.jsonl").read_text()
    assert text.endswith("\n")
    rows = [json.loads(line) for line in text.splitlines()]
    assert [r["point"] for r in rows] == [p for p in POINTS if p != POINTS[cut]] + [POINTS[cut]]
    assert text.startswith("".join(kept))  # the finished rows as they were
    assert rows[-1]["error"] == json.loads(lines[cut])["error"]


@pytest.mark.parametrize(
    ("option", "text", "needles"),
    [
        ("--budget", "weight_kb=abc", ["--budget option 'weight_kb' must be a number > 0", "'abc'"]),
        ("--budget", "size=3", ["--budget 'size=3': expected NAME=V1,V2,...", ", ".join(BUDGETS)]),
        ("--budget", "weight_kb", ["--budget 'weight_kb': expected NAME=V1,V2,..."]),
        ("--budget", "weight_kb=0", ["--budget option 'weight_kb' must be a number > 0"]),
        ("--budget", "bops=1e6,-2", ["--budget option 'bops' must be a number > 0", "-2"]),
        ("--budget", "weight_kb=1,,2", ["--budget option 'weight_kb'"]),
        ("--uniform", "W4", ["--uniform 'W4': expected WnAm"]),
        ("--uniform", "W1A8", ["--uniform option 'weight bits' must be an integer in [2, 16], got 1"]),
        ("--uniform", "W4A99", ["--uniform option 'act bits'", "got 99"]),
    ],
)
def test_a_malformed_option_is_a_one_line_error(capsys, tmp_path, pipeline_file, option, text, needles):
    args = {"--budget": "weight_kb=1", "--uniform": "W8A8", option: text}
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, *pareto_args(out, pipeline_file, args["--budget"], args["--uniform"]))
    assert code == 2
    assert_one_line_error(code, err, *needles)
    assert not out.exists()  # refused before any work


def test_the_pipeline_is_split_at_mixed_precision():
    stages = [create_stage("bn_folding"), create_stage("range_setting")]
    prefix, rest = pareto.split_pipeline(stages)
    assert [s.name for s in prefix] == ["bn_folding"]
    assert [s.name for s in rest] == ["mixed_precision", "range_setting"]
    stage = pareto.with_budgets(create_stage("mixed_precision", {"weight_kb": 9.0, "samples": 8}), {"bops": 5e6})
    assert stage.budgets() == {"bops": 5e6} and stage.samples == 8
    assert pareto.parse_budget("weight_kb = 8, 10") == ("weight_kb", [8.0, 10.0])
    assert pareto.parse_uniform("W8A8, w4a8,") == [(8, 8), (4, 8)]
