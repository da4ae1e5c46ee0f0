"""The differentiable executor: float equivalence, layer specs, sub-graphs, changes in place."""

from __future__ import annotations

import numpy as np
import pytest

from tinyptq._tf import keras, tf
from tinyptq.config import QuantConfig
from tinyptq.executor import Executor
from tinyptq.graph.keras_graph import KerasGraph
from tinyptq.graph.loading import load_graph
from tinyptq.graph.onnx_graph import OnnxGraph
from tinyptq.pipeline import PTQState, create_stage
from tinyptq.quant import Encoding, QuantSpec
from tinyptq.sim import QuantSim

MLPERF = {
    "ic": ("ic_resnet8.h5", lambda rng, n: rng.uniform(0, 255, (n, 32, 32, 3))),
    "vww": ("vww_mobilenetv1_96.h5", lambda rng, n: rng.uniform(0, 1, (n, 96, 96, 3))),
    "kws": ("kws_dscnn_savedmodel", lambda rng, n: rng.normal(-5, 20, (n, 49, 10, 1))),
    "ad": ("ad_autoencoder.h5", lambda rng, n: rng.normal(-20, 8, (n, 640))),
}


def assert_every_node_matches(reference: dict, got: dict, tol: float = 1e-5) -> None:
    """Every tensor within ``tol`` of its own value range (and of the model output's)."""
    for name, ref in reference.items():
        scale = max(float(np.ptp(ref)), 1e-6)
        err = float(np.max(np.abs(got[name] - ref))) / scale
        assert err <= tol, f"{name}: max error {err:.2e} of its range"


