"""The ONNX adapter: faithful float graph, quantizer placement, stages, bit-exact simulation."""

from __future__ import annotations

import pickle

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from tinyptq import api
from tinyptq.components.bias_correction import analytical_input_mean
from tinyptq.components.cle import cle_pairs
from tinyptq.config import QuantConfig
from tinyptq.errors import ModelError
from tinyptq.graph.loading import load_graph
from tinyptq.graph.onnx_graph import OnnxGraph
from tinyptq.pipeline import PTQState, create_stage
from tinyptq.sim import QuantSim

from ..cli.test_cli import assert_one_line_error, run_cli


# ------------------------------------------------------------------ models
def make_model(nodes, inits, inp, outputs, opset=17):
    """An ONNX model onnxruntime loads (IR version set explicitly: make_model writes 14)."""
    tensors = [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()]
    outs = [helper.make_tensor_value_info(o, TensorProto.FLOAT, shape) for o, shape in outputs]
    graph = helper.make_graph(nodes, "tiny", [inp], outs, tensors)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _bn_params(rng, name, c):
    return {
        f"{name}_g": rng.uniform(0.5, 2.0, c).astype(np.float32),
        f"{name}_b": rng.normal(0, 0.5, c).astype(np.float32),
        f"{name}_m": rng.normal(0, 0.5, c).astype(np.float32),
        f"{name}_v": rng.uniform(0.5, 2.0, c).astype(np.float32),
    }


def tiny_onnx(seed: int = 0) -> onnx.ModelProto:
    """NCHW: pad, conv-BN-ReLU, residual Add+ReLU, depthwise (x2), grouped conv + ReLU6,
    max / average pooling, Concat, global pooling, Identity, Flatten, Gemm + ReLU, MatMul + Add, Softmax."""
    rng = np.random.default_rng(seed)
    w = lambda *s: rng.normal(0, 0.4, s).astype(np.float32)  # noqa: E731
    inits = {
        "W1": w(4, 3, 3, 3), "B1": w(4), "W2": w(4, 4, 3, 3), "Wdw": w(8, 1, 3, 3), "Bdw": w(8),
        "Wgc": w(6, 4, 1, 1), "Bgc": w(6), "zero": np.float32(0), "six": np.float32(6),
        "Wfc1": w(8, 12), "Bfc1": w(8), "Wfc2": w(8, 5), "Bfc2": w(5),
        **_bn_params(rng, "bn1", 4), **_bn_params(rng, "bn2", 4),
    }
    pads = helper.make_tensor("pads_value", TensorProto.INT64, [8], [0, 0, 1, 1, 0, 0, 1, 1])
    n = helper.make_node
    nodes = [
        n("Constant", [], ["pads"], name="pads_const", value=pads),
        n("Pad", ["x", "pads"], ["x_pad"], name="pad"),
        n("Conv", ["x_pad", "W1", "B1"], ["c1_out"], name="c1"),
        n("BatchNormalization", ["c1_out", "bn1_g", "bn1_b", "bn1_m", "bn1_v"], ["bn1_out"], name="bn1", epsilon=1e-3),
        n("Relu", ["bn1_out"], ["r1_out"], name="r1"),
        n("Conv", ["r1_out", "W2"], ["c2_out"], name="c2", pads=[1, 1, 1, 1]),
        n("BatchNormalization", ["c2_out", "bn2_g", "bn2_b", "bn2_m", "bn2_v"], ["bn2_out"], name="bn2"),
        n("Add", ["r1_out", "bn2_out"], ["add_out"], name="add"),
        n("Relu", ["add_out"], ["r2_out"], name="r2"),
        n("Conv", ["r2_out", "Wdw", "Bdw"], ["dw_out"], name="dw", group=4, pads=[1, 1, 1, 1]),
        n("Relu", ["dw_out"], ["r3_out"], name="r3"),
        n("Conv", ["r3_out", "Wgc", "Bgc"], ["gc_out"], name="gc", group=2),
        n("Clip", ["gc_out", "zero", "six"], ["r6_out"], name="r6"),
        n("MaxPool", ["r6_out"], ["mp_out"], name="mp", kernel_shape=[2, 2], strides=[2, 2]),
        n("AveragePool", ["r6_out"], ["ap_out"], name="ap", kernel_shape=[2, 2], strides=[2, 2]),
        n("Concat", ["mp_out", "ap_out"], ["cat_out"], name="cat", axis=1),
        n("GlobalAveragePool", ["cat_out"], ["gap_out"], name="gap"),
        n("Identity", ["gap_out"], ["idn_out"], name="idn"),
        n("Flatten", ["idn_out"], ["fl_out"], name="fl"),
        n("Gemm", ["fl_out", "Wfc1", "Bfc1"], ["fc1_out"], name="fc1", transB=1),
        n("Relu", ["fc1_out"], ["r4_out"], name="r4"),
        n("MatMul", ["r4_out", "Wfc2"], ["fc2_mm"], name="fc2"),
        n("Add", ["fc2_mm", "Bfc2"], ["logits"], name="fc2_bias"),
        n("Softmax", ["logits"], ["probs"], name="sm", axis=-1),
    ]
    inp = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])
    return make_model(nodes, inits, inp, [("probs", ["N", 5])])


