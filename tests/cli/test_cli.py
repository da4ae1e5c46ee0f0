"""The CLI: the ic use case end to end, and one-line errors for every user error."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from tinyptq._tf import keras
from tinyptq.cli import main


def run_cli(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, *needles):
    assert code != 0
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_eval_ic_prints_fp32_accuracy(capsys, data_dir):
    code, out, _ = run_cli(capsys, "eval", "--use-case", "ic", "--data-dir", data_dir)
    assert code == 0
    assert "accuracy 88.84 %" in out and "466 samples" in out


def test_quantize_ic_w8a8_within_one_point_and_w4a8_reports(capsys, data_dir, tmp_path):
    code, out, _ = run_cli(
        capsys, "quantize", "--use-case", "ic", "--data-dir", data_dir, "--out", tmp_path / "w8a8"
    )
    assert code == 0, out
    s = json.loads((tmp_path / "w8a8" / "summary.json").read_text())
    assert s["fp32"] == pytest.approx(88.84, abs=0.01)
    assert abs(s["quantized"] - s["fp32"]) <= 1.0
    assert s["bits"] == {"weights": 8, "activations": 8}
    assert s["pipeline"]["stages"][0]["range_setting"]["weights"] == "minmax"
    assert s["stage_seconds"]["range_setting"] > 0
    # 8-bit kernels + int32 biases + float BN parameters, about a quarter of FP32
    assert s["fp32_weight_bytes"] == 78666 * 4 and s["weight_bytes"] < s["fp32_weight_bytes"] / 3
    code, out, _ = run_cli(
        capsys, "quantize", "--use-case", "ic", "--data-dir", data_dir,
        "--weight-bits", 4, "--out", tmp_path / "w4a8",
    )
    assert code == 0
    s4 = json.loads((tmp_path / "w4a8" / "summary.json").read_text())
    assert s4["bits"]["weights"] == 4 and 0 <= s4["quantized"] <= 100
    assert s4["weight_bytes"] < s["weight_bytes"]


@pytest.fixture(scope="module")
def odd_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    inp = keras.Input((16, 16, 3))
    out = keras.layers.Dense(10, activation="softmax")(keras.layers.Flatten()(keras.layers.Conv2D(2, 3)(inp)))
    keras.Model(inp, out).save(root / "small_input.keras")
    inp = keras.Input((32, 32, 3))
    x = keras.layers.Reshape((32, 96))(inp)
    out = keras.layers.GRU(10, name="gru_head")(x)
    keras.Model(inp, out).save(root / "gru.keras")
    (root / "corrupt.h5").write_bytes(b"\x89HDF\r\n\x1a\n garbage")
    return root


def test_user_errors_are_one_line(capsys, data_dir, tmp_path, odd_models):
    base = ["quantize", "--use-case", "ic", "--data-dir", data_dir, "--out", tmp_path / "o"]
    nan = tmp_path / "nan.npy"
    calib = np.random.default_rng(0).uniform(0, 255, (8, 32, 32, 3)).astype(np.float32)
    calib[3, 1, 2, 0] = np.nan
    np.save(nan, calib)
    inf = tmp_path / "inf.npy"
    calib[3, 1, 2, 0] = np.inf
    np.save(inf, calib)
    no_cifar = tmp_path / "no_cifar"
    no_cifar.mkdir()
    (no_cifar / "mlperf-tiny").symlink_to(data_dir / "mlperf-tiny")
    bad_stage = tmp_path / "bad_stage.yaml"
    bad_stage.write_text("stages: [adaround_typo]\n")
    bad_opt = tmp_path / "bad_opt.yaml"
    bad_opt.write_text("stages:\n  - range_setting: {weigths: minmax}\n")
    cases = [
        (base + ["--model", tmp_path / "missing.h5"], ["model not found", "missing.h5"]),
        (base + ["--model", odd_models / "corrupt.h5"], ["cannot load model", "corrupt.h5"]),
        (base + ["--pipeline", bad_stage], ["unknown stage 'adaround_typo'", "range_setting"]),
        (base + ["--pipeline", bad_opt], ["unknown option 'weigths'", "weights"]),
        (base + ["--weight-bits", 17], ["option '--weight-bits' must be an integer in [2, 16], got 17"]),
        (base + ["--act-bits", 1], ["option '--act-bits'", "got 1"]),
        (base + ["--model", odd_models / "small_input.keras"], ["calibration data", "(N, 16, 16, 3)"]),
        (base + ["--calib-data", nan], ["nan.npy", "NaN/Inf"]),
        (base + ["--calib-data", inf], ["inf.npy", "NaN/Inf"]),
        (base + ["--model", odd_models / "gru.keras"], ["unsupported layer 'gru_head' (GRU)"]),
        (["eval", "--use-case", "nope", "--data-dir", data_dir], ["unknown use case 'nope'", "ic"]),
        (["quantize", "--use-case", "ic", "--bogus"], ["--bogus"]),
        (["eval", "--use-case", "ic", "--data-dir", tmp_path / "empty"], ["not found", "mlperf-tiny/ic_resnet8.h5"]),
        (["eval", "--use-case", "ic", "--data-dir", no_cifar], ["CIFAR-10", "cifar-10-batches-py"]),
    ]
    for args, needles in cases:
        code, _, err = run_cli(capsys, *args)
        assert_one_line_error(code, err, *needles)


def test_console_script_has_no_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "tinyptq.cli", "quantize", "--use-case", "ic", "--weight-bits", "99", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: command-line option '--weight-bits' must be an integer in [2, 16], got 99"
    ]
