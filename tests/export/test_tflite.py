"""TFLite export (A8, W2..8): the file holds our encodings and runs like the simulation."""

from __future__ import annotations

import numpy as np
import pytest

from tinyptq.errors import ConfigError
from tinyptq.export.tflite import export_tflite, tflite_bytes, tflite_predict
from tinyptq.export.tflite_check import check_tflite, read_tensor_params
from tinyptq.graph.loading import load_graph
from tinyptq.sim import QuantSim

from .conftest import run_pipeline

MSE = ("bn_folding", {"range_setting": {"weights": "mse"}})


@pytest.fixture(scope="module")
def ic_tflite(ic_state, tmp_path_factory):
    """ic W8A8 per channel with MSE weight ranges, which clip: some kernels use -128, which
    the converter alone would not keep."""
    state = ic_state(8, 8, True, MSE)
    return state, export_tflite(state, tmp_path_factory.mktemp("tflite") / "model.tflite")


@pytest.mark.parametrize("per_channel", [True, False], ids=["per-channel", "per-tensor"])
def test_ic_w8a8_tflite_holds_our_encodings_and_matches_sim(ic_state, ic_setup, ic_tflite, per_channel, tmp_path):
    if per_channel:
        state, path = ic_tflite
    else:
        state = ic_state(8, 8, False)
        path = export_tflite(state, tmp_path / "model.tflite")
    check = check_tflite(state, path)
    assert check.ok, check.problems
    assert set(check.activations) == set(state.act_encodings)
    assert set(check.kernels) == set(state.integer_kernels())
    params = {p.name: p for p in read_tensor_params(path)}
    for point, name in check.activations.items():
        enc = state.act_encodings[point]
        assert params[name].dtype == "int8"
        assert params[name].scales[0] == np.float32(enc.scale)  # exactly: integer kernels requantize with it
        assert params[name].zero_points[0] == int(enc.zero_point) - 128  # uint8 grid as int8
    x = ic_setup[2]
    sim, got = QuantSim(state).predict(x), tflite_predict(path, x)
    # integer requantization and int32 biases round differently from the float simulation
    assert np.mean(sim.argmax(1) == got.argmax(1)) >= 0.95
    assert np.abs(sim - got).mean() < 0.01


@pytest.mark.parametrize("name", ["kws_dscnn_savedmodel", "ad_autoencoder.h5"])
def test_depthwise_and_dense_only_models(mlperf_dir, name):
    """Per-channel depthwise kernels (the converter picks its own grid: pinned back) and a
    per-channel dense-only model (run as 1x1 convolutions)."""
    graph = load_graph(mlperf_dir / name)
    rng = np.random.default_rng(0)
    calib = rng.uniform(0, 1, size=(32, *graph.input_shape[1:])).astype(np.float32)
    state = run_pipeline(graph, calib, 8, 8, True, MSE)
    data = tflite_bytes(state)
    check = check_tflite(state, data)
    assert check.ok, check.problems
    assert set(check.kernels) == set(state.integer_kernels())
    x = calib[:16]
    sim, got = QuantSim(state).predict(x), tflite_predict(data, x)
    step = float(state.act_encodings[state.graph.output_names[0]].scale)
    assert np.abs(sim - got).max() <= 3 * step


def test_check_reports_a_changed_encoding(ic_tflite):
    state, data = ic_tflite
    other = state.evolve()
    enc = other.act_encodings["activation"]
    other.act_encodings["activation"] = type(enc)(8, enc.scale * 2, enc.zero_point, enc.signed, enc.symmetric)
    problems = check_tflite(other, data).problems
    assert len(problems) == 1 and "activation 'activation'" in problems[0]


@pytest.mark.parametrize(
    ("wb", "ab", "stages", "message"),
    [
        (16, 8, ("bn_folding", "range_setting"), "2- to 8-bit weights"),
        (8, 6, ("bn_folding", "range_setting"), "8-bit activations"),
        (8, 8, ("range_setting",), "folded batch norms"),
    ],
)
def test_unsupported_states_raise_one_line_config_errors(ic_state, wb, ab, stages, message):
    with pytest.raises(ConfigError, match=message) as info:
        tflite_bytes(ic_state(wb, ab, True, stages))
    assert "\n" not in str(info.value)