def images(n: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 3, 8, 8)).astype(np.float32)


def ort_run(model: onnx.ModelProto, x: np.ndarray, extra: tuple[str, ...] = ()) -> list[np.ndarray]:
    """The original model in plain onnxruntime, with intermediate tensors as extra outputs."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    model.graph.output.extend(helper.make_tensor_value_info(t, TensorProto.FLOAT, None) for t in extra)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run([o.name for o in model.graph.output], {model.graph.input[0].name: x})


def state_of(graph, cfg=None, n=64) -> PTQState:
    return PTQState(graph, cfg or QuantConfig(weight_bits=8, act_bits=8, weight_per_channel=True), images(n, 1))


# ------------------------------------------------------------ float graph
def test_float_graph_and_intermediate_tensors_match_onnxruntime():
    model = tiny_onnx()
    graph = OnnxGraph.from_onnx(model)
    x = images(10)
    probs, r1, cat = ort_run(model, x, ("r1_out", "cat_out"))
    np.testing.assert_allclose(graph.predict(x, batch_size=4), probs, atol=1e-6)
    out = graph.run(x, ["r1", "cat", "x"], batch_size=3)
    np.testing.assert_allclose(out["r1"], r1, atol=1e-5)
    np.testing.assert_allclose(out["cat"], cat, atol=1e-5)
    np.testing.assert_array_equal(out["x"], x)  # the input point is served from the data
    assert graph.input_shape == (None, 3, 8, 8) and graph.output_names == ["sm"]


def test_quant_layers_act_points_and_neutral_queries():
    graph = OnnxGraph.from_onnx(tiny_onnx())
    layers = {q.name: q for q in graph.quant_layers()}
    assert list(layers) == ["c1", "c2", "dw", "gc", "fc1", "fc2"]
    c1 = layers["c1"]
    assert (c1.kind, c1.channel_axis, c1.bn, c1.activation) == ("conv", 0, "bn1", "relu")
    assert c1.input_point == "x" and c1.output_point == "r1"  # the zero Pad keeps the input grid
    assert layers["c2"].bn == "bn2" and layers["c2"].activation is None and layers["c2"].output_point == "bn2"
    assert layers["dw"].kind == "depthwise" and layers["dw"].output_point == "r3"
    assert layers["gc"].kind == "conv" and layers["gc"].activation == "relu6"
    assert (layers["fc1"].kind, layers["fc1"].channel_axis, layers["fc1"].input_point) == ("dense", 0, "gap")
    assert (layers["fc2"].channel_axis, layers["fc2"].input_point, layers["fc2"].output_point) == (1, "r4", "fc2")
    points = {p.name: p for p in graph.act_points()}
    assert list(points) == ["x", "r1", "bn2", "r2", "r3", "r6", "ap", "cat", "gap", "r4", "fc2", "sm"]
    assert points["x"].is_input and points["sm"].is_output and points["r6"].owner == "gc"
    # neutral operation types, inputs and readers
    ops = {n: graph.op_type(n) for n in ("x", "pad", "bn1", "r6", "mp", "ap", "gap", "fl", "cat", "sm", "dw")}
    assert ops == {
        "x": "input", "pad": "pad", "bn1": "batch_norm", "r6": "relu6", "mp": "max_pool", "ap": "avg_pool",
        "gap": "global_avg_pool", "fl": "flatten", "cat": "concat", "sm": "softmax", "dw": "depthwise",
    }
    assert graph.inputs_of("add") == ["r1", "bn2"] and graph.inputs_of("fl") == ["gap"]  # Identity dropped
    assert sorted(graph.consumers("r1")) == ["add", "c2"] and graph.batch_norm_names() == ["bn1", "bn2"]
    assert graph.tensor_channel_axis("bn1") == 1 and graph.tensor_channel_axis("fc2") == -1
    # MACs: output positions x kernel size
    macs = graph.layer_macs()
    assert macs["c1"] == 64 * 4 * 3 * 9 and macs["dw"] == 64 * 8 * 9 and macs["fc2"] == 40
    assert graph.param_count() == sum(v.size for k, v in _inits(tiny_onnx()).items() if k not in ("zero", "six"))


def _inits(model):
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def test_kernel_layouts_round_trip_and_group_semantics():
    graph = OnnxGraph.from_onnx(tiny_onnx())
    for q in graph.quant_layers():
        layout, k = graph.kernel_layout(q.name), graph.kernel(q.name)
        canonical = layout.to_canonical(k)
        np.testing.assert_array_equal(layout.from_canonical(canonical, k.shape), k)
        assert canonical.shape[0] == k.shape[q.channel_axis]
    assert graph.kernel_layout("dw").groups == 4 and graph.kernel_layout("gc").groups == 2
    assert graph.kernel_layout("fc2").to_canonical(graph.kernel("fc2")).shape == (5, 8)


def test_set_bias_copy_fingerprint_and_to_onnx():
    graph = OnnxGraph.from_onnx(tiny_onnx())
    clone = graph.copy()
    clone.set_bias("c2", np.ones(4, np.float32))
    assert graph.bias("c2") is None and np.all(clone.bias("c2") == 1)
    x = images(4)
    assert not np.allclose(clone.predict(x), graph.predict(x))
    assert clone.fingerprint() != graph.fingerprint() and graph.copy().fingerprint() == graph.fingerprint()
    restored = pickle.loads(pickle.dumps(graph))  # after a run: the session cache is not pickled
    assert restored.fingerprint() == graph.fingerprint()
    np.testing.assert_array_equal(restored.predict(x), graph.predict(x))
    view = graph.to_onnx()
    names = {t.name for t in view.model.graph.initializer}
    produced = {o for n in view.model.graph.node for o in n.output} | {"x"}
    assert set(view.tensors) == {p.name for p in graph.act_points()} and set(view.tensors.values()) <= produced
    assert view.tensors["fc2"] == "logits" and view.kernels["fc2"] == "Wfc2"
    assert set(view.kernels.values()) <= names and set(view.biases.values()) <= names and "c2" not in view.biases
    assert view.kernel_perms["c1"] == (0, 1, 2, 3)
    np.testing.assert_allclose(ort_run(view.model, x)[0], graph.predict(x), atol=1e-6)


# ------------------------------------------------------------------ stages
def test_bn_folding_and_cle_keep_the_float_function():
    graph = OnnxGraph.from_onnx(tiny_onnx())
    x = images(16, 3)
    ref = graph.run(x, ["fc2", "r3"])
    state = create_stage("bn_folding").apply(state_of(graph))
    assert state.graph.batch_norm_names() == [] and set(state.bn_stats) == {"c1", "c2"}
    assert state.graph.bias("c2") is not None and graph.batch_norm_names() == ["bn1", "bn2"]
    folded = state.graph.run(x, ["fc2", "r3"])
    np.testing.assert_allclose(folded["fc2"], ref["fc2"], atol=1e-4)
    assert {q.name: q.output_point for q in state.graph.quant_layers()}["c2"] == "c2"
    pairs = [(p.first.name, p.second.name) for p in cle_pairs(state.graph)]
    assert pairs == [("dw", "gc"), ("fc1", "fc2")]
    out = create_stage("cle").apply(state)
    assert "equalized 2 pairs" in out.log[-1].lines[0]
    assert not np.allclose(out.graph.kernel("gc"), state.graph.kernel("gc"))  # grouped conv rescaled
    after = out.graph.run(x, ["fc2", "r3"])
    np.testing.assert_allclose(after["fc2"], ref["fc2"], atol=1e-4)
    # the depthwise output channels were rescaled, so r3 changed while the function did not
    assert not np.allclose(after["r3"], ref["r3"], atol=1e-3)


def test_bias_correction_on_onnx_graph():
    graph = OnnxGraph.from_onnx(tiny_onnx())
    state = create_stage("range_setting").apply(state_of(graph, QuantConfig(weight_bits=4)))
    rec = create_stage("bias_correction", {"method": "analytical"}).apply(state).log[-1]
    assert list(rec.details["corrections"]) == ["c2"]  # reads ReLU(bn1(c1)) through the BN
    assert rec.details["skipped"]["c1"] == "reads the model input (no BN statistics)"
    assert rec.details["skipped"]["dw"] == "input from add 'add' (no BN statistics)"
    out = create_stage("bias_correction").apply(state)
    assert set(out.log[-1].details["corrections"]) == {"c1", "c2", "dw", "gc", "fc1", "fc2"}
    err_before = np.abs(QuantSim(state).predict(state.calib) - graph.predict(state.calib)).mean()
    err_after = np.abs(QuantSim(out).predict(state.calib) - graph.predict(state.calib)).mean()
    assert err_after < err_before


def test_analytical_input_mean_follows_channels_first_flatten():
    """conv -> BN -> ReLU -> Flatten -> Gemm in NCHW: each channel's mean covers H*W flattened inputs."""
    rng = np.random.default_rng(0)
    w, b = rng.normal(size=(4, 2, 1, 1)).astype(np.float32), rng.normal(size=4).astype(np.float32)
    beta = np.array([-1.0, 0.0, 1.0, 2.0], np.float32)
    inits = {
        "W": w, "B": b, "g": np.ones(4, np.float32), "beta": beta, "m": b,
        "v": (w.reshape(4, 2) ** 2).sum(1).astype(np.float32),  # x ~ N(0, 1): exact conv output statistics
        "Wfc": rng.normal(size=(3, 36)).astype(np.float32),
    }
    nodes = [
        helper.make_node("Conv", ["x", "W", "B"], ["c"], name="conv"),
        helper.make_node("BatchNormalization", ["c", "g", "beta", "m", "v"], ["bn"], name="bn", epsilon=0.0),
        helper.make_node("Relu", ["bn"], ["r"], name="relu"),
        helper.make_node("Flatten", ["r"], ["f"], name="flat"),
        helper.make_node("Gemm", ["f", "Wfc"], ["y"], name="fc", transB=1),
    ]
    model = make_model(nodes, inits, helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 3, 3]), [("y", ["N", 3])])
    graph = OnnxGraph.from_onnx(model)
    x = rng.normal(size=(4000, 2, 3, 3)).astype(np.float32)
    state = PTQState(graph, QuantConfig(), x)
    mean, reason = analytical_input_mean(graph, state, graph.quant_layer("fc"))
    assert reason == "" and mean.shape == (36,)
    np.testing.assert_allclose(mean, graph.run(x, ["flat"])["flat"].mean(axis=0), atol=0.05)


