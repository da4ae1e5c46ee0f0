"""Deployed .tflite files in the device runtimes: TFLite Micro and tf.lite (reference kernels)."""

from __future__ import annotations

import numpy as np
import pytest

from tinyptq import runtimes
from tinyptq.cli import main
from tinyptq.errors import ConfigError, ModelError


def _int8(scale: float, zp: int) -> dict:
    return {"dtype": np.int8, "quantization_parameters": {"scales": [scale], "zero_points": [zp]}}


def test_integer_inputs_round_halves_away_from_zero_like_tflite_quantize():
    details = _int8(0.5, 3)
    x = np.array([0.25, -0.25, 0.75, -0.75, 100.0, -100.0], np.float32)  # ties: 0.5, -0.5, 1.5, -1.5
    assert runtimes.quantize_input(x, details).tolist() == [4, 2, 5, 1, 127, -128]
    q = np.array([3, 4, -128], np.int8)
    assert runtimes.dequantize_output(q, details).tolist() == [0.0, 0.5, -65.5]


def test_float_inputs_pass_unchanged():
    details = {"dtype": np.float32, "quantization_parameters": {"scales": [], "zero_points": []}}
    x = np.array([[0.1, -2.5]], np.float64)
    assert runtimes.quantize_input(x, details).dtype == np.float32


@pytest.fixture(scope="module")
def ic_data(data_dir):
    from tinyptq.models.usecases import get_use_case

    return get_use_case("ic", data_dir).eval_set()


def test_mlperf_ic_reference_in_tflm(mlperf_dir, ic_data):
    """The int8 reference (int8 input and output) on the 466 test images, one invoke per image."""
    raw, details = runtimes.run_raw(mlperf_dir / "ic_resnet8_int8_reference.tflite", ic_data.x, "tflm")
    assert raw.dtype == np.int8 and raw.shape == (len(ic_data.x), 10)
    scores = runtimes.dequantize_output(raw, details)
    assert np.mean(scores.argmax(1) == ic_data.y) > 0.85


def test_tflm_and_tflite_reference_kernels_agree_on_an_export(data_dir, ic_data):
    from tests.export.conftest import run_pipeline
    from tinyptq.export.tflite import tflite_bytes
    from tinyptq.models.usecases import get_use_case

    uc = get_use_case("ic", data_dir)
    data = tflite_bytes(run_pipeline(uc.load_graph(), uc.calibration_data(32, 0)))
    x = ic_data.x[:24]
    micro, _ = runtimes.run_raw(data, x, "tflm")
    ref, _ = runtimes.run_raw(data, x, "tflite-ref")
    np.testing.assert_array_equal(micro, ref)


def test_bad_files_and_shapes_are_model_errors(tmp_path, mlperf_dir):
    with pytest.raises(ModelError, match="does not exist"):
        runtimes.run(tmp_path / "missing.tflite", np.zeros((1, 2), np.float32))
    junk = tmp_path / "junk.tflite"
    junk.write_bytes(b"not a flatbuffer at all")
    with pytest.raises(ModelError, match="not a .tflite"):
        runtimes.run(junk, np.zeros((1, 2), np.float32))
    cut = tmp_path / "cut.tflite"
    cut.write_bytes((mlperf_dir / "ic_resnet8_int8_reference.tflite").read_bytes()[:4000])
    with pytest.raises(ModelError, match="cannot load"):
        runtimes.run(cut, np.zeros((1, 32, 32, 3), np.float32))
    with pytest.raises(ModelError, match=r"inputs of shape \(32, 32, 3\)"):
        runtimes.run(mlperf_dir / "ic_resnet8_int8_reference.tflite", np.zeros((1, 8, 8, 3), np.float32))
    with pytest.raises(ConfigError, match="unknown runtime 'npu'"):
        runtimes.run(mlperf_dir / "ic_resnet8_int8_reference.tflite", np.zeros((1, 32, 32, 3)), "npu")


def test_eval_cli_runs_a_tflite_in_tflm(mlperf_dir, data_dir, capsys):
    model = mlperf_dir / "ic_resnet8_int8_reference.tflite"
    code = main(["eval", "--use-case", "ic", "--runtime", "tflm", "--model", str(model), "--data-dir", str(data_dir)])
    assert code == 0
    out = capsys.readouterr().out.strip().splitlines()[-1]
    assert out.startswith("ic (ic_resnet8_int8_reference.tflite in tflm): accuracy ")


@pytest.mark.parametrize(
    "args, message",
    [
        (["--runtime", "tflm"], "--runtime needs --model"),
        (["--runtime", "tflm", "--model", "{tmp}/none.tflite"], "does not exist"),
        (["--runtime", "npu", "--model", "{tmp}/none.tflite"], "'npu' is not one of"),
    ],
)
def test_eval_cli_bad_requests_are_one_line_errors(args, message, tmp_path, data_dir, capsys):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    code = main(["eval", "--use-case", "ic", "--data-dir", str(data_dir), *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err