# ------------------------------------------------------------ tiny models
def tiny_keras(seed: int = 0) -> KerasGraph:
    """conv-BN-ReLU, stride-2 'same' conv, a residual Add with a 1x1 shortcut, dw + pw, pooling, dense."""
    keras.utils.set_random_seed(seed)
    inp = keras.Input((12, 12, 3))
    x = keras.layers.Conv2D(8, 3, padding="same")(inp)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.ReLU()(x)
    y = keras.layers.Conv2D(8, 3, strides=2, padding="same", activation="relu")(x)
    y = keras.layers.Conv2D(8, 3, padding="same")(y)
    s = keras.layers.Conv2D(8, 1, strides=2)(x)
    x = keras.layers.ReLU()(keras.layers.Add()([y, s]))
    x = keras.layers.DepthwiseConv2D(3, padding="valid", activation="relu6")(x)
    x = keras.layers.Conv2D(6, 1, activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    out = keras.layers.Dense(4, activation="softmax")(x)
    model = keras.Model(inp, out)
    rng = np.random.default_rng(seed)
    bn = model.layers[2]
    bn.set_weights([rng.uniform(0.5, 2, 8), rng.normal(0, 0.3, 8), rng.normal(0, 0.3, 8), rng.uniform(0.5, 2, 8)])
    return KerasGraph.from_keras(model)


@pytest.fixture(scope="module")
def tiny():
    """(Keras graph, the same as ONNX, 32 inputs)."""
    graph = tiny_keras()
    x = np.random.default_rng(1).normal(0, 1, (32, 12, 12, 3)).astype(np.float32)
    return graph, OnnxGraph.from_onnx(graph.to_onnx().model), x


def quantized_state(graph, x, bits=4) -> PTQState:
    state = PTQState(graph.copy(), QuantConfig(weight_bits=bits, act_bits=bits, weight_per_channel=True), x)
    return create_stage("range_setting").apply(state)


# --------------------------------------------------------- float equality
@pytest.mark.parametrize("adapter", ["keras", "onnx"])
def test_float_executor_equals_adapter_on_every_node_of_a_tiny_model(tiny, adapter):
    keras_graph, onnx_graph, x = tiny
    graph = keras_graph if adapter == "keras" else onnx_graph
    names = graph.node_names()[1:]
    assert_every_node_matches(graph.run(x, names), Executor(graph).run(x, names))


@pytest.mark.parametrize("name", sorted(MLPERF))
def test_float_executor_equals_keras_and_onnxruntime_on_mlperf_models(mlperf_dir, name):
    """Every node of the four MLPerf Tiny models, through Keras and through tf2onnx + onnxruntime."""
    import tf2onnx

    path, make_x = MLPERF[name]
    x = make_x(np.random.default_rng(0), 8).astype(np.float32)
    graph = load_graph(mlperf_dir / path)
    names = graph.node_names()[1:]
    assert_every_node_matches(graph.run(x, names), Executor(graph).run(x, names))

    model = keras.models.load_model(mlperf_dir / path, compile=False)
    spec = (tf.TensorSpec((None, *model.input_shape[1:]), tf.float32, name="input"),)
    proto, _ = tf2onnx.convert.from_keras(model, input_signature=spec, opset=17)
    onnx_graph = OnnxGraph.from_onnx(proto)
    names = onnx_graph.node_names()[1:]
    reference = onnx_graph.run(x, names)  # onnxruntime
    assert_every_node_matches(reference, Executor(onnx_graph).run(x, names))
    np.testing.assert_allclose(onnx_graph.predict(x), graph.predict(x), atol=1e-4 * np.ptp(graph.predict(x)))


# ------------------------------------------------------------- layer specs
def test_layer_specs_agree_between_keras_and_its_onnx_conversion(tiny):
    keras_graph, onnx_graph, _ = tiny
    k_layers, o_layers = keras_graph.quant_layers(), onnx_graph.quant_layers()
    assert [q.kind for q in k_layers] == [q.kind for q in o_layers]
    for k, o in zip(k_layers, o_layers, strict=True):
        ks, os_ = keras_graph.layer_spec(k.name), onnx_graph.layer_spec(o.name)
        np.testing.assert_array_equal(ks.kernel, os_.kernel)
        assert (ks.strides, ks.pads, ks.dilations, ks.groups) == (os_.strides, os_.pads, os_.dilations, os_.groups)
        assert (ks.bias is None) == (os_.bias is None) or not np.any(ks.bias)
        assert ks.channels_last and (os_.channels_last == (o.kind == "dense"))
    strided = keras_graph.layer_spec(k_layers[1].name)
    assert strided.strides == (2, 2) and strided.pads == ((0, 1), (0, 1)) and strided.same_padding
    dw = keras_graph.layer_spec(next(q.name for q in k_layers if q.kind == "depthwise"))
    assert dw.groups == 8 and dw.kernel.shape == (8, 1, 3, 3) and dw.pads == ((0, 0), (0, 0))


def test_layer_spec_of_a_non_layer_is_a_key_error(tiny):
    keras_graph, onnx_graph, _ = tiny
    for graph in (keras_graph, onnx_graph):
        with pytest.raises(KeyError):
            graph.layer_spec(graph.node_names()[0])


# ------------------------------------------------------ changes in place
@pytest.mark.parametrize("adapter", ["keras", "onnx"])
def test_changes_take_effect_without_rebuild_and_equal_a_fresh_simulation(tiny, adapter):
    keras_graph, onnx_graph, x = tiny
    graph = keras_graph if adapter == "keras" else onnx_graph
    state = quantized_state(graph, x)
    sim = QuantSim(state)
    fn = sim.function(sim.outputs)
    before = sim.predict(x)
    traces = fn.experimental_get_tracing_count()
    layer = state.graph.quant_layers()[2].name
    point = state.graph.act_points()[1].name

    kernel = state.graph.kernel(layer) * 0.5
    bias = np.full(state.graph.layer_spec(layer).out_channels, 0.25, np.float32)
    two_bit = Encoding.from_range(
        state.act_encodings[point].min, state.act_encodings[point].max, QuantSpec(bits=2, symmetric=False)
    )
    sim.set_kernel(layer, kernel)
    sim.set_bias(layer, bias)
    sim.set_encoding(point, two_bit)
    sim.disable(state.graph.quant_layers()[0].name, kind="weight")
    changed = sim.predict(x)
    assert fn.experimental_get_tracing_count() == traces and len(sim.executor._compiled) == 1
    assert not np.array_equal(changed, before)

    graph2 = state.graph.copy()
    graph2.set_kernel(layer, kernel)
    graph2.set_bias(layer, bias)
    weights = dict(state.weight_encodings)
    weights.pop(state.graph.quant_layers()[0].name)
    fresh = QuantSim(state.evolve(graph=graph2, weight_encodings=weights, act_encodings={**state.act_encodings, point: two_bit}))
    np.testing.assert_array_equal(changed, fresh.predict(x))


def test_all_quantizers_off_is_the_float_model(tiny):
    graph, _, x = tiny
    state = quantized_state(graph, x, bits=3)
    sim = QuantSim(state)
    assert not np.allclose(sim.predict(x), graph.predict(x), atol=1e-3)
    for q in state.graph.quant_layers():
        sim.disable(q.name, kind="weight")
    for p in state.graph.act_points():
        sim.disable(p.name)
    np.testing.assert_allclose(sim.predict(x), graph.predict(x), atol=1e-6)


def test_unknown_quantizer_and_bad_shapes_are_config_errors(tiny):
    from tinyptq.errors import ConfigError

    graph, _, x = tiny
    sim = QuantSim(quantized_state(graph, x))
    layer = graph.quant_layers()[0].name
    with pytest.raises(ConfigError, match="no activation point"):
        sim.disable("nope")
    with pytest.raises(ConfigError, match="unknown quantizer kind"):
        sim.enable(layer, kind="bias")
    with pytest.raises(ConfigError, match="shape"):
        sim.set_kernel(layer, np.zeros((1, 1, 3, 8), np.float32))
    with pytest.raises(ConfigError, match="channels"):
        sim.set_encoding(layer, Encoding.from_range(-np.ones(3), np.ones(3), QuantSpec(4, per_channel=True), axis=3), "weight")


def test_fixed_weights_are_what_the_simulation_runs(tiny):
    graph, _, x = tiny
    state = quantized_state(graph, x)
    layer = state.graph.quant_layers()[1].name
    enc = state.weight_encodings[layer]
    floor = np.clip(np.floor(state.graph.kernel(layer) / enc._broadcast(enc.scale, 4)), enc.qmin, enc.qmax)
    fixed = state.evolve(fixed_weights={layer: floor.astype(np.int32)})
    graph2 = state.graph.copy()
    graph2.set_kernel(layer, enc.dequantize(floor))
    np.testing.assert_array_equal(QuantSim(fixed).predict(x), QuantSim(state.evolve(graph=graph2)).predict(x))
    assert not np.array_equal(QuantSim(fixed).predict(x), QuantSim(state).predict(x))


@pytest.mark.parametrize("adapter", ["keras", "onnx"])
def test_loading_another_state_equals_a_fresh_simulation(tiny, adapter):
    """``QuantSim.load``: other kernels, biases, fixed rounding, encodings and float tensors, no rebuild."""
    from tinyptq.errors import ConfigError

    keras_graph, onnx_graph, x = tiny
    graph = keras_graph if adapter == "keras" else onnx_graph
    first = quantized_state(graph, x, bits=4)
    layer, float_layer = (q.name for q in first.graph.quant_layers()[1:3])
    graph2 = first.graph.copy()
    graph2.set_bias(layer, np.full(graph2.layer_spec(layer).out_channels, 0.5, np.float32))
    second = create_stage("range_setting").apply(
        PTQState(graph2, QuantConfig(weight_bits=3, act_bits=6, weight_per_channel=True), x)
    )
    enc = second.weight_encodings[layer]
    weights = {k: v for k, v in second.weight_encodings.items() if k != float_layer}
    second = second.evolve(
        weight_encodings=weights, fixed_weights={layer: np.floor(graph2.kernel(layer) / enc._broadcast(enc.scale, 4))}
    )
    sim = QuantSim(first)
    sim.load(second)
    np.testing.assert_array_equal(sim.predict(x), QuantSim(second).predict(x))
    assert not sim.quantizer(float_layer, "weight").enabled
    sim.load(first)
    np.testing.assert_array_equal(sim.predict(x), QuantSim(first).predict(x))
    other = quantized_state(tiny_keras_without_bn(), x)
    with pytest.raises(ConfigError, match="other nodes"):
        sim.load(other)


def tiny_keras_without_bn() -> KerasGraph:
    keras.utils.set_random_seed(0)
    inp = keras.Input((12, 12, 3))
    x = keras.layers.Conv2D(4, 3, activation="relu")(inp)
    return KerasGraph.from_keras(keras.Model(inp, keras.layers.Dense(2)(keras.layers.GlobalAveragePooling2D()(x))))


# ------------------------------------------------------------- sub-graphs
@pytest.mark.parametrize("adapter", ["keras", "onnx"])
def test_block_runs_alone_from_its_input_with_gradients(tiny, adapter):
    keras_graph, onnx_graph, x = tiny
    graph = keras_graph if adapter == "keras" else onnx_graph
    state = quantized_state(graph, x)
    sim = QuantSim(state)
    block = next(b for b in state.graph.blocks() if b.kind == "residual")
    (start,) = block.input_points
    whole = sim.run(x, outputs=[block.output_point])[block.output_point]
    block_in = sim.run(x, outputs=[start], raw=[start])[start]  # raw: the block's own input quantizer applies
    fn = sim.function([block.output_point], inputs=[start])
    np.testing.assert_array_equal(fn(tf.constant(block_in))[0].numpy(), whole)

    first = block.layers[0]
    kernel = sim.executor.kernels[first]
    scale = sim.quantizer(first, "weight").scale
    with tf.GradientTape() as tape:
        out = fn(tf.constant(block_in))[0]
        loss = tf.reduce_mean(tf.square(out - tf.constant(whole) * 0.9))
    g_kernel, g_scale = tape.gradient(loss, [kernel, scale])
    assert g_kernel is not None and np.any(g_kernel.numpy() != 0) and np.all(np.isfinite(g_kernel.numpy()))
    assert g_scale is not None and np.all(np.isfinite(g_scale.numpy()))


def test_sub_graph_needs_its_inputs(tiny):
    from tinyptq.errors import ConfigError

    graph, _, x = tiny
    sim = QuantSim(quantized_state(graph, x))
    block = next(b for b in graph.blocks() if b.kind == "residual")
    branch = graph.quant_layer(block.layers[0]).output_point  # one branch only: the other needs the input
    with pytest.raises(ConfigError, match="model input"):
        sim.function([block.output_point], inputs=[branch])


# ------------------------------------------------------- rounding hooks
def test_qdrop_keeps_a_seeded_random_part_in_float(tiny):
    graph, _, x = tiny
    state = quantized_state(graph, x, bits=3)
    sim = QuantSim(state)
    point = state.graph.act_points()[1].name
    quantized = sim.run(x, outputs=[point])[point]
    raw = sim.run(x, outputs=[point], raw=[point])[point]
    sim.executor.set_drop(0.5, [point])
    sim.executor.reseed(7)
    first = sim.run(x, outputs=[point])[point]
    sim.executor.reseed(7)
    again = sim.run(x, outputs=[point])[point]
    np.testing.assert_array_equal(first, again)  # same seed, same draws
    from_float = np.mean((first == raw) & (raw != quantized)) / np.mean(raw != quantized)
    assert 0.4 < from_float < 0.6
    assert np.all((first == raw) | (first == quantized))
    sim.executor.set_drop(0.0)
    np.testing.assert_array_equal(sim.run(x, outputs=[point])[point], quantized)


def test_a_weight_transform_replaces_the_kernel_quantizer(tiny):
    graph, _, x = tiny
    state = quantized_state(graph, x)
    sim = QuantSim(state)
    layer = state.graph.quant_layers()[0].name
    before = sim.predict(x)
    sim.executor.set_weight_transform(layer, lambda kernel, q: q(kernel) * 0.0)
    zeroed = sim.predict(x)
    sim.executor.set_kernel(layer, np.zeros_like(state.graph.kernel(layer)))
    sim.executor.set_weight_transform(layer, None)
    np.testing.assert_array_equal(zeroed, sim.predict(x))
    assert not np.array_equal(before, zeroed)


def test_a_grouped_keras_conv_reports_its_groups():
    inp = keras.Input((6, 6, 4))
    out = keras.layers.Conv2D(6, 3, groups=2, padding="same")(inp)
    graph = KerasGraph.from_keras(keras.Model(inp, out))
    spec = graph.layer_spec(graph.quant_layers()[0].name)
    assert spec.groups == 2 and spec.in_channels == 4 and spec.kernel.shape == (6, 2, 3, 3)
    x = np.random.default_rng(0).normal(size=(3, 6, 6, 4)).astype(np.float32)
    np.testing.assert_allclose(Executor(graph).run(x)[graph.output_names[0]], graph.predict(x), atol=1e-5)