# ------------------------------------------------------------- simulation
@pytest.mark.parametrize(
    "cfg",
    [
        QuantConfig(weight_bits=8, act_bits=8, weight_per_channel=True),
        QuantConfig(weight_bits=4, act_bits=4, act_symmetric=True),  # grid narrower than int8: Clip first
        QuantConfig(weight_bits=8, act_bits=12),  # wider than int8: the float formula
    ],
    ids=["w8a8", "w4a4-sym", "a12"],
)
def test_sim_quantizes_every_point_bit_exactly(cfg):
    graph = OnnxGraph.from_onnx(tiny_onnx())
    state = create_stage("range_setting").apply(state_of(graph, cfg))
    x = images(16, 5) * 2
    points = [p.name for p in graph.act_points()]
    sim = QuantSim(state, outputs=points)
    quantized = sim.run(x, batch_size=5)
    for point, enc in state.act_encodings.items():
        raw = sim.run(x, outputs=[point], raw=[point])[point]
        np.testing.assert_array_equal(quantized[point], enc.fake_quant(raw), err_msg=point)
    # and what feeds the first quantizer is the float layer on quantized inputs and kernels
    float_q = graph.copy()
    float_q.set_kernel("c1", state.quantized_kernels()["c1"])
    ref = float_q.run(state.act_encodings["x"].fake_quant(x), ["r1"])["r1"]
    raw = sim.run(x, outputs=["r1"], raw=["r1"])["r1"]
    np.testing.assert_allclose(raw, ref, atol=1e-5)
    # the onnxruntime QDQ reference computes the same points (float summation order aside)
    ort = graph.ort_sim(state.quantized_kernels(), state.act_encodings, outputs=points)
    assert any(n.op_type == "QuantizeLinear" for n in ort.model.graph.node) == (cfg.act_bits <= 8)
    reference = ort.run(x, batch_size=5)
    for point in points:
        step = float(np.max(state.act_encodings[point].scale))
        assert np.mean(reference[point] != quantized[point]) < 0.01, point
        np.testing.assert_allclose(reference[point], quantized[point], atol=2 * step + 1e-5, err_msg=point)


