"""CLI: quantize --export, export RUN_DIR, and the one-line errors."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from tinyptq.cli import main

PIPELINE = """
name: folded
quant: {weight_bits: 8, act_bits: 8, weight_per_channel: true}
stages:
  - bn_folding
  - range_setting
"""


def run_cli(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, *needles):
    assert code == 2
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, data_dir):
    """One ic W8A8 run with every export format (as a CLI user would do it)."""
    tmp = tmp_path_factory.mktemp("cli")
    (tmp / "folded.yaml").write_text(PIPELINE)
    out = tmp / "run"
    code = main([
        "quantize", "--use-case", "ic", "--data-dir", str(data_dir), "--pipeline", str(tmp / "folded.yaml"),
        "--calib-samples", "32", "--out", str(out), "--export", "onnx,tflite,encodings",
    ])
    assert code == 0
    return out


def test_quantize_export_writes_all_files(run_dir):
    for name in ("summary.json", "state.pkl", "model.qdq.onnx", "model.tflite", "encodings.json"):
        assert (run_dir / name).is_file(), name
    onnx.checker.check_model(onnx.load(run_dir / "model.qdq.onnx"), full_check=True)
    enc = json.loads((run_dir / "encodings.json").read_text())
    assert enc["quant_config"]["weight_per_channel"] is True and len(enc["weights"]) == 10


def test_export_from_run_dir_reproduces_the_files(capsys, run_dir, tmp_path):
    code, out, _ = run_cli(capsys, "export", run_dir, "--format", "encodings,onnx,tflite", "--out", tmp_path)
    assert code == 0, out
    assert "onnx: " in out and "tflite: " in out and "encodings: " in out
    a = json.loads((run_dir / "encodings.json").read_text())
    b = json.loads((tmp_path / "encodings.json").read_text())
    assert a == b
    inits = [{t.name: numpy_helper.to_array(t) for t in onnx.load(d / "model.qdq.onnx").graph.initializer}
             for d in (run_dir, tmp_path)]
    assert inits[0].keys() == inits[1].keys()
    assert all(np.array_equal(inits[0][k], inits[1][k]) for k in inits[0])
    assert (run_dir / "model.tflite").read_bytes() == (tmp_path / "model.tflite").read_bytes()


def test_unknown_format_is_one_line_error_before_any_work(capsys, tmp_path):
    code, _, err = run_cli(
        capsys, "quantize", "--use-case", "ic", "--out", tmp_path / "x", "--export", "onnx,coreml"
    )
    assert_one_line_error(code, err, "unknown export format 'coreml'", "onnx, tflite, encodings")
    assert not (tmp_path / "x").exists()
    code, _, err = run_cli(capsys, "export", tmp_path, "--format", "pt")
    assert_one_line_error(code, err, "unknown export format 'pt'", "valid formats")


def test_tflite_below_8_bit_activations_and_missing_state_are_one_line_errors(capsys, tmp_path):
    code, _, err = run_cli(
        capsys, "quantize", "--use-case", "ic", "--act-bits", "4", "--out", tmp_path / "x", "--export", "tflite"
    )
    assert_one_line_error(code, err, "TFLite export needs 8-bit activations", "W8A4")
    code, _, err = run_cli(capsys, "export", tmp_path, "--format", "onnx")
    assert_one_line_error(code, err, "state.pkl", "tinyptq quantize --out")


def test_export_needs_a_format(capsys, tmp_path):
    code, _, err = run_cli(capsys, "export", tmp_path)
    assert code == 2 and "--format" in err
