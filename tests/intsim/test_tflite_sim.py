"""The tflite target: the simulation predicts the exported .tflite in TFLite Micro bit for bit."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from tests.export.conftest import run_pipeline
from tinyptq import runtimes
from tinyptq.config import QuantConfig
from tinyptq.errors import ConfigError
from tinyptq.export.tflite import tflite_bytes
from tinyptq.export.tflite_check import read_tensor_params
from tinyptq.graph.loading import load_graph
from tinyptq.intsim.tflite_sim import TfliteSim
from tinyptq.pipeline import PTQState
from tinyptq.sim import target_predictor

USE_CASES = ["ic", "kws", "kws-mlperf", "vww", "ad"]


def _setup(name: str, data_dir, samples: int = 16):
    from tinyptq.models.usecases import get_use_case

    uc = get_use_case(name, data_dir)
    graph = uc.load_graph()
    return graph, uc.calibration_data(32, 0), uc.eval_set().x[:samples]


def _stages(graph, ranges: str = "mse") -> tuple:
    setting = {"range_setting": {"weights": ranges, "activations": ranges}}
    return ("bn_folding", setting) if graph.batch_norm_names() else (setting,)


@pytest.mark.parametrize("name", USE_CASES)
@pytest.mark.parametrize("per_channel", [True, False], ids=["per-channel", "per-tensor"])
def test_w8a8_export_in_tflm_equals_the_tflite_target(name, per_channel, data_dir):
    graph, calib, x = _setup(name, data_dir)
    state = run_pipeline(graph, calib, 8, 8, per_channel, _stages(graph))
    model = tflite_bytes(state)
    micro = runtimes.run(model, x, "tflm")
    sim = TfliteSim(state).predict(x)
    assert micro.shape == sim.shape
    assert int(np.sum(micro != sim)) == 0  # every output value, not just the top-1
    # the file holds our scales exactly (the converter's own can be a float32 step off)
    ours = np.array([np.float32(e.scale) for e in state.act_encodings.values()])
    for p in read_tensor_params(model):
        if p.dtype == "int8" and p.scales.size == 1:
            near = ours[np.abs(ours - p.scales[0]) <= 1e-6 * ours]
            assert near.size == 0 or p.scales[0] in near, (p.name, p.scales[0], near)


def test_int4_export_in_tflm_equals_the_tflite_target_and_is_smaller(data_dir):
    graph, calib, x = _setup("ic", data_dir)
    stages = ("bn_folding", "cle", {"range_setting": {"weights": "mse", "activations": "mse"}}, "bias_correction")
    w4 = run_pipeline(graph, calib, 4, 8, True, stages)
    w8 = run_pipeline(graph, calib, 8, 8, True, stages)
    packed, int8_file = tflite_bytes(w4), tflite_bytes(w8)
    np.testing.assert_array_equal(runtimes.run(packed, x, "tflm"), TfliteSim(w4).predict(x))
    assert len(packed) <= 0.6 * len(int8_file)


def _pairs(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> dict[str, str]:
    """Names of ``a`` -> names of ``b`` whose arrays hold the same values (in any layout)."""
    out = {}
    for name, value in a.items():
        key = np.sort(value.reshape(-1))
        hits = [n for n, v in b.items() if v.size == key.size and np.allclose(np.sort(v.reshape(-1)), key, atol=1e-4)]
        assert len(hits) == 1, (name, hits)
        out[name] = hits[0]
    return out


def _twins(keras_graph, onnx_graph, x) -> tuple[dict[str, str], dict[str, str]]:
    """Keras -> ONNX names of the same model: layers paired by kernels, points by float values."""
    kg, og = keras_graph, onnx_graph
    layers = _pairs(
        {q.name: kg.kernel_layout(q.name).to_canonical(kg.kernel(q.name)) for q in kg.quant_layers()},
        {q.name: og.kernel_layout(q.name).to_canonical(og.kernel(q.name)) for q in og.quant_layers()},
    )
    k_points, o_points = [p.name for p in kg.act_points()], [p.name for p in og.act_points()]
    points = _pairs(kg.run(x, k_points), og.run(x, o_points))
    assert len(points) == len(o_points)
    return layers, points


def _transfer(keras_state, onnx_graph, layers: dict[str, str], points: dict[str, str]) -> PTQState:
    """The Keras state's kernels, biases and encodings on (a BN-folded copy of) the ONNX graph."""
    kg = keras_state.graph
    state = PTQState(onnx_graph, keras_state.config, keras_state.calib)
    for k_name, o_name in layers.items():
        canonical = kg.kernel_layout(k_name).to_canonical(kg.kernel(k_name))
        shape = onnx_graph.kernel(o_name).shape
        onnx_graph.set_kernel(o_name, onnx_graph.kernel_layout(o_name).from_canonical(canonical, shape))
        onnx_graph.set_bias(o_name, kg.bias(k_name))
        enc = keras_state.weight_encodings[k_name]
        axis = onnx_graph.quant_layer(o_name).channel_axis if enc.per_channel else None
        state.weight_encodings[o_name] = dataclasses.replace(enc, axis=axis)
    for k_name, o_name in points.items():
        state.act_encodings[o_name] = keras_state.act_encodings[k_name]
    return state