# ------------------------------------------------------------ edge cases
def test_batch_one_export_runs_in_batches():
    """A model exported with batch 1 and Reshape(1, -1) runs on any batch size."""
    rng = np.random.default_rng(0)
    inits = {"W": rng.normal(size=(4, 3, 3, 3)).astype(np.float32), "shape": np.array([1, -1], np.int64),
             "Wfc": rng.normal(size=(16, 2)).astype(np.float32)}
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["c"], name="conv"),
        helper.make_node("Transpose", ["c"], ["t"], name="tr", perm=[0, 2, 3, 1]),
        helper.make_node("Reshape", ["t", "shape"], ["f"], name="reshape"),
        helper.make_node("Gemm", ["f", "Wfc"], ["y"], name="fc"),
    ]
    model = make_model(nodes, inits, helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4]), [("y", [1, 2])])
    graph = OnnxGraph.from_onnx(model)
    x = rng.normal(size=(5, 3, 4, 4)).astype(np.float32)
    ref = np.concatenate([ort_run(model, x[i : i + 1])[0] for i in range(5)])
    np.testing.assert_allclose(graph.predict(x), ref, atol=1e-5)
    assert graph.input_shape == (None, 3, 4, 4) and graph.quant_layer("fc").channel_axis == 1
    assert graph.quant_layer("fc").input_point == "conv" and graph.op_type("tr") == "transpose"


