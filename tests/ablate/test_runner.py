"""The runner on the tiny use case, in-process: results, resume, caching, failures."""

from __future__ import annotations

import io
import shutil

import pytest

from tinyptq.ablate.grid import Grid
from tinyptq.ablate.runner import run_grid
from tinyptq.ablate.store import ResultStore


def _forget_results(out) -> None:
    """Remove the store and the run records (else the records would restore the store)."""
    (out / "results.sqlite").unlink()
    shutil.rmtree(out / "records")


def _run(grid: dict, out, **kw):
    stream = io.StringIO()
    summary = run_grid(Grid.from_dict(grid), out, workers=1, stream=stream, **kw)
    return summary, stream.getvalue()


def test_every_grid_point_is_stored_with_its_measures(tiny_grid, tmp_path):
    summary, log = _run(tiny_grid, tmp_path)
    assert summary.counts == {"done": 8, "failed": 0, "skipped": 0} and summary.ran == 8
    rows = ResultStore(tmp_path).rows()
    assert len(rows) == 8
    for row in rows:
        assert row["metric"] == "accuracy" and row["fp32"] == 100.0
        assert 0.0 <= row["value"] <= 100.0 and row["delta"] == pytest.approx(row["value"] - 100.0)
        assert row["bops"] < row["fp32_bops"] and row["weight_bytes"] < row["fp32_weight_bytes"]
        assert "range_setting" in row["stage_seconds"]
    by_bits = {(r["weight_bits"], r["label"]): r for r in rows}
    lab = "cle=off range_setting.weights=minmax"
    assert by_bits[(4, lab)]["bops"] == pytest.approx(by_bits[(8, lab)]["bops"] / 2)
    assert by_bits[(4, lab)]["weight_bytes"] < by_bits[(8, lab)]["weight_bytes"]
    assert log.count("[done]") == 8


def test_rerun_skips_finished_runs_and_keeps_their_rows(tiny_grid, tmp_path):
    _run(tiny_grid, tmp_path)
    before = {r["run_id"]: r for r in ResultStore(tmp_path).rows()}
    summary, log = _run(tiny_grid, tmp_path)
    assert summary.ran == 0 and summary.reused == 8 and "[done]" not in log
    after = {r["run_id"]: r for r in ResultStore(tmp_path).rows()}
    assert after == before


def test_cached_prefixes_give_the_same_numbers_as_a_plain_pipeline(tiny_grid, tmp_path):
    from tinyptq import api

    _run(tiny_grid, tmp_path)
    rows = ResultStore(tmp_path).rows()
    row = next(
        r
        for r in rows
        if r["weight_bits"] == 4 and r["label"] == "cle=on range_setting.weights=mse"
    )
    assert row["extras"]["cached_stages"] == 2  # bn_folding + cle came from the cache
    spec = {
        "quant": {"weight_bits": 4, "act_bits": 8, "weight_per_channel": False},
        "stages": [
            "bn_folding",
            "cle",
            {"range_setting": {"weights": "mse", "activations": "minmax"}},
        ],
    }
    direct = api.quantize("tiny-test", spec, calib_samples=16, seed=0)
    assert row["value"] == direct.summary["quantized"]
    assert row["weight_bytes"] == direct.summary["weight_bytes"]


def test_shared_work_is_computed_once(tiny_grid, tmp_path):
    _run(tiny_grid, tmp_path)
    cache = tmp_path / "cache"
    # FP32 once; prefixes [bn_folding] and [bn_folding, cle] once each;
    # activation statistics once per graph state (with / without CLE), for both bit-widths
    assert len(list((cache / "fp32").glob("*.pkl"))) == 1
    assert len(list((cache / "prefix").glob("*.pkl"))) == 2
    assert len(list((cache / "act_statistics").glob("*.pkl"))) == 2


def test_a_failing_run_is_recorded_and_the_grid_goes_on(tiny_grid, tmp_path):
    tiny_grid["use_cases"] = ["tiny-test", "tiny-nan"]
    tiny_grid["toggles"] = {"range_setting": ["off", "on"]}
    summary, log = _run(tiny_grid, tmp_path)
    assert summary.counts == {"done": 2, "failed": 2, "skipped": 4}
    failed = ResultStore(tmp_path).rows(status="failed")
    assert {r["use_case"] for r in failed} == {"tiny-nan"}
    assert all(r["error"] == "tiny-nan calibration data contains 1 NaN/Inf values" for r in failed)
    skipped = ResultStore(tmp_path).rows(status="skipped")
    assert all("no range_setting" in r["error"] for r in skipped)
    assert "[failed] tiny-nan" in log

    # failed runs are kept on resume unless asked to retry
    assert _run(tiny_grid, tmp_path)[0].ran == 0
    assert _run(tiny_grid, tmp_path, retry_failed=True)[0].ran == 2


def test_same_seed_same_numbers(tiny_grid, tmp_path):
    _run(tiny_grid, tmp_path / "a")
    _run(tiny_grid, tmp_path / "b")

    def measures(out):
        return {
            r["run_id"]: (r["value"], r["extras"]["output SQNR vs FP32 (dB)"])
            for r in ResultStore(out).rows()
        }

    a, b = measures(tmp_path / "a"), measures(tmp_path / "b")
    assert a == b
    assert len({round(sqnr, 6) for _, sqnr in a.values()}) == 8  # every configuration differs


