"""QDQ ONNX export: onnxruntime runs what QuantSim simulates, with exactly the chosen integers."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from tinyptq.errors import ConfigError
from tinyptq.export.qdq_onnx import export_qdq, onnx_predict, onnx_session, qdq_model, with_outputs
from tinyptq.graph.keras_graph import KerasGraph
from tinyptq.quant import Encoding
from tinyptq.sim import QuantSim

from .conftest import run_pipeline
from .test_keras_onnx import many_layers_model

LOGITS = "dense"  # the ic model's last dense layer, before its softmax


def _initializers(model):
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def assert_matches_sim(state, model, x, logits):
    """Same top-1 everywhere, logits within one step of their grid (float sums differ in order only)."""
    tensor = state.graph.to_onnx().tensors[logits]
    session = onnx_session(with_outputs(model, [tensor]))
    got = onnx_predict(session, x, output=tensor)
    sim = QuantSim(state, outputs=[logits]).run(x)[logits]
    step = float(state.act_encodings[logits].scale)
    assert np.array_equal(got.argmax(1), sim.argmax(1))
    assert np.abs(got - sim).max() <= step * 1.0001, np.abs(got - sim).max() / step
    # the model output (after softmax) as well, top-1
    out = onnx_predict(session, x)
    assert np.array_equal(out.argmax(1), QuantSim(state).predict(x).argmax(1))


def assert_integer_kernels(state, model, view_kernels=None):
    """Every kernel initializer holds state.integer_kernels(), on its grid, read by a DequantizeLinear."""
    inits = _initializers(model)
    dq = {n.output[0]: n for n in model.graph.node if n.op_type == "DequantizeLinear"}
    view = view_kernels or state.graph.to_onnx()
    for layer, q in state.integer_kernels().items():
        name = view.kernels[layer]
        node = dq[name]  # the float kernel is now the DequantizeLinear's output
        stored = inits[node.input[0]]
        enc = state.weight_encodings[layer]
        perm = view.kernel_perms[layer]
        np.testing.assert_array_equal(stored.astype(np.int32), np.transpose(q, perm))
        assert stored.min() >= enc.qmin and stored.max() <= enc.qmax
        np.testing.assert_array_equal(inits[node.input[1]], enc.scale)
        axis = {a.name: a.i for a in node.attribute}.get("axis")
        if enc.per_channel:
            assert axis == perm.index(enc.axis)


@pytest.mark.parametrize("per_channel", [False, True], ids=["per-tensor", "per-channel"])
@pytest.mark.parametrize(("wb", "ab"), [(8, 8), (4, 8), (3, 4)])
def test_qdq_matches_quantsim(ic_state, ic_setup, wb, ab, per_channel):
    state = ic_state(wb, ab, per_channel)
    model = qdq_model(state)  # runs onnx.checker (full check) itself
    onnx.checker.check_model(model, full_check=True)
    assert model.opset_import[0].version == 17 and model.ir_version == 8
    assert_matches_sim(state, model, ic_setup[2], LOGITS)
    assert_integer_kernels(state, model)
    ops = [n.op_type for n in model.graph.node]
    n_points = len(state.act_encodings)
    assert ops.count("QuantizeLinear") == n_points
    # grids narrower than uint8 are clipped before QuantizeLinear (uint8 would saturate too late)
    assert ops.count("Clip") == (n_points if ab < 8 else 0)
    weights = [t for t in model.graph.initializer if t.name.endswith("kernel__q")]
    assert {t.data_type for t in weights} == {onnx.TensorProto.INT8}


def test_int4_containers_and_file_round_trip(ic_state, ic_setup, tmp_path):
    state = ic_state(4, 4, True)
    path = export_qdq(state, tmp_path / "m.onnx", int4=True)
    model = onnx.load(path)
    assert model.opset_import[0].version == 21 and model.ir_version == 10
    weights = [t for t in model.graph.initializer if t.name.endswith("kernel__q")]
    assert {t.data_type for t in weights} == {onnx.TensorProto.INT4}
    # 4-bit activations fill a UINT4 exactly: no Clip needed
    assert "Clip" not in [n.op_type for n in model.graph.node]
    assert_matches_sim(state, model, ic_setup[2], LOGITS)
    assert_integer_kernels(state, model)
    with pytest.raises(ConfigError, match="opset 21"):
        qdq_model(state, opset=17, int4=True)


def test_fixed_weights_are_exported_not_rerounded(ic_state, ic_setup):
    state = ic_state(4, 8, True).evolve()
    layer = "conv2d_1"
    q = state.integer_kernels()[layer]
    enc = state.weight_encodings[layer]
    state.fixed_weights[layer] = np.clip(q + (q % 2 == 0), enc.qmin, enc.qmax)  # what a rounding stage might pick
    model = qdq_model(state)
    assert_integer_kernels(state, model)
    assert_matches_sim(state, model, ic_setup[2][:16], LOGITS)
    state.fixed_weights[layer] = q + 100
    with pytest.raises(ConfigError, match="leaves its 4-bit grid"):
        qdq_model(state)


def test_int32_biases(ic_state, ic_setup):
    state = ic_state(8, 8, True)
    model = qdq_model(state, int32_bias=True)
    inits = _initializers(model)
    biases = [k for k in inits if k.endswith("bias__q")]
    assert len(biases) == len(state.graph.quant_layers())
    assert all(inits[k].dtype == np.int32 for k in biases)
    session = onnx_session(model)
    x = ic_setup[2]
    # bias rounded to the accumulator grid s_in * s_w: a sub-step change, top-1 almost always kept
    agree = np.mean(onnx_predict(session, x).argmax(1) == QuantSim(state).predict(x).argmax(1))
    assert agree >= 0.95


def test_any_keras_graph_and_input_point(tmp_path):
    """The exporter relies on the OnnxView only: a model with every layer kind, per-tensor fallback included."""
    graph = KerasGraph.from_keras(many_layers_model())
    rng = np.random.default_rng(1)
    calib = rng.normal(size=(32, *graph.input_shape[1:])).astype(np.float32)
    state = run_pipeline(graph, calib, 8, 8, per_channel=True, stages=("range_setting",))
    model = qdq_model(state)
    assert_integer_kernels(state, model)
    q_in = [n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "image"]
    assert len(q_in) == 1  # the input point quantizes the graph input itself
    x = calib[:16]
    got = onnx_predict(onnx_session(model), x)
    sim = QuantSim(state).predict(x)
    out_enc = state.act_encodings[state.graph.output_names[0]]
    assert np.abs(got - sim).max() <= 2 * float(out_enc.scale)


def test_per_channel_activation_encodings_are_refused(ic_state):
    state = ic_state(8, 8, True).evolve()
    state.act_encodings["activation"] = Encoding(8, np.ones(16), np.zeros(16), False, False, axis=3)
    with pytest.raises(ConfigError, match="per-channel encoding"):
        qdq_model(state)


@pytest.mark.parametrize("signed", [True, False], ids=["int8-activations", "uint8-activations"])
def test_activation_containers_hold_the_same_grid(ic_state, ic_setup, signed):
    state = ic_state(8, 8, False)
    model = qdq_model(state, signed_activations=signed)
    inits = _initializers(model)
    q_nodes = {n.input[0].removesuffix("__float"): n for n in model.graph.node if n.op_type == "QuantizeLinear"}
    view = state.graph.to_onnx()
    for point, enc in state.act_encodings.items():
        zp = inits[q_nodes[view.tensors[point]].input[2]]
        assert zp.dtype == (np.int8 if signed or enc.signed else np.uint8)
        assert int(zp) == int(enc.zero_point) - (128 if signed and not enc.signed else 0)
    assert_matches_sim(state, model, ic_setup[2], LOGITS)


def test_onnxruntime_integer_kernels_run_the_default_export(ic_state, ic_setup):
    """onnxruntime's fused integer operators (QLinearConv, ...) on the int8 x int8 default."""
    state = ic_state(8, 8, True)
    session = onnx_session(qdq_model(state), integer_kernels=True)
    x = ic_setup[2]
    # requantization is integer arithmetic there: close to, not equal to, the simulation
    assert np.mean(onnx_predict(session, x).argmax(1) == QuantSim(state).predict(x).argmax(1)) >= 0.95