def test_keras_and_its_tf2onnx_conversion_compute_the_same_integers(mlperf_dir, data_dir, tmp_path):
    """Integer accumulation leaves no room for summation order: same state, same outputs."""
    import onnx
    import tf2onnx

    from tinyptq._tf import keras, tf

    graph, calib, x = _setup("ic", data_dir, 64)
    model = keras.models.load_model(mlperf_dir / "ic_resnet8.h5", compile=False)
    spec = (tf.TensorSpec((None, *model.input_shape[1:]), tf.float32, name="input"),)
    proto, _ = tf2onnx.convert.from_keras(model, input_signature=spec, opset=17)
    onnx.save(proto, tmp_path / "resnet8.onnx")
    onnx_graph = load_graph(tmp_path / "resnet8.onnx")
    assert not onnx_graph.batch_norm_names()  # tf2onnx folds them itself
    folded = run_pipeline(graph, calib, 8, 8, True, ("bn_folding",)).graph
    layers, points = _twins(folded, onnx_graph, x[:4])
    for bits in (8, 4):
        state = run_pipeline(graph, calib, bits, 8, True, ("bn_folding", "cle", "range_setting"))
        twin = _transfer(state, onnx_graph.copy(), layers, points)
        a, b = TfliteSim(state).predict(x), TfliteSim(twin).predict(x)
        assert int(np.sum(a != b)) == 0, bits


def test_the_target_is_a_quant_option_and_drives_evaluation(data_dir):
    graph, calib, x = _setup("kws", data_dir)
    state = run_pipeline(graph, calib, 8, 8, True, _stages(graph), target="tflite")
    assert state.config.to_dict()["target"] == "tflite"
    assert "target" not in QuantConfig().to_dict()  # the default keeps earlier run ids
    np.testing.assert_array_equal(target_predictor(state)(x), TfliteSim(state).predict(x))
    from tinyptq.intsim.ort_sim import OrtSim

    ort_state = state.evolve(config=state.config.replace(target="onnxruntime"))
    np.testing.assert_array_equal(target_predictor(ort_state)(x), OrtSim(ort_state).predict(x))
    with pytest.raises(ConfigError, match="target.*one of"):
        QuantConfig(target="npu")


def test_what_tflite_cannot_hold_is_a_one_line_config_error(data_dir):
    graph, calib, _ = _setup("ic", data_dir)
    a4 = run_pipeline(graph, calib, 8, 4, True, _stages(graph, "minmax"))
    with pytest.raises(ConfigError, match="8-bit activations: '.*' has 4 bits"):
        TfliteSim(a4)
    unfolded = run_pipeline(graph, calib, 8, 8, True, ({"range_setting": {}},))
    with pytest.raises(ConfigError, match="folded batch norms"):
        TfliteSim(unfolded)


def test_grids_toggle_the_target_and_skip_what_tflite_cannot_hold():
    from tinyptq.ablate.grid import Grid

    data = {
        "name": "targets",
        "use_cases": ["kws"],
        "bits": ["W8A8", "W4A4"],
        "pipeline": {"stages": ["bn_folding", "range_setting"]},
        "toggles": {"quant.target": ["qdq", "tflite"]},
    }
    grid = Grid.from_dict(data)
    runs = {(r.bits.act_bits, r.toggles["quant.target"]): r for r in grid.expand()}
    assert len(runs) == 4
    assert runs[(4, "tflite")].skip_reason is not None and "8-bit activations" in runs[(4, "tflite")].skip_reason
    assert all(r.skip_reason is None for key, r in runs.items() if key != (4, "tflite"))
    with pytest.raises(ConfigError, match="'quant.target' must be one of"):
        Grid.from_dict({**data, "toggles": {"quant.target": ["qdq", "npu"]}})