def _erf_model():
    nodes = [helper.make_node("Erf", ["x"], ["y"], name="my_erf")]
    return make_model(nodes, {}, helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4]), [("y", ["N", 4])])


def test_unsupported_nodes_are_named_in_one_line():
    with pytest.raises(ModelError, match=r"'my_erf' \(Erf\)") as err:
        OnnxGraph.from_onnx(_erf_model())
    assert "\n" not in str(err.value)
    nodes = [helper.make_node("MatMul", ["x", "x"], ["y"], name="attn")]
    model = make_model(nodes, {}, helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 4]), [("y", ["N", 4, 4])])
    with pytest.raises(ModelError, match="'attn' \\(MatMul\\).*two activations"):
        OnnxGraph.from_onnx(model)


def test_missing_corrupt_and_invalid_onnx_files(tmp_path):
    with pytest.raises(ModelError, match="not found"):
        load_graph(tmp_path / "nope.onnx")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07garbage that is not a protobuf \xff\xfe")
    with pytest.raises(ModelError, match="bad.onnx") as err:
        load_graph(bad)
    assert "\n" not in str(err.value)
    invalid = _erf_model()
    invalid.graph.node[0].input[0] = "undefined"
    onnx.save(invalid, tmp_path / "invalid.onnx")
    with pytest.raises(ModelError, match="invalid ONNX model .*invalid.onnx"):
        load_graph(tmp_path / "invalid.onnx")
    onnx.save(_erf_model(), tmp_path / "erf.onnx")
    with pytest.raises(ModelError, match="my_erf"):
        load_graph(tmp_path / "erf.onnx")