@pytest.fixture
def config_writer():
    """A test stage that writes 3-bit weights into the config, as mixed precision will."""
    from tinyptq.pipeline import _REGISTRY, Stage, register
    from tinyptq.quant import BITS

    class WriteConfig(Stage):
        name = "test_write_config"
        precedes = ("range_setting",)
        parameter_constraints = {"weight_bits": BITS}
        uses_quant_config = True

        def __init__(self, weight_bits: int = 3) -> None:
            self.weight_bits = weight_bits

        def apply(self, state):
            state = state.evolve()
            state.config = state.config.replace(weight_bits=self.weight_bits)
            return state

    assert WriteConfig.name not in _REGISTRY
    register(WriteConfig)
    try:
        yield WriteConfig.name
    finally:
        _REGISTRY.pop(WriteConfig.name, None)


def test_a_cached_prefix_keeps_the_config_its_stages_wrote(config_writer, tiny_grid, tmp_path):
    from tinyptq import api

    tiny_grid["bits"] = ["W8A8"]
    tiny_grid["pipeline"]["stages"] = [
        "bn_folding",
        config_writer,
        {"range_setting": {"weights": "minmax", "activations": "minmax"}},
    ]
    tiny_grid["toggles"] = {"range_setting.weights": ["minmax", "mse"]}
    _run(tiny_grid, tmp_path)
    assert len(list((tmp_path / "cache" / "prefix").glob("*.pkl"))) == 2
    _forget_results(tmp_path)  # a fresh store: both runs now resume from the disk cache
    summary, _ = _run(tiny_grid, tmp_path)
    assert summary.counts["done"] == 2

    for row in ResultStore(tmp_path).rows():
        assert row["extras"]["cached_stages"] == 2
        weights = row["label"].partition("=")[2]
        spec = {
            "quant": {"weight_bits": 8, "act_bits": 8, "weight_per_channel": False},
            "stages": tiny_grid["pipeline"]["stages"][:2]
            + [{"range_setting": {"weights": weights, "activations": "minmax"}}],
        }
        direct = api.quantize("tiny-test", spec, calib_samples=16, seed=0)
        assert direct.state.config.weight_bits == 3
        assert row["weight_bytes"] == direct.summary["weight_bytes"]
        assert row["value"] == direct.summary["quantized"]
        sqnr = "output SQNR vs FP32 (dB)"
        assert row["extras"][sqnr] == pytest.approx(direct.summary["metric_extras"][sqnr])


def test_a_prefix_shared_across_bit_widths_takes_each_runs_config(tiny_grid, tmp_path):
    tiny_grid["toggles"] = {
        "range_setting.weights": ["minmax", "mse"]
    }  # cle on: bn_folding + cle shared
    _run(tiny_grid, tmp_path)
    _forget_results(tmp_path)
    _run(tiny_grid, tmp_path)
    rows = ResultStore(tmp_path).rows()
    assert {r["extras"]["cached_stages"] for r in rows} == {2}
    by_bits = {r["weight_bits"]: r for r in rows if r["label"].endswith("minmax")}
    assert by_bits[4]["weight_bytes"] < by_bits[8]["weight_bytes"]
    assert by_bits[4]["bops"] == pytest.approx(by_bits[8]["bops"] / 2)


def test_the_planner_shares_prefixes_within_a_use_case_and_calibration_set(tiny_grid, tmp_path):
    from tinyptq.ablate.runner import plan_tasks

    tiny_grid["use_cases"] = ["tiny-test", "tiny-nan"]
    tiny_grid["calibration"] = {"samples": [8, 16]}
    tiny_grid["bits"] = ["W8A8"]
    del tiny_grid["toggles"]
    tasks = plan_tasks(Grid.from_dict(tiny_grid).expand(), tmp_path, None, None)
    assert len(tasks) == 4 and all(t.shared_prefixes == [] for t in tasks.values())

    tiny_grid["bits"] = [
        "W8A8",
        "W4A8",
    ]  # bn_folding + cle shared across bit-widths, range_setting not
    tasks = plan_tasks(Grid.from_dict(tiny_grid).expand(), tmp_path, None, None)
    assert len(tasks) == 8 and all(t.shared_prefixes == [1, 2] for t in tasks.values())


def test_a_rounding_subgrid_runs_stores_and_matches_a_plain_pipeline(tiny_grid, tmp_path):
    from tinyptq import api

    tiny_grid["bits"] = ["W4A8"]
    tiny_grid["pipeline"]["stages"] += [{"adaround": {"iterations": 4}}, {"gptq": {}}]
    tiny_grid["toggles"] = [
        {"cle": ["off", "on"], "adaround": "off", "gptq": "off"},
        {"adaround": ["off", "on"], "gptq": ["off", "on"]},
    ]
    summary, _ = _run(tiny_grid, tmp_path)
    # sub-grid 1: cle off/on; sub-grid 2 (cle on): nearest (shared), adaround, gptq, both (skipped)
    assert summary.counts == {"done": 4, "failed": 0, "skipped": 1}
    rows = {r["label"]: r for r in ResultStore(tmp_path).rows() if r["status"] == "done"}
    label = "cle=on adaround=on gptq=off"
    assert "adaround" in rows[label]["stage_seconds"]
    spec = {
        "quant": {"weight_bits": 4, "act_bits": 8, "weight_per_channel": False},
        "stages": [
            "bn_folding",
            "cle",
            {"range_setting": {"weights": "minmax", "activations": "minmax"}},
            {"adaround": {"iterations": 4}},
        ],
    }
    direct = api.quantize("tiny-test", spec, calib_samples=16, seed=0)
    assert rows[label]["value"] == direct.summary["quantized"]
    assert rows[label]["weight_bytes"] == direct.summary["weight_bytes"]
