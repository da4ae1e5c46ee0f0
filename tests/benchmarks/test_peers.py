"""benchmarks/peers.py: the plan, the driver protocol end to end, and the headline arithmetic."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCH))

import peer_report  # noqa: E402
import peers  # noqa: E402


def test_plan_runs_adaround_everywhere_gptq_at_w4a8_and_fast_methods_on_label_free_cases():
    jobs = peers.plan(["ic", "vww"], list(peers.TOOLS), list(peers.SETTINGS))
    ic = {(s, t, m) for uc, s, t, m in jobs if uc == "ic"}
    assert ("W4A8", "aimet", "adaround") in ic and ("W8A8", "aimet", "adaround") in ic
    assert {s for s, t, m in ic if (t, m) == ("mct", "gptq")} == {"W4A8"}
    assert ("W3A8", "tinyptq", "adaround") in ic and ("W3A8", "onnxruntime", "minmax") in ic
    assert {t for s, t, m in ic if s == "mixed"} == {"tinyptq", "mct"}
    vww = {(s, t, m) for uc, s, t, m in jobs if uc == "vww"}
    assert {s for s, t, m in vww} == set(peers.LABEL_FREE_SETTINGS)
    assert {(t, m) for s, t, m in vww if m in ("adaround", "gptq")} == {("tinyptq", "gptq")}
    assert len(jobs) == len(set(jobs))


def _tiny_onnx(path: Path) -> None:
    """NHWC input -> Transpose -> Conv 3x3 -> Relu -> GlobalAveragePool -> Flatten -> Gemm -> Softmax."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.normal(size=(4, 2, 3, 3)).astype(np.float32), "w"),
        numpy_helper.from_array(rng.normal(size=4).astype(np.float32), "b"),
        numpy_helper.from_array(rng.normal(size=(4, 3)).astype(np.float32), "fw"),
        numpy_helper.from_array(np.zeros(3, np.float32), "fb"),
    ]
    nodes = [
        helper.make_node("Transpose", ["input"], ["t"], perm=[0, 3, 1, 2]),
        helper.make_node("Conv", ["t", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("GlobalAveragePool", ["r"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]),
        helper.make_node("Gemm", ["f", "fw", "fb"], ["l"]),
        helper.make_node("Softmax", ["l"], ["out"]),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["n", 6, 6, 2])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["n", 3])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    folder = tmp_path_factory.mktemp("peers")
    _tiny_onnx(folder / "model.onnx")
    rng = np.random.default_rng(1)
    np.save(folder / "calib.npy", rng.normal(size=(64, 6, 6, 2)).astype(np.float32))
    np.save(folder / "eval_x.npy", rng.normal(size=(20, 6, 6, 2)).astype(np.float32))
    return folder


def _job(folder: Path, method: str, w: int, a: int, name: str) -> dict:
    return {
        "tool": "onnxruntime", "method": method, "use_case": "tiny", "weight_bits": w, "act_bits": a,
        "seed": 0, "options": {}, "model_h5": "", "model_onnx": str(folder / "model.onnx"),
        "calib": str(folder / "calib.npy"), "eval_x": str(folder / "eval_x.npy"), "out": str(folder / name),
    }


def test_a_driver_answers_scores_time_and_memory(shared):
    job = _job(shared, "minmax", 8, 8, "ok")
    row = peers.run_job(Path(sys.executable), "onnxruntime", job, timeout=300, cpu=0)  # pinned to one core
    assert row["status"] == "ok", row
    assert row["quantize_seconds"] > 0 and row["wall_seconds"] >= row["quantize_seconds"]
    assert 10 < row["peak_rss_mb"] < 4000
    scores = np.load(Path(job["out"]) / "scores.npy")
    assert scores.shape == (20, 3)
    # the int8 model stays close to the float one it came from
    import onnxruntime as ort

    ref = ort.InferenceSession(job["model_onnx"]).run(None, {"input": np.load(shared / "eval_x.npy")})[0]
    assert np.abs(scores - ref).max() < 0.1
    assert json.loads((Path(job["out"]) / "result.json").read_text())["config"]["weight_type"] == "QInt8"


def test_an_unsupported_setting_and_a_failing_run_are_rows_with_reasons(shared):
    row = peers.run_job(Path(sys.executable), "onnxruntime", _job(shared, "minmax", 3, 8, "w3"), timeout=300)
    assert row["status"] == "unsupported" and "3-bit" in row["reason"]
    broken = _job(shared, "minmax", 8, 8, "broken")
    broken["model_onnx"] = str(shared / "missing.onnx")
    row = peers.run_job(Path(sys.executable), "onnxruntime", broken, timeout=300)
    assert row["status"] == "failed" and "missing.onnx" in row["reason"]


def _row(tool, method, setting, value, seconds):
    return {"use_case": "ic", "setting": setting, "tool": tool, "method": method, "status": "ok",
            "value": value, "quantize_seconds": seconds, "peak_rss_mb": 100.0}


def test_headline_compares_the_best_of_each_side_and_times_the_closest_peer():
    rows = [
        _row("tinyptq", "minmax", "W4A8", 80.0, 2.0),
        _row("tinyptq", "adaround", "W4A8", 87.0, 100.0),
        _row("aimet", "adaround", "W4A8", 86.0, 50.0),
        _row("onnxruntime", "minmax", "W4A8", 85.0, 3.0),
        _row("mct", "gptq", "W4A8", 88.5, 400.0),
        {"use_case": "ic", "setting": "W3A8", "tool": "onnxruntime", "method": "minmax", "status": "unsupported"},
        _row("tinyptq", "adaround", "W3A8", 86.0, 90.0),
    ]
    (h,) = peer_report.headline(rows)  # W3A8 has no peer that ran: no headline row
    assert (h["setting"], h["tinyptq"], h["peer"]) == ("W4A8", "adaround", "mct gptq")
    assert h["difference"] == pytest.approx(-1.5)
    assert h["closest"] == "aimet adaround" and h["time_ratio"] == pytest.approx(2.0)
    stamp = {"date": "d", "cores": 2, "jobs": 2, "load_average": [0.1, 0.2], "parts": [], "python": "3.11", "versions": {"tinyptq": "0"}, "calib_samples": 8,
             "seed": 0, "prepare_seconds": 1, "run_seconds": 60,
             "use_cases": {"ic": {"fp32": 88.8, "metric": "accuracy", "eval_samples": 5, "eval_source": "x"}}}
    text = peer_report.markdown(rows, stamp)
    assert "**-1.50**" in text and "| onnxruntime quantize_static | minmax | 85.00 (3 s, 100 MB) | n/a |" in text


def test_readme_block_replaces_only_between_its_markers(tmp_path):
    import readme_block

    readme = tmp_path / "README.md"
    readme.write_text("top\n<!-- peers:start -->\nold\n<!-- peers:end -->\nbottom\n")
    assert readme_block.replace_block("peers", "new table\n", readme)
    assert readme.read_text() == "top\n<!-- peers:start -->\nnew table\n<!-- peers:end -->\nbottom\n"
    assert not readme_block.replace_block("speed", "x", readme)  # no markers: untouched
    assert "x" not in readme.read_text()