def test_cli_reports_a_corrupt_onnx_model_in_one_line(capsys, tmp_path):
    bad = tmp_path / "resnet8.onnx"
    bad.write_bytes(b"\x00\x01\x02 not onnx")
    code, _, err = run_cli(capsys, "quantize", "--use-case", "ic", "--model", bad, "--out", tmp_path / "o")
    assert_one_line_error(code, err, "resnet8.onnx")


# --------------------------------------------------- MLPerf ResNet-8 via tf2onnx
@pytest.fixture(scope="module")
def resnet8_onnx(mlperf_dir, tmp_path_factory):
    """The MLPerf Tiny ResNet-8 converted by tf2onnx (NHWC input, a Transpose inside)."""
    import tf2onnx

    from tinyptq._tf import keras, tf

    model = keras.models.load_model(mlperf_dir / "ic_resnet8.h5", compile=False)
    spec = (tf.TensorSpec((None, *model.input_shape[1:]), tf.float32, name="input"),)
    proto, _ = tf2onnx.convert.from_keras(model, input_signature=spec, opset=17)
    path = tmp_path_factory.mktemp("onnx") / "ic_resnet8.onnx"
    onnx.save(proto, path)
    return path


def test_resnet8_onnx_matches_keras_structure(resnet8_onnx, mlperf_dir):
    graph, keras_graph = load_graph(resnet8_onnx), load_graph(mlperf_dir / "ic_resnet8.h5")
    x = np.random.default_rng(0).uniform(0, 255, (8, 32, 32, 3)).astype(np.float32)
    np.testing.assert_allclose(graph.predict(x), keras_graph.predict(x), atol=1e-5)
    assert graph.input_shape == keras_graph.input_shape
    assert len(graph.act_points()) == len(keras_graph.act_points())
    assert sorted(graph.layer_macs().values()) == sorted(keras_graph.layer_macs().values())
    fused = sorted((str(q.activation), q.kind) for q in graph.quant_layers())
    assert fused == sorted((str(q.activation), q.kind) for q in keras_graph.quant_layers())


@pytest.mark.slow
@pytest.mark.parametrize(
    "pipeline",
    [
        "minmax",
        {
            "name": "full",
            "quant": {"weight_bits": 8, "act_bits": 8, "weight_per_channel": True},
            "stages": ["bn_folding", "cle", "range_setting", "bias_correction"],
        },
    ],
    ids=["minmax", "bn_folding+cle+range_setting+bias_correction"],
)
def test_resnet8_onnx_quantizes_like_the_keras_model(resnet8_onnx, data_dir, pipeline):
    via_onnx = api.quantize(use_case="ic", pipeline=pipeline, data_dir=data_dir, model=resnet8_onnx)
    via_keras = api.quantize(use_case="ic", pipeline=pipeline, data_dir=data_dir)
    assert via_onnx.summary["fp32"] == pytest.approx(via_keras.summary["fp32"], abs=1e-9)
    assert abs(via_onnx.summary["quantized"] - via_keras.summary["quantized"]) <= 0.5
    assert via_onnx.summary["quantized"] > via_onnx.summary["fp32"] - 1.0


def test_stages_give_the_same_kernels_on_keras_and_its_onnx_conversion():
    """Kernel layouts agree across adapters: conv, depthwise with multiplier 2, dense; BN folding + CLE alike."""
    import tf2onnx

    from tinyptq._tf import keras, tf
    from tinyptq.graph.keras_graph import KerasGraph

    keras.utils.set_random_seed(0)
    inp = keras.Input((6, 6, 3))
    x = keras.layers.Conv2D(4, 3, padding="same")(inp)
    x = keras.layers.ReLU()(keras.layers.BatchNormalization()(x))
    x = keras.layers.DepthwiseConv2D(3, depth_multiplier=2, padding="same")(x)
    x = keras.layers.ReLU()(keras.layers.BatchNormalization()(x))
    x = keras.layers.Conv2D(5, 1, activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dense(3)(keras.layers.Dense(6, activation="relu")(x))
    model = keras.Model(inp, x)
    for layer in model.layers:  # non-trivial BN statistics
        if isinstance(layer, keras.layers.BatchNormalization):
            g, b, m, v = layer.get_weights()
            layer.set_weights([g * 1.5, b + 0.1, m + 0.3, v + 0.5])
    spec = (tf.TensorSpec((None, 6, 6, 3), tf.float32, name="input"),)
    proto, _ = tf2onnx.convert.from_keras(model, input_signature=spec, opset=17)
    calib = np.random.default_rng(0).normal(size=(8, 6, 6, 3)).astype(np.float32)
    states = []
    for graph in (KerasGraph.from_keras(model), OnnxGraph.from_onnx(proto)):
        state = PTQState(graph, QuantConfig(), calib)
        states.append(create_stage("cle").apply(create_stage("bn_folding").apply(state)))
    (k_state, o_state) = states
    k_layers, o_layers = k_state.graph.quant_layers(), o_state.graph.quant_layers()
    assert [q.kind for q in k_layers] == [q.kind for q in o_layers] == ["conv", "depthwise", "conv", "dense", "dense"]
    assert k_state.log[-1].details["pairs"] and len(k_state.log[-1].details["pairs"]) == len(o_state.log[-1].details["pairs"])
    for kq, oq in zip(k_layers, o_layers, strict=True):
        k_kernel = k_state.graph.kernel_layout(kq.name).to_canonical(k_state.graph.kernel(kq.name))
        o_kernel = o_state.graph.kernel_layout(oq.name).to_canonical(o_state.graph.kernel(oq.name))
        np.testing.assert_allclose(k_kernel, o_kernel, rtol=1e-4, atol=1e-5 * np.abs(o_kernel).max(), err_msg=kq.name)
        k_bias, o_bias = k_state.graph.bias(kq.name), o_state.graph.bias(oq.name)
        o_bias = np.zeros_like(k_bias) if o_bias is None else o_bias  # tf2onnx drops all-zero biases
        np.testing.assert_allclose(k_bias, o_bias, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(k_state.graph.predict(calib), o_state.graph.predict(calib), atol=1e-4)
